"""The simulator against exact Mie scattering: relative L2 error of the scattered field within 1.5
radii of isotropic spheres, per view class (axial, ring median, ring worst), across index contrast
and radius.

    python benchmarks/mie_sweep.py [--preset small] [--json out.json]

Needs the ``test`` extra (miepython). The simulation is noise-free and demodulated like a real
acquisition (sample minus background fields); the reference is tests/mie_reference.py.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from biref_sdk.geometry import preset
from biref_sdk.holography import demodulate, intensity
from biref_sdk.samples import sphere_sample
from biref_sdk.simulate import Simulator

from _common import save_json  # benchmarks/ is on the path when run as a script

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from mie_reference import mie_scattered_fields, relative_errors  # noqa: E402

# (sphere index, radius): the sphere, then contrast up to 0.03 and radii up to 1.2 um in n_m = 1.54
SPHERES = [(1.552, 0.9e-6), (1.545, 0.6e-6), (1.57, 0.6e-6), (1.57, 0.9e-6), (1.555, 1.2e-6), (1.57, 1.2e-6)]


def sphere_errors(simulator: Simulator, radius_m: float, index: float) -> np.ndarray:
    g = simulator.geometry
    fields = simulator.fields(sphere_sample(g, radius_m, index))
    scattered = demodulate(intensity(fields, g), g) - demodulate(intensity(simulator.background_fields(), g), g)
    return relative_errors(scattered.numpy(), mie_scattered_fields(g, radius_m, index), g, radius_m)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--json", default="benchmarks/results/mie_sweep.json")
    args = parser.parse_args()
    load = os.getloadavg()
    g = preset(args.preset)
    simulator = Simulator(g)
    rows = []
    print(f"{'index':>7} {'radius um':>9} {'axial %':>8} {'ring median %':>14} {'ring worst %':>13} {'s':>6}")
    for index, radius in SPHERES:
        t0 = time.perf_counter()
        errors = sphere_errors(simulator, radius, index)
        ring = errors[1:]
        row = {"index": index, "medium_index": g.medium_index, "radius_m": radius, "axial": float(errors[0]),
               "ring_median": float(np.median(ring)), "ring_worst": float(ring.max()),
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"{index:7.3f} {radius * 1e6:9.2f} {100 * row['axial']:8.2f} {100 * row['ring_median']:14.2f} "
              f"{100 * row['ring_worst']:13.2f} {row['seconds']:6.1f}")
    print("saved", save_json(args.json, {"preset": args.preset, "spheres": rows}, load))


if __name__ == "__main__":
    main()
