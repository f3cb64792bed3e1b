"""Table 1 per held-out category: the formula and one or more models on each test file of a folder.

    python benchmarks/category_tables.py DATA_DIR --model shipped=trained_models/biref_small.h5 \\
        [--model new=run/best.h5] [--out benchmarks/results/categories.json]

DATA_DIR holds the held-out files that the model card's commands make (``test_*.h5``); each is
scored with ``biref_sdk.evaluation.evaluate`` (the paper's Table 1, plus RMSE, director error and
the false birefringence in isotropic cores). Prints one markdown table per file and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_refine_arguments, code_version, machine, refined_variants  # noqa: E402

COLUMNS = (("PSNR n_e / n_o (dB)", ("psnr_ne", "psnr_no"), "{:.2f}"), ("SSIM n_e / n_o", ("ssim_ne", "ssim_no"), "{:.3f}"),
           ("RMSE n_e / n_o", ("rmse_ne", "rmse_no"), "{:.5f}"), ("director (°)", ("director_error_deg",), "{:.1f}"),
           ("isotropic core abs(n_e − n_o)", ("isotropic_core_birefringence",), "{:.4f}"))


def markdown(name: str, results: dict) -> str:
    lines = [f"**{name}** ({next(iter(results.values()))['n_samples']} samples)", "",
             "| method | " + " | ".join(title for title, _, _ in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for method, r in results.items():
        cells = [" / ".join("–" if r[k] is None or (isinstance(r[k], float) and math.isnan(r[k])) else fmt.format(r[k])
                            for k in keys) for _, keys, fmt in COLUMNS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=FILE")
    parser.add_argument("--pattern", default="test_*.h5")
    parser.add_argument("--limit", type=int)
    add_refine_arguments(parser)
    parser.add_argument("--uniform-particles", action="store_true",
                        help="also each model's volumes rebuilt as particles of one material each")
    parser.add_argument("--out", help="JSON output file")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from biref_sdk.evaluation import evaluate
    from biref_sdk.reconstruction import get_reconstructor
    from biref_sdk.reconstruction.particles import UniformParticles

    load_before = os.getloadavg()
    reconstructors = {"formula": get_reconstructor("formula")}
    for spec in args.model:
        name, _, path = spec.partition("=")
        reconstructors[name] = get_reconstructor("model", model=path)
        if args.uniform_particles:
            reconstructors[f"{name}+particles"] = UniformParticles(reconstructors[name], shape=args.particle_shape)
        reconstructors.update(refined_variants(name, reconstructors[name], args))
    tables = {}
    for path in sorted(Path(args.data_dir).glob(args.pattern)):
        tables[path.stem] = evaluate(path, reconstructors, limit=args.limit)
        print(markdown(path.stem, tables[path.stem]) + "\n", flush=True)
    if args.out:
        def clean(value):
            return None if isinstance(value, float) and not math.isfinite(value) else value
        record = {"tables": {f: {m: {k: clean(v) for k, v in r.items()} for m, r in t.items()} for f, t in tables.items()},
                  "models": dict(spec.partition("=")[::2] for spec in args.model),
                  "machine": machine(load_before), "code": code_version()}
        Path(args.out).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
