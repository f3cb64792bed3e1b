"""Does the trust data say when the network is wrong? (issue 13)

Held-out samples of the training distribution (``broad``, seeds never trained on) and samples of
types the network never saw — a uniaxial crystal (a cube of high birefringence), an isotropic
hollow shell and a cholesteric droplet (director twisting along its axis) — are imaged by the
simulator with camera noise and reconstructed by the model with the consistency check. Per sample:
PSNR, the consistency score and its noise floor, and how the per-voxel uncertainty tracks the error
(Spearman correlation over the voxels; mean error in the top tenth of uncertainty over the rest).
The summary gives the ROC AUC of the score for telling the held-out types from the training kind.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/trust.py [--model trained_models/biref_small.h5] \\
        [--per-kind 6] [--views 5] [--out benchmarks/results/trust.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import code_version, machine  # noqa: E402

HELD_OUT = ("crystal", "shell", "cholesteric")
SUPERSAMPLE = 3


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def held_out_sample(kind: str, rng: np.random.Generator, geometry):
    """A sample of a type outside the training distribution, voxel-averaged like the simulator's own."""
    from biref_sdk.samples import Sample
    from biref_sdk.samples.tensor import uniaxial_eps6, voxel_centres_m

    fine = tuple(n * SUPERSAMPLE for n in geometry.volume_shape)
    step = tuple(d / SUPERSAMPLE for d in geometry.voxel_size_m)
    # the fine samples of a voxel sit symmetrically about its centre
    z, y, x = (c.double().numpy() - (SUPERSAMPLE - 1) / 2 * d for c, d in zip(voxel_centres_m(fine, step), step))
    extent = np.asarray(geometry.volume_shape) * np.asarray(geometry.voxel_size_m)  # z, y, x
    points = np.stack(np.meshgrid(x, y, z, indexing="ij"), -1).transpose(2, 1, 0, 3)  # [Z, Y, X, (x, y, z)]
    centre = rng.uniform(-0.15, 0.15, 3) * extent[::-1]
    rotation = _rotation(rng)
    local = (points - centre) @ rotation  # coordinates in the object's frame
    n_m = geometry.medium_index
    ne = np.full(fine, n_m)
    no = np.full(fine, n_m)
    director = np.zeros((3, *fine))
    director[2] = 1.0
    if kind == "crystal":
        half = rng.uniform(0.5e-6, 0.8e-6)
        inside = (np.abs(local) <= half).all(-1)
        ne[inside], no[inside] = rng.uniform(1.59, 1.62), rng.uniform(1.545, 1.555)
        director[:, inside] = rotation[:, 2, None]
    elif kind == "shell":
        outer = rng.uniform(0.9e-6, 1.3e-6)
        r = np.linalg.norm(local, axis=-1)
        inside = (r <= outer) & (r >= outer * rng.uniform(0.6, 0.75))
        ne[inside] = no[inside] = rng.uniform(1.555, 1.575)
    elif kind == "cholesteric":
        radius = rng.uniform(0.9e-6, 1.3e-6)
        pitch = rng.uniform(0.8e-6, 1.6e-6)
        inside = np.linalg.norm(local, axis=-1) <= radius
        ne[inside], no[inside] = rng.uniform(1.60, 1.65), rng.uniform(1.52, 1.53)
        angle = 2 * np.pi * local[..., 2] / pitch
        along = np.stack([np.cos(angle), np.sin(angle), np.zeros_like(angle)], -1) @ rotation.T  # [Z, Y, X, 3]
        director[:, inside] = along[inside].T
    else:
        raise ValueError(kind)
    eps6 = uniaxial_eps6(ne, no, director)
    eps6 = torch.nn.functional.avg_pool3d(eps6[None].double(), SUPERSAMPLE)[0].float()
    return Sample(eps6, geometry.voxel_size_m, n_m, {"category": kind})


