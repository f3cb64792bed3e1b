"""Seconds per reconstructed sample of the formula DTT reconstruction, per preset, with its stages.

    python benchmarks/bench_formula.py [--presets small paper] [--repeats 3] [--threads 2] [--device cpu]
                                       [--option KEY=VALUE ...] [--sample empty|droplet] [--json out.json]

For each preset one reconstructor serves ``--repeats`` acquisitions of one geometry and one
background, as an instrument does: the first (``cold``) call also builds the geometry's tables
and demodulates the background; the table gives the median of the warm calls, split into the
views (demodulation, Jones logarithm, Fourier accumulation: the part the streaming runtime
overlaps with the acquisition) and finalize (per-frequency solve, transform onto the volume grid
with the constraint step, eigen-decomposition).

The holograms are simulated (``biref_sdk.simulate``). ``--sample empty`` (default) images the
empty field of view with fresh camera noise: every stage of the reconstruction is a fixed-size
transform, so its cost does not depend on what is imaged, and the paper-size simulation of a
droplet needs more memory (about 15 GB) than a shared machine has. ``--sample droplet`` images
a random droplet instead.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from biref_sdk.cli.reconstruct import parse_options
from biref_sdk.files import Acquisition
from biref_sdk.geometry import preset
from biref_sdk.reconstruction import get_reconstructor
from biref_sdk.simulate import Simulator

from _common import save_json  # benchmarks/ is on the path when run as a script

STAGES = ("views_s", "solve_s", "constraint_s", "eigen_s", "total_s")


def acquisitions(name: str, n: int, sample: str):
    """``n`` acquisitions of one preset sharing one background."""
    simulator = Simulator(preset(name))
    background = simulator.background(seed=0)
    for seed in range(1, n + 1):
        if sample == "droplet":
            frames = simulator.frames(simulator.random_sample(np.random.default_rng(seed)), seed=seed)
        else:
            frames = simulator.background(seed=seed)
        yield Acquisition(holograms=frames, background=background, geometry=simulator.geometry)


def time_reconstruction(reconstructor, acquisition: Acquisition, device: str) -> dict:
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    sync()
    start = time.perf_counter()
    volume = reconstructor.reconstruct(acquisition)
    sync()
    total = time.perf_counter() - start
    p = volume.parameters
    return {"views_s": p["seconds_views"], "solve_s": p["seconds_solve"], "constraint_s": p["seconds_constraint"],
            "eigen_s": p["seconds_eigen"], "total_s": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["small", "paper"])
    parser.add_argument("--repeats", type=int, default=3, help="warm reconstructions per preset (after the cold one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--option", action="append", metavar="KEY=VALUE",
                        help="a FormulaOptions field, e.g. constraint_iterations=0; repeatable")
    parser.add_argument("--sample", choices=("empty", "droplet"), default="empty",
                        help="what the timed holograms image (default: the empty field of view)")
    parser.add_argument("--json", default="benchmarks/results/formula.json")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    options = parse_options(args.option, ["formula"])["formula"]

    load_before = os.getloadavg()
    results = {"device": args.device, "arguments": vars(args), "sample": args.sample, "options": options,
               "presets": {}}
    for name in args.presets:
        reconstructor = get_reconstructor("formula", device=args.device, **options)
        runs = [time_reconstruction(reconstructor, acquisition, args.device)
                for acquisition in acquisitions(name, args.repeats + 1, args.sample)]
        cold, warm = runs[0], runs[1:]
        results["presets"][name] = {"cold": cold, "warm": warm, "options": reconstructor.parameters()["options"],
                                    **{f"median_{k}": statistics.median(r[k] for r in warm) for k in STAGES}}

    print(f"formula reconstruction, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"sample {args.sample}, options {options or 'defaults'}")
    print(f"{'preset':8s} {'n':>3s} {'cold s':>8s} {'views s':>8s} {'solve s':>8s} {'volume+constraint s':>20s} "
          f"{'eigen s':>8s} {'s/sample':>9s}")
    for name, r in results["presets"].items():
        print(f"{name:8s} {len(r['warm']):3d} {r['cold']['total_s']:8.2f} {r['median_views_s']:8.2f} "
              f"{r['median_solve_s']:8.2f} {r['median_constraint_s']:20.2f} {r['median_eigen_s']:8.2f} "
              f"{r['median_total_s']:9.2f}")
    path = save_json(args.json, results, load_before)
    print(f"load average before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f}; saved {path}")


if __name__ == "__main__":
    main()
