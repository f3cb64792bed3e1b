"""The same isotropic spheres imaged by exact Mie scattering (independent physics) and by the SDK's
simulator, reconstructed by the formula and by models: does a model do as well on the independent
physics as on the simulator it was trained on?

    python benchmarks/generalization_mie.py --model shipped=trained_models/biref_small.h5 \\
        [--model new=run/best.h5] [--out benchmarks/results/generalization_mie.json]

Both acquisitions are noise-free float frames of the hologram model (``holography.intensity`` of
illumination + field), so the physics is the only difference; the truth of both is the simulator's
voxel-averaged sphere. Needs the test dependency miepython (tests/mie_reference.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from _common import code_version, machine  # noqa: E402

# (radius in m, index): the sphere, small and large, and one below the LC's n_o range
SPHERES = ((0.9e-6, 1.552), (0.6e-6, 1.545), (1.2e-6, 1.560), (0.9e-6, 1.5415))


def acquisitions(radius_m: float, index: float):
    import torch

    from biref_sdk.files import Acquisition
    from biref_sdk.geometry import preset
    from biref_sdk.holography import intensity
    from biref_sdk.samples import sphere_sample
    from biref_sdk.simulate import Simulator
    from mie_reference import mie_scattered_fields

    g = preset("small")
    simulator = Simulator(g)
    sample = sphere_sample(g, radius_m, index)
    truth = sample.truth()
    illumination = simulator.background_fields()
    background = intensity(illumination, g).numpy()
    mie = illumination.to(torch.complex128) + torch.from_numpy(mie_scattered_fields(g, radius_m, index))
    made = {"exact Mie": intensity(mie, g).numpy(), "simulator": intensity(simulator.fields(sample), g).numpy()}
    return {name: Acquisition(holograms=frames, background=background, geometry=g, truth=truth,
                              parameters={"sphere_radius_m": radius_m, "sphere_index": index, "physics": name})
            for name, frames in made.items()}


def core_means(volume, truth, radius_m: float):
    import numpy as np

    shape = np.shape(truth.ne)
    dz, dy, dx = truth.voxel_size_m
    grids = [(np.arange(n) - n / 2) * d for n, d in zip(shape, (dz, dy, dx))]
    r = np.sqrt(grids[0][:, None, None] ** 2 + grids[1][None, :, None] ** 2 + grids[2][None, None, :] ** 2)
    core = r <= radius_m / 2
    return float(np.asarray(volume.ne)[core].mean()), float(np.asarray(volume.no)[core].mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], metavar="NAME=FILE")
    parser.add_argument("--out")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from biref_sdk.metrics import compare_volumes
    from biref_sdk.reconstruction import get_reconstructor

    load_before = os.getloadavg()
    methods = {"formula": get_reconstructor("formula")}
    for spec in args.model:
        name, _, path = spec.partition("=")
        methods[name] = get_reconstructor("model", model=path)
    rows = []
    print("| sphere | method | physics | PSNR n_e / n_o (dB) | core n_e / n_o | isotropic core abs(n_e − n_o) |")
    print("|---|---|---|---|---|---|")
    for radius_m, index in SPHERES:
        made = acquisitions(radius_m, index)
        for method, reconstructor in methods.items():
            for physics, acquisition in made.items():
                volume = reconstructor.reconstruct(acquisition)
                scores = compare_volumes(acquisition.truth, volume)
                core_ne, core_no = core_means(volume, acquisition.truth, radius_m)
                row = {"radius_m": radius_m, "index": index, "method": method, "physics": physics,
                       "core_ne": core_ne, "core_no": core_no, **scores}
                rows.append(row)
                print(f"| r {radius_m * 1e6:.1f} µm, n {index} | {method} | {physics} | {scores['psnr_ne']:.2f} / "
                      f"{scores['psnr_no']:.2f} | {core_ne:.4f} / {core_no:.4f} | "
                      f"{scores['isotropic_core_birefringence']:.4f} |", flush=True)
    if args.out:
        clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in rows]
        Path(args.out).write_text(json.dumps({"rows": clean, "models": dict(s.partition("=")[::2] for s in args.model),
                                              "machine": machine(load_before), "code": code_version()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
