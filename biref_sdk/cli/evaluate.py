"""biref evaluate: the paper's Table 1 (plus RMSE, director error, speed) on a data set file."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from .reconstruct import add_method_arguments

    p = subparsers.add_parser("evaluate", help="score reconstruction methods on a simulated data set",
                              description="Reconstruct every sample of a data set file (docs/formats.md) with each "
                                          "--method and compare with its truth: PSNR and SSIM of n_e and n_o "
                                          "(the paper's Table 1), RMSE, director error and seconds per sample, "
                                          "one row per method.")
    p.add_argument("dataset", help="data set HDF5 file")
    add_method_arguments(p, multiple=True, consistency_default=0)  # off: its time would count as the method's
    p.add_argument("--limit", type=int, help="only the first N samples")
    p.add_argument("--json", action="store_true", help="print JSON: {method: {psnr_ne, psnr_no, ssim_ne, ssim_no, "
                                                       "rmse_ne, rmse_no, director_error_deg, isotropic_core_birefringence, seconds_per_sample, "
                                                       "n_samples}}")
    p.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluation import evaluate, format_table, to_json
    from .reconstruct import build_reconstructors

    methods = list(dict.fromkeys(args.methods or ["formula"]))
    reconstructors = build_reconstructors(methods, args)
    suffix = ("+refined" if args.refine_iterations else "") + ("+particles" if args.uniform_particles else "")
    reconstructors = {f"{method}{suffix}": r for method, r in reconstructors.items()}
    results = evaluate(args.dataset, reconstructors, limit=args.limit, progress=args.progress)
    print(to_json(results) if args.json else format_table(results))
    return 0
