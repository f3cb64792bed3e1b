"""Table 1 per held-out category: the formula and one or more models on each test file of a folder.

    python benchmarks/category_tables.py DATA_DIR --model shipped=trained_models/biref_small.h5 \\
        [--model new=run/best.h5] [--out benchmarks/results/categories.json]

DATA_DIR holds the held-out files that the model card's commands make (``test_*.h5``); each is
scored with ``biref_sdk.evaluation.evaluate`` (the paper's Table 1, plus RMSE, director error and
the false birefringence in isotropic cores). Prints one markdown table per file and writes JSON,
with each sample's scores.

A long run splits over processes (``--first K --limit N`` each, one core apiece) and its parts
join into one table: ``python benchmarks/category_tables.py --merge part1.json part2.json --out all.json``.
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
    parser.add_argument("data_dir", nargs="?")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=FILE")
    parser.add_argument("--pattern", default="test_*.h5")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--first", type=int, default=0, help="the first sample of each file (default 0)")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="join the parts of one run (their samples, in the order given) instead of evaluating")
    add_refine_arguments(parser)
    parser.add_argument("--uniform-particles", action="store_true",
                        help="also each model's volumes rebuilt as particles of one material each")
    parser.add_argument("--out", help="JSON output file")
    args = parser.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    if not args.data_dir:
        parser.error("DATA_DIR is needed unless --merge")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from biref_sdk.evaluation import MethodScores, evaluate
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
    tables, samples = {}, {}
    for path in sorted(Path(args.data_dir).glob(args.pattern)):
        scores = {name: MethodScores(name) for name in reconstructors}
        tables[path.stem] = evaluate(path, reconstructors, limit=args.limit, scores=scores, first=args.first)
        samples[path.stem] = {m: {"first": args.first, "rows": s.samples, "seconds": s.seconds} for m, s in scores.items()}
        print(markdown(path.stem, tables[path.stem]) + "\n", flush=True)
    if args.out:
        write(args.out, tables, samples, dict(spec.partition("=")[::2] for spec in args.model),
              machine(load_before), code_version())
    return 0


def _clean(value):
    """JSON has no NaN or infinity: null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def write(path, tables: dict, samples: dict, models: dict, machine_record, code_record) -> None:
    record = {"tables": tables, "samples": samples, "models": models, "machine": machine_record, "code": code_record}
    Path(path).write_text(json.dumps(_clean(record), indent=2))


def merge(paths: list[str], out: str | None) -> int:
    """One table from the parts of a run split over processes (module docstring): each method's
    samples joined in the parts' order of first sample, and summarised again."""
    from biref_sdk.evaluation import MethodScores

    parts = [json.loads(Path(p).read_text()) for p in paths]
    if any("samples" not in part for part in parts):
        raise SystemExit("a part has no per-sample scores (written before --first existed)")
    tables, samples = {}, {}
    for stem in parts[0]["samples"]:
        tables[stem], samples[stem] = {}, {}
        for method in parts[0]["samples"][stem]:
            pieces = sorted((part["samples"][stem][method] for part in parts), key=lambda piece: piece["first"])
            ends = [piece["first"] + len(piece["rows"]) for piece in pieces]
            if any(end != nxt["first"] for end, nxt in zip(ends, pieces[1:])):
                raise SystemExit(f"the parts of {stem} / {method} do not join: first samples "
                                 f"{[piece['first'] for piece in pieces]}, ends {ends}")
            scores = MethodScores(method,
                                  [{k: math.nan if v is None else v for k, v in row.items()}
                                   for piece in pieces for row in piece["rows"]],
                                  [t for piece in pieces for t in piece["seconds"]])
            tables[stem][method] = scores.summary()
            samples[stem][method] = {"first": pieces[0]["first"], "rows": scores.samples, "seconds": scores.seconds}
        print(markdown(stem, tables[stem]) + "\n", flush=True)
    if out:
        write(out, tables, samples, parts[0]["models"], [part["machine"] for part in parts],
              [part["code"] for part in parts])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
