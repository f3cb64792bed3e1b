"""Forward-pass time of the paper's network per size, whole and stage by stage (CPU by default).

    python benchmarks/bench_network.py [--sizes small paper] [--repeats 5] [--threads 1] [--json out.json]

Sizes: ``small`` = the shipped configuration (small preset, field input, small widths);
``paper`` = the paper's shapes (512x512 holograms, 192-channel 16x16 features, 512-channel hidden
state, 80x332x332 volume). Random weights and inputs: the time does not depend on their values.
Preprocessing (demodulation) is timed separately per view. Prints a table of medians and saves
the raw timings as JSON.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch

from biref_sdk.geometry import preset
from biref_sdk.network import BirefNet, InputPreprocessor, config_for_geometry

from _common import save_json  # benchmarks/ is on the path when run as a script

SIZES = {
    "small": lambda: (preset("small"), config_for_geometry(preset("small"), "small")),
    "paper": lambda: (preset("paper"), config_for_geometry(preset("paper"), "paper", input_mode="hologram")),
}


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


@torch.no_grad()
def bench(size: str, repeats: int) -> dict:
    geometry, config = SIZES[size]()
    torch.manual_seed(0)
    network = BirefNet(config).eval()
    parameters = sum(p.numel() for p in network.parameters())
    windows = torch.randn(1, config.sequence_length, config.input_channels, 1, *config.input_shape)
    rng = np.random.default_rng(0)
    frames = rng.poisson(3000, size=(2, geometry.n_views, *geometry.hologram_shape)).astype(np.uint16)
    preprocessor = InputPreprocessor(config, geometry, frames)
    features = network.encode(windows[:, 0])
    hidden = network.initial_hidden(1)
    states = torch.stack([hidden] * config.sequence_length, dim=1)
    network(windows)  # warm-up (allocations, kernel selection)
    result = {
        "size": size, "parameters": parameters, "sequence_length": config.sequence_length,
        "input_shape": list(config.input_shape), "volume_shape": list(config.volume_shape),
        "preprocess_view_s": _timed(lambda: preprocessor.view(0, 1, frames[0, 1]), repeats),
        "encode_window_s": _timed(lambda: network.encode(windows[:, 0]), repeats),
        "gru_step_s": _timed(lambda: network.gru_step(hidden, features), repeats),
        "finalize_s": _timed(lambda: network.finalize(states), repeats),
        "forward_s": _timed(lambda: network(windows), repeats),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["small", "paper"], choices=sorted(SIZES))
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per stage (paper: use 1-2)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", default="benchmarks/results/network.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = []
    for size in args.sizes:
        results.append(bench(size, args.repeats))
    header = (f"{'size':6} {'params':>11} {'S':>3} {'prep/view s':>11} {'encode s':>9} {'gru s':>8} "
              f"{'finalize s':>10} {'forward s':>9}")
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); medians of {args.repeats}")
    print(header)
    for r in results:
        med = {k: statistics.median(v) for k, v in r.items() if k.endswith("_s")}
        print(f"{r['size']:6} {r['parameters']:>11,} {r['sequence_length']:>3} {med['preprocess_view_s']:>11.4f} "
              f"{med['encode_window_s']:>9.4f} {med['gru_step_s']:>8.4f} {med['finalize_s']:>10.3f} "
              f"{med['forward_s']:>9.3f}")
    path = save_json(args.json, {"arguments": vars(args), "results": results}, load_before)
    print(f"load average before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f}; saved {path}")


if __name__ == "__main__":
    main()