def roc_auc(negatives, positives) -> float:
    """P(a positive scores above a negative), ties counted half."""
    negatives, positives = np.asarray(negatives), np.asarray(positives)
    greater = (positives[:, None] > negatives[None, :]).mean()
    ties = (positives[:, None] == negatives[None, :]).mean()
    return float(greater + 0.5 * ties)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a.ravel())).astype(float)
    rb = np.argsort(np.argsort(b.ravel())).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def measure(reconstructor, acquisition, kind: str, seed: int) -> dict:
    from biref_sdk.metrics import psnr

    volume = reconstructor.reconstruct(acquisition)
    truth, c, u = acquisition.truth, volume.consistency, volume.uncertainty
    error = np.abs(volume.ne - truth.ne)
    top = u[0] >= np.quantile(u[0], 0.9)
    sample = (np.abs(truth.ne - truth.medium_index) > 1e-3) | (np.abs(truth.no - truth.medium_index) > 1e-3)
    return {"kind": kind, "seed": seed, "psnr_ne": psnr(truth.ne, volume.ne), "psnr_no": psnr(truth.no, volume.no),
            "score": c.score, "raw_residual": float(np.nanmedian(c.residual)), "noise_floor": c.noise_floor,
            "uncertainty_error_spearman": spearman(u[0], error),
            "error_top_tenth_over_rest": float(error[top].mean() / max(error[~top].mean(), 1e-12)),
            "median_uncertainty_ne": float(np.median(u[0])),
            # in the sample: the uncertainty's size beside the error it should flag
            "sample_uncertainty_ne": float(u[0][sample].mean()),
            "sample_rmse_ne": float(np.sqrt((error[sample] ** 2).mean()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "trained_models" / "biref_small.h5"))
    parser.add_argument("--per-kind", type=int, default=6, help="samples per held-out type (twice as many in-distribution)")
    parser.add_argument("--views", type=int, default=5, help="views of the consistency check")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from biref_sdk.geometry import preset
    from biref_sdk.reconstruction import get_reconstructor
    from biref_sdk.reconstruction.consistency import ConsistencyChecked
    from biref_sdk.simulate import SimulationConfig, Simulator

    load = os.getloadavg()
    g = preset("small")
    simulator = Simulator(g, SimulationConfig(droplets="broad"))
    reconstructor = ConsistencyChecked(get_reconstructor("model", model=args.model, engine="torch"), args.views)
    rows = []
    began = time.perf_counter()
    for i in range(2 * args.per_kind):  # seeds far from those of the training sets
        seed = 7_000_000 + i
        sample = simulator.random_sample(np.random.default_rng(seed))
        rows.append(measure(reconstructor, simulator.acquire(sample, seed=seed),
                            "training kind: " + sample.description.get("category", "?"), seed))
    for kind in HELD_OUT:
        for i in range(args.per_kind):
            seed = 7_100_000 + 1000 * HELD_OUT.index(kind) + i
            sample = held_out_sample(kind, np.random.default_rng(seed), g)
            rows.append(measure(reconstructor, simulator.acquire(sample, seed=seed), kind, seed))
    seconds = time.perf_counter() - began

    inside = [r for r in rows if r["kind"].startswith("training kind")]
    summary = {"in_distribution": _means(inside)}
    for kind in HELD_OUT:
        group = [r for r in rows if r["kind"] == kind]
        summary[kind] = {**_means(group), "auc_score": roc_auc([r["score"] for r in inside], [r["score"] for r in group]),
                         "auc_raw_residual": roc_auc([r["raw_residual"] for r in inside],
                                                     [r["raw_residual"] for r in group])}
    outside = [r for r in rows if not r["kind"].startswith("training kind")]
    summary["all_held_out"] = {**_means(outside),
                               "auc_score": roc_auc([r["score"] for r in inside], [r["score"] for r in outside]),
                               "auc_raw_residual": roc_auc([r["raw_residual"] for r in inside],
                                                           [r["raw_residual"] for r in outside])}
    print(f"{'kind':16s} {'n':>3s} {'PSNR ne':>8s} {'raw r':>7s} {'floor':>7s} {'score':>7s} {'AUC':>5s} "
          f"{'AUC raw':>7s} {'rho(u,err)':>10s} {'top/rest':>8s} {'u sample':>9s} {'rmse smp':>9s}")
    for name, s in summary.items():
        print(f"{name:16s} {s['n']:3d} {s['psnr_ne']:8.2f} {s['raw_residual']:7.3f} {s['noise_floor']:7.3f} "
              f"{s['score']:7.3f} {s.get('auc_score', float('nan')):5.2f} {s.get('auc_raw_residual', float('nan')):7.2f} "
              f"{s['uncertainty_error_spearman']:10.2f} {s['error_top_tenth_over_rest']:8.2f} "
              f"{s['sample_uncertainty_ne']:9.2e} {s['sample_rmse_ne']:9.2e}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"benchmark": "trust", "model": args.model, "views": args.views,
                                        "seconds": seconds, "summary": summary, "samples": rows,
                                        "machine": machine(load), "code": code_version()}, indent=2))


def _means(rows: list[dict]) -> dict:
    keys = ("psnr_ne", "psnr_no", "score", "raw_residual", "noise_floor", "uncertainty_error_spearman",
            "error_top_tenth_over_rest", "median_uncertainty_ne", "sample_uncertainty_ne", "sample_rmse_ne")
    return {"n": len(rows), **{k: float(np.median([r[k] for r in rows])) for k in keys}}


if __name__ == "__main__":
    main()
