"""biref blend: a model part of the way from a base model to its fine-tuned copy (offline, like train)."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "blend", help="interpolate the weights of a model and its fine-tuned copy",
        description="Write (1 - ALPHA) * BASE + ALPHA * TUNED, weight by weight (biref_sdk.training.blend): a "
                    "fine-tune's gains with fewer of its losses. TUNED must have been trained from BASE "
                    "(biref train --init BASE); the configurations must be equal.")
    p.add_argument("--base", required=True, metavar="MODEL.h5", help="the model fine-tuned")
    p.add_argument("--tuned", required=True, metavar="MODEL.h5", help="its fine-tuned copy")
    p.add_argument("--alpha", required=True, type=float, help="0: the base's weights, 1: the tuned model's")
    p.add_argument("--out", required=True, metavar="MODEL.h5", help="the blended model file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..training.blend import blend

    checksum = blend(args.base, args.tuned, args.alpha, args.out)
    print(f"wrote {args.out}: {1 - args.alpha:g} x {args.base} + {args.alpha:g} x {args.tuned} (sha256 {checksum})")
    return 0
