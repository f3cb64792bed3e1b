"""biref distill: a one-pass model from a model's quarter-turn mean (offline, like train)."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "distill", help="train a one-pass model to give a model's quarter-turn mean",
        description="Distil a model's reconstruction (the mean over four quarter turns of the acquisition, four "
                    "decoder passes after the last view) into one decoder pass: the encoder and GRU are kept, "
                    "attention and decoder are trained on cached hidden states against the truth and the "
                    "teacher's mean (biref_sdk.training.distill). Writes OUT/best.h5, OUT/last.h5 and "
                    "OUT/history.json; the model files reconstruct in one pass by default.")
    p.add_argument("--teacher", help="model file to distil (default: the shipped trained_models/biref_small.h5)")
    p.add_argument("--data", required=True, action="append", help="training data set file; repeatable")
    p.add_argument("--val", action="append", default=[], help="validation data set file; repeatable")
    p.add_argument("--out", help="output folder (not needed with --prepare-only)")
    p.add_argument("--cache-dir", required=True, metavar="DIR",
                   help="folder of the per-sample hidden states, priors and teacher answers (4.5 MB per "
                        "sample); kept between runs, so preparation resumes and runs once")
    p.add_argument("--prepare-only", action="store_true",
                   help="only fill the cache (run one process per data file to use several cores)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate, cosine decay to 1%% (default 1e-4)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--teacher-weight", type=float, default=1.0,
                   help="weight of the loss to the teacher's mean next to the loss to the truth (default 1)")
    p.add_argument("--q-weight", type=float,
                   help="weight of the Q-tensor (director) loss (default: the teacher's training recipe's)")
    p.add_argument("--isotropy-weight", type=float, default=0.0,
                   help="weight of the birefringence (n_e - n_o) reported where the truth is isotropic, its mean "
                        "square next to the index MSEs (default 0; see the model card's stage 8)")
    p.add_argument("--isotropy-gate-epochs", type=int, default=0, metavar="N",
                   help="then fit the isotropy gate alone for N epochs, adding one if the student has none: it "
                        "scales n_e - n_o by the network's own order parameter (default 0: none)")
    p.add_argument("--uncertainty-epochs", type=int, default=3,
                   help="epochs of the uncertainty head's fit to the teacher's quarter-turn spread, after "
                        "the decoder's (default 3; 0: leave it untrained)")
    p.add_argument("--init", metavar="STUDENT.h5",
                   help="continue from a student of this teacher (with --epochs 0: only fit its uncertainty head)")
    p.add_argument("--prior-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a formula option of the student's prior that differs from the teacher's (VALUE in JSON), "
                        "e.g. late_views=12 (the streaming warm start); repeatable")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (process-wide; default torch's)")
    p.set_defaults(func=run)


def _prior_options(pairs: list[str]) -> dict:
    import json

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--prior-option {pair!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"--prior-option {pair!r}: VALUE must be JSON (a number, true/false, [lo, hi])") from None
    return options


def run(args: argparse.Namespace) -> int:
    import torch

    from ..network.io import shipped_model_path
    from ..training.distill import distill, prepare

    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = args.teacher or shipped_model_path()
    if args.prepare_only:
        for folder in prepare(teacher, args.data, args.cache_dir):
            print(f"prepared {folder}")
        return 0
    if not args.out or not args.val:
        raise ValueError("--out and at least one --val are needed to train")
    if (min(args.epochs, args.uncertainty_epochs, args.isotropy_gate_epochs, args.isotropy_weight) < 0
            or args.batch_size < 1 or args.lr <= 0):
        raise ValueError("--epochs, --uncertainty-epochs, --isotropy-gate-epochs and --isotropy-weight must be "
                         ">= 0, --batch-size >= 1 and --lr positive")
    if args.epochs == 0 and not args.init:
        raise ValueError("--epochs 0 needs --init STUDENT.h5")
    history = distill(teacher, args.data, args.val, args.out, args.cache_dir, epochs=args.epochs, lr=args.lr,
                      batch_size=args.batch_size, teacher_weight=args.teacher_weight, seed=args.seed,
                      init=args.init, uncertainty_epochs=args.uncertainty_epochs, q_weight=args.q_weight,
                      prior_options=_prior_options(args.prior_option),
                      isotropy_weight=args.isotropy_weight, gate_epochs=args.isotropy_gate_epochs, log=print)
    if history:
        best = max(history, key=lambda h: h["val_score"])
        print(f"done: best epoch {best['epoch']} (mean val PSNR {best['val_score']:.2f} dB); model files in {args.out}")
    else:
        fitted = [name for name, epochs in (("isotropy gate", args.isotropy_gate_epochs),
                                            ("uncertainty head", args.uncertainty_epochs)) if epochs]
        print(f"done: {' and '.join(fitted) or 'nothing'} fitted; {args.out}/best.h5")
    return 0
