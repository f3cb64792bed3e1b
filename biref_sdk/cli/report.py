"""biref report: one self-contained HTML page with the paper's tables and figures on a data set."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    from .reconstruct import add_method_arguments
    from .render import missing_extra_is_one_line

    p = subparsers.add_parser("report", help="HTML report: Tables 1 and 2, loss curve, comparison figures",
                              description="Reconstruct the first --limit samples of a data set file with each "
                                          "--method, and write one self-contained HTML page (figures embedded): "
                                          "Table 1 (PSNR, SSIM of n_e and n_o), Table 2 (seconds per volume per "
                                          "method and engine, measured now), the model card's loss curve and "
                                          "comparison figures of the first --figures samples.")
    p.add_argument("dataset", type=Path, help="data set HDF5 file (docs/formats.md)")
    add_method_arguments(p, multiple=True)
    p.add_argument("--out", type=Path, required=True, help="HTML file to write")
    p.add_argument("--limit", type=int, default=8, help="samples to score (default 8)")
    p.add_argument("--figures", type=int, default=2, help="samples to draw (default 2)")
    p.add_argument("--model-card-dir", type=Path, help="folder with MODEL_CARD.md and loss_curve.png "
                   "(default: the shipped trained_models/)")
    p.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    p.set_defaults(func=missing_extra_is_one_line("report", run))


def run(args: argparse.Namespace) -> int:
    from ..network.io import SHIPPED_MODELS_DIR
    from ..viz.report import build_report, write_report
    from .reconstruct import build_reconstructors, parse_options

    if not args.dataset.is_file():
        raise FileNotFoundError(f"no such file: {args.dataset}")
    methods = list(dict.fromkeys(args.methods or ["formula", "model"]))
    reconstructors = build_reconstructors(methods, args)
    options = parse_options(args.option, methods)  # e.g. an engine choice: shown in Table 2
    engines = {m: f"{getattr(r, 'name', m)} on {args.device}"
                  + "".join(f", {k}={v}" for k, v in options[m].items()) for m, r in reconstructors.items()}
    report = build_report(args.dataset, reconstructors, engines, limit=args.limit, n_figures=args.figures,
                          model_card_dir=args.model_card_dir or SHIPPED_MODELS_DIR, progress=args.progress)
    print(f"report: {write_report(report, args.out)} ({report.n_samples} samples, methods {', '.join(methods)})")
    return 0
