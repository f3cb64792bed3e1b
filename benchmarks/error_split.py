"""Where a model's n_e error sits (issue 13): the share of the squared error in particle cores,
in the shell around their surfaces and in the medium, and how far each particle core's mean n_e
(per sample) is off. A shell-dominated error needs sharper surfaces; a core offset needs better index levels.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/error_split.py DATA.h5 [--method model|formula] \\
        [--model trained_models/biref_small.h5] [--shell-voxels 2] [--limit N] \\
        [--refine-iterations 20 --refine-model particles --refine-shapes --refine-configurations] \\
        [--out benchmarks/results/error_split.json]

Cores: voxels inside a particle (truth above the medium's index) more than ``--shell-voxels``
(6-neighbourhood) from its surface; shell: within that many voxels of it, on either side;
medium: the rest.

Per particle (each connected piece of the truth's particles: droplets that touch are one piece),
per sample: its voxels, whether it is isotropic or cut by the lateral edge, its true and estimated
core n_e (medians), the share of the sample's squared n_e error inside it and in the medium within
``--shell-voxels`` of it, and, for a refined volume, whether the refinement fitted it a spheroid
(a fitted spheroid's centre lies in it) or left it its voxels. The summary adds these shares up by
kind, so that the part of the error each kind of particle carries is one number.
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
from _common import add_refine_arguments, code_version, machine, refined_variants  # noqa: E402

PARTICLE_CONTRAST = 1e-4  # truth this far above the medium's index is inside a particle
SMALL_PARTICLE_VOXELS = 2500  # a particle of fewer voxels is "small" in the summary (r about 0.45 um, small preset)


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


def _fitted_spheroid_centres_m(volume) -> list[np.ndarray]:
    """The (z, y, x) centres of the spheroids a particle refinement fitted (none otherwise)."""
    particles = volume.parameters.get("refinement", {}).get("particles", {})
    return [np.asarray(row["center_m"][::-1]) for row in particles.get("spheroids", [])]


def particle_rows(truth, estimate, shell_voxels: int) -> list[dict]:
    """The per-particle rows of one sample (module docstring)."""
    import torch
    from biref_sdk.metrics import _eroded
    from biref_sdk.reconstruction.particles import label_components
    from biref_sdk.samples.tensor import voxel_centres_m

    medium = float(truth.medium_index)
    t_ne, t_no = np.asarray(truth.ne, np.float64), np.asarray(truth.no, np.float64)
    e_ne = np.asarray(estimate.ne, np.float64)
    inside = np.abs(t_ne - medium) + np.abs(t_no - medium) > PARTICLE_CONTRAST
    labels, count = label_components(torch.as_tensor(inside))
    labels = labels.numpy()
    squared = (e_ne - t_ne) ** 2
    total = squared.sum()
    grid = voxel_centres_m(inside.shape, truth.voxel_size_m)
    centres = [tuple(int(np.argmin(np.abs(axis.numpy() - c))) for axis, c in zip(grid, centre))
               for centre in _fitted_spheroid_centres_m(estimate)]
    refined = "refinement" in estimate.parameters
    rows = []
    for k in range(1, count + 1):
        own = labels == k
        core = _eroded(own, shell_voxels)
        core = core if core.any() else own
        near = ~_eroded(~own, shell_voxels) & ~inside
        lateral = [own.take(i, axis=a).any() for a in (1, 2) for i in (0, -1)]
        spheroid = any(own[c] for c in centres)
        rows.append({"voxels": int(own.sum()), "isotropic": bool(np.allclose(t_ne[own], t_no[own], atol=1e-6)),
                     "edge": bool(any(lateral)), "truth_ne": float(np.median(t_ne[core])),
                     "estimate_ne": float(np.median(e_ne[core])),
                     "error_share": float(squared[own].sum() / total) if total > 0 else 0.0,
                     "medium_near_share": float(squared[near].sum() / total) if total > 0 else 0.0,
                     "shape": ("spheroid" if spheroid else "voxels") if refined else None})
    return rows


def particle_summary(samples: list[dict]) -> dict:
    """Per kind of particle: how many, and the mean over samples of the share of the squared n_e
    error inside them and in the medium near them (module docstring)."""
    kinds = {"isotropic": lambda r: r["isotropic"], "birefringent": lambda r: not r["isotropic"],
             "small": lambda r: r["voxels"] < SMALL_PARTICLE_VOXELS,
             "large": lambda r: r["voxels"] >= SMALL_PARTICLE_VOXELS, "edge": lambda r: r["edge"],
             "spheroid": lambda r: r["shape"] == "spheroid", "voxels_kept": lambda r: r["shape"] == "voxels"}
    out = {}
    for kind, member in kinds.items():
        rows = [[r for r in s["particles"] if member(r)] for s in samples]
        out[kind] = {"count": sum(len(r) for r in rows),
                     "error_share": float(np.mean([sum(r["error_share"] for r in rs) for rs in rows])),
                     "medium_near_share": float(np.mean([sum(r["medium_near_share"] for r in rs) for rs in rows]))}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data")
    parser.add_argument("--method", default="model", choices=("model", "formula"))
    parser.add_argument("--model", default=str(ROOT / "trained_models" / "biref_small.h5"))
    parser.add_argument("--shell-voxels", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="the first N samples only (0: all)")
    parser.add_argument("--out", type=Path)
    add_refine_arguments(parser)
    args = parser.parse_args()
    if args.refine_iterations and (args.method != "model" or len(args.refine_model or ["voxels"]) > 1):
        parser.error("--refine-iterations: with --method model and one --refine-model")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from biref_sdk.files import Dataset
    from biref_sdk.metrics import psnr
    from biref_sdk.reconstruction import get_reconstructor

    load_before = os.getloadavg()
    reconstructor = (get_reconstructor("model", model=args.model) if args.method == "model"
                     else get_reconstructor("formula"))
    variants = refined_variants(args.method, reconstructor, args)
    method = next(iter(variants), args.method)
    reconstructor = variants.get(method, reconstructor)
    samples = []
    with Dataset(args.data) as dataset:
        for index in range(min(len(dataset), args.limit or len(dataset))):
            acquisition = dataset.acquisition(index)
            volume = reconstructor.reconstruct(acquisition)
            truth = acquisition.truth
            sample = split(np.asarray(truth.ne, np.float64), np.asarray(volume.ne, np.float64),
                           float(truth.medium_index), args.shell_voxels)
            sample.update(psnr_ne=psnr(truth.ne, volume.ne),
                          particles=particle_rows(truth, volume, args.shell_voxels))
            samples.append(sample)
            print(f"sample {index}: n_e {sample['psnr_ne']:.2f} dB; "
                  + "; ".join(f"{r['voxels']} voxels{' isotropic' if r['isotropic'] else ''}"
                              f"{' edge' if r['edge'] else ''}{' ' + r['shape'] if r['shape'] else ''}: "
                              f"{100 * r['error_share']:.0f} % (+{100 * r['medium_near_share']:.0f} % near), "
                              f"n_e {r['estimate_ne']:.4f} for {r['truth_ne']:.4f}" for r in sample["particles"]),
                  flush=True)
    total = sum(s["core"] + s["shell"] + s["medium"] for s in samples)
    offsets = np.array([s["core_offset"] for s in samples if s["core_offset"] is not None])
    summary = {part: sum(s[part] for s in samples) / total for part in ("core", "shell", "medium")}
    summary.update(core_offset_mean=float(offsets.mean()), core_offset_rms=float(np.sqrt(np.mean(offsets ** 2))),
                   n_samples=len(samples), psnr_ne_mean=float(np.mean([s["psnr_ne"] for s in samples])),
                   particles=particle_summary(samples))
    for kind, row in summary["particles"].items():
        print(f"  {kind}: {row['count']} particles, {100 * row['error_share']:.0f} % of the squared n_e error "
              f"inside them, {100 * row['medium_near_share']:.0f} % in the medium near them (mean over samples)")
    print(f"{Path(args.data).name}, {method}, {len(samples)} samples: share of the squared n_e error in cores "
          f"{summary['core']:.2f}, shell {summary['shell']:.2f}, medium {summary['medium']:.2f}; core mean "
          f"n_e offset {summary['core_offset_mean']:+.5f} (RMS over samples {summary['core_offset_rms']:.5f})")
    if args.out:
        args.out.write_text(json.dumps({"data": str(args.data), "method": method,
                                        "model": args.model if args.method == "model" else None, "shell_voxels": args.shell_voxels,
                                        "summary": summary, "samples": samples,
                                        "machine": machine(load_before), "code": code_version()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
