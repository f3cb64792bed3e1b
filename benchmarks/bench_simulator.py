"""Seconds per simulated sample (random droplet -> tensor -> fields -> noisy frames) per preset.

    python benchmarks/bench_simulator.py [--presets small paper] [--repeats 5] [--device cpu] [--json out.json]
                                         [--compare-jones]

``--compare-jones`` also times the plain Jones multi-slice (``vector_scattering=False``), the model
before the high-NA vector correction, alternating samples with the default so both see the same load.

Prints a table of medians and saves the raw timings as JSON.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from biref_sdk.geometry import preset
from biref_sdk.simulate import SimulationConfig, Simulator

from _common import save_json  # benchmarks/ is on the path when run as a script


def time_sample(simulator: Simulator, seed: int, device: str) -> dict:
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    sample = simulator.random_sample(np.random.default_rng(seed))
    sync()
    t1 = time.perf_counter()
    frames = simulator.frames(sample, seed)
    sync()
    t2 = time.perf_counter()
    sample.truth()
    t3 = time.perf_counter()
    return {"sample_s": t1 - t0, "frames_s": t2 - t1, "truth_s": t3 - t2, "total_s": t3 - t0,
            "frames_shape": list(frames.shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["small", "paper"])
    parser.add_argument("--repeats", type=int, default=5, help="samples per preset (paper: at most 3)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", default="benchmarks/results/simulator.json")
    parser.add_argument("--compare-jones", action="store_true", help="also time the plain Jones multi-slice")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    results = {"device": args.device, "arguments": vars(args), "presets": {}}
    models = {"": SimulationConfig()}
    if args.compare_jones:
        models["/jones"] = SimulationConfig(vector_scattering=False)
    for name in args.presets:
        simulators = {tag: Simulator(preset(name), config, device=args.device) for tag, config in models.items()}
        for simulator in simulators.values():
            time_sample(simulator, 999, args.device)  # warm-up: kernels, allocator, caches
        repeats = min(args.repeats, 3) if name == "paper" else args.repeats
        runs = {tag: [] for tag in simulators}
        for seed in range(repeats):  # alternating, so both models see the same load
            for tag, simulator in simulators.items():
                runs[tag].append(time_sample(simulator, seed, args.device))
        for tag, model_runs in runs.items():
            results["presets"][name + tag] = {
                "runs": model_runs, **{f"median_{k}": statistics.median(r[k] for r in model_runs)
                                       for k in ("sample_s", "frames_s", "truth_s", "total_s")}}
    print(f"device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"{'preset':8s} {'n':>3s} {'tensor s':>9s} {'fields+camera s':>16s} {'truth s':>8s} {'total s/sample':>15s}")
    for name, r in results["presets"].items():
        print(f"{name:8s} {len(r['runs']):3d} {r['median_sample_s']:9.3f} {r['median_frames_s']:16.3f} "
              f"{r['median_truth_s']:8.3f} {r['median_total_s']:15.3f}")
    for name in args.presets:
        if name + "/jones" in results["presets"]:
            ratio = results["presets"][name]["median_total_s"] / results["presets"][name + "/jones"]["median_total_s"]
            print(f"{name}: vector / jones time ratio {ratio:.2f}")
    path = save_json(args.json, results, load_before)
    print(f"load average before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f}; saved {path}")


if __name__ == "__main__":
    main()
