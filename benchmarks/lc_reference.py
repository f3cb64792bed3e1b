"""The simulator against an independent method on liquid-crystal droplets (issue 12): the discrete
dipole approximation (tests/dda_reference.py, an exact volume-integral solution on a fine lattice),
first checked against exact Mie scattering at the same lattice spacing.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/lc_reference.py [--spacing-nm 33.3] [--views all] \\
        [--out benchmarks/results/lc_reference.json]

Relative L2 of the scattered field within 1.5 radii (``mie_reference.relative_errors``), noise-free,
`small` preset, per view (both input polarizations together).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from _common import code_version, machine  # noqa: E402


def droplets():
    from biref_sdk.samples.droplets import Droplet

    tilted = tuple(np.array([1.0, 1.0, 1.0]) / np.sqrt(3))
    return {
        "sphere n 1.552 (vs exact Mie)": Droplet((0, 0, 0), 0.6e-6, (0, 0, 1), "uniform", 1.552, 1.552),
        "radial R 0.6": Droplet((0, 0, 0), 0.6e-6, (0, 0, 1), "radial", 1.57, 1.55),
        "bipolar axis z R 0.6": Droplet((0, 0, 0), 0.6e-6, (0, 0, 1), "bipolar", 1.57, 1.55),
        "bipolar axis x R 0.6": Droplet((0, 0, 0), 0.6e-6, (1, 0, 0), "bipolar", 1.57, 1.55),
        "bipolar axis (1,1,1) R 0.6": Droplet((0, 0, 0), 0.6e-6, tilted, "bipolar", 1.565, 1.548),
        "twisted bipolar axis (1,1,1) R 0.6": Droplet((0, 0, 0), 0.6e-6, tilted, "twisted_bipolar", 1.565, 1.548,
                                                      twist_rad=1.2),
        "preradial R 0.6": Droplet((0, 0, 0), 0.6e-6, (1, 0, 1), "preradial", 1.57, 1.55, defect_offset=0.5),
        "radial R 0.9": Droplet((0, 0, 0), 0.9e-6, (0, 0, 1), "radial", 1.565, 1.55),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spacing-nm", type=float, default=33.3)
    parser.add_argument("--views", default="all", help="'all' or a comma-separated list of view indices")
    parser.add_argument("--only", help="run only the droplets whose name contains this")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from biref_sdk.geometry import preset
    from biref_sdk.samples import droplet_sample
    from biref_sdk.simulate import Simulator
    from dda_reference import dda_scattered_fields, droplet_lattice
    from mie_reference import mie_scattered_fields, relative_errors

    load = os.getloadavg()
    g = preset("small")
    views = list(range(g.n_views)) if args.views == "all" else [int(v) for v in args.views.split(",")]
    sub = g.replace(illumination_sines=g.sines[views])
    simulator = Simulator(sub)
    spacing = args.spacing_nm * 1e-9
    results = {}
    for name, droplet in droplets().items():
        if args.only and args.only not in name:
            continue
        began = time.perf_counter()
        lattice = droplet_lattice(droplet, spacing, g.medium_index, g.wavelength_m)
        reference = dda_scattered_fields(sub, lattice, range(len(views)))
        simulated = (simulator.fields(droplet_sample([droplet], g)) - simulator.background_fields()).numpy()
        row = {"simulator_vs_dda": relative_errors(simulated, reference, sub, droplet.radius_m).tolist(),
               "dipoles": len(lattice.points_m), "seconds": time.perf_counter() - began}
        if droplet.configuration == "uniform":
            mie = mie_scattered_fields(sub, droplet.radius_m, droplet.ne)
            row["dda_vs_mie"] = relative_errors(reference, mie, sub, droplet.radius_m).tolist()
            row["simulator_vs_mie"] = relative_errors(simulated, mie, sub, droplet.radius_m).tolist()
        results[name] = row
        summary = {k: f"axial {100 * v[0]:.2f} %, worst {100 * max(v):.2f} %" for k, v in row.items()
                   if isinstance(v, list)}
        print(f"{name}: {summary} ({row['dipoles']} dipoles, {row['seconds']:.0f} s)", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"benchmark": "lc_reference", "spacing_m": spacing, "views": views,
                                        "results": results, "machine": machine(load), "code": code_version()},
                                       indent=2))


if __name__ == "__main__":
    main()
