"""Where a model's n_e error sits (issue 13): the share of the squared error in particle cores,
in the shell around their surfaces and in the medium, and how far each particle core's mean n_e
(per sample) is off. A shell-dominated error needs sharper surfaces; a core offset needs better index levels.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/error_split.py DATA.h5 [--method model|formula] \\
        [--model trained_models/biref_small.h5] [--shell-voxels 2] [--out benchmarks/results/error_split.json]

Cores: voxels inside a particle (truth above the medium's index) more than ``--shell-voxels``
(6-neighbourhood) from its surface; shell: within that many voxels of it, on either side;
medium: the rest.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import code_version, machine  # noqa: E402

PARTICLE_CONTRAST = 1e-4  # truth this far above the medium's index is inside a particle


def split(truth_ne: np.ndarray, estimate_ne: np.ndarray, medium_index: float, shell_voxels: int) -> dict:
    """Squared n_e error summed over cores, shell and medium, and the core's mean offset."""
    from biref_sdk.metrics import _eroded

    inside = truth_ne > medium_index + PARTICLE_CONTRAST
    core = _eroded(inside, shell_voxels)
    near = ~_eroded(~inside, shell_voxels)
    error = estimate_ne - truth_ne
    return {"core": float((error[core] ** 2).sum()), "shell": float((error[near & ~core] ** 2).sum()),
            "medium": float((error[~near] ** 2).sum()),
            "core_offset": float(error[core].mean()) if core.any() else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data")
    parser.add_argument("--method", default="model", choices=("model", "formula"))
    parser.add_argument("--model", default=str(ROOT / "trained_models" / "biref_small.h5"))
    parser.add_argument("--shell-voxels", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from biref_sdk.files import Dataset
    from biref_sdk.reconstruction import get_reconstructor

    load_before = os.getloadavg()
    reconstructor = (get_reconstructor("model", model=args.model) if args.method == "model"
                     else get_reconstructor("formula"))
    samples = []
    with Dataset(args.data) as dataset:
        for index in range(len(dataset)):
            acquisition = dataset.acquisition(index)
            volume = reconstructor.reconstruct(acquisition)
            truth = acquisition.truth
            samples.append(split(np.asarray(truth.ne, np.float64), np.asarray(volume.ne, np.float64),
                                 float(truth.medium_index), args.shell_voxels))
    total = sum(s["core"] + s["shell"] + s["medium"] for s in samples)
    offsets = np.array([s["core_offset"] for s in samples if s["core_offset"] is not None])
    summary = {part: sum(s[part] for s in samples) / total for part in ("core", "shell", "medium")}
    summary.update(core_offset_mean=float(offsets.mean()), core_offset_rms=float(np.sqrt(np.mean(offsets ** 2))),
                   n_samples=len(samples))
    print(f"{Path(args.data).name}, {args.method}, {len(samples)} samples: share of the squared n_e error in cores "
          f"{summary['core']:.2f}, shell {summary['shell']:.2f}, medium {summary['medium']:.2f}; core mean "
          f"n_e offset {summary['core_offset_mean']:+.5f} (RMS over samples {summary['core_offset_rms']:.5f})")
    if args.out:
        args.out.write_text(json.dumps({"data": str(args.data), "method": args.method,
                                        "model": args.model if args.method == "model" else None, "shell_voxels": args.shell_voxels,
                                        "summary": summary, "samples": samples,
                                        "machine": machine(load_before), "code": code_version()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
