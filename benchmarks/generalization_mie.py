"""The same samples imaged by independent physics and by the SDK's simulator, reconstructed by the
formula and by models: does a model do as well on the independent physics as on the simulator it
was trained on? Isotropic spheres by exact Mie scattering (tests/mie_reference.py); with ``--lc``
also liquid-crystal droplets by the discrete dipole approximation (tests/dda_reference.py, 33 nm
lattice: 0.4-0.6 % from exact Mie; a few minutes per droplet).

    python benchmarks/generalization_mie.py --model shipped=trained_models/biref_small.h5 \\
        [--model new=run/best.h5] [--lc] [--no-spheres] [--out benchmarks/results/generalization_mie.json]

Both acquisitions are noise-free float frames of the hologram model (``holography.intensity`` of
illumination + field), so the physics is the only difference; the truth of both is the simulator's
voxel-averaged sample. Needs the test dependencies miepython and scipy.
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
from _common import add_refine_arguments, code_version, machine, refined_variants  # noqa: E402

# (radius in m, index): the sphere, small and large, and one below the LC's n_o range
SPHERES = ((0.9e-6, 1.552), (0.6e-6, 1.545), (1.2e-6, 1.560), (0.9e-6, 1.5415))


# liquid-crystal droplets for --lc (n_m 1.54): radial, bipolar along z and along a tilted axis
LC_DROPLETS = (("radial", (0.0, 0.0, 1.0), 1.565, 1.548), ("bipolar", (0.0, 0.0, 1.0), 1.565, 1.548),
               ("bipolar", (1.0, 1.0, 1.0), 1.562, 1.546))
LC_RADIUS_M = 0.7e-6


def acquisitions(sample, reference_name: str, scattered) -> dict:
    """Noise-free acquisitions of ``sample`` by the simulator and by independent physics whose
    pupil-limited scattered fields are ``scattered`` [2, V, 2, H, W]."""
    import torch

    from biref_sdk.files import Acquisition
    from biref_sdk.geometry import preset
    from biref_sdk.holography import intensity
    from biref_sdk.simulate import Simulator

    g = preset("small")
    simulator = Simulator(g)
    illumination = simulator.background_fields()
    background = intensity(illumination, g).numpy()
    reference = illumination.to(torch.complex128) + torch.from_numpy(scattered)
    made = {reference_name: intensity(reference, g).numpy(), "simulator": intensity(simulator.fields(sample), g).numpy()}
    return {name: Acquisition(holograms=frames, background=background, geometry=g, truth=sample.truth(),
                              parameters={"physics": name}) for name, frames in made.items()}


def sphere_acquisitions(radius_m: float, index: float) -> dict:
    from biref_sdk.geometry import preset
    from biref_sdk.samples import sphere_sample
    from mie_reference import mie_scattered_fields

    g = preset("small")
    return acquisitions(sphere_sample(g, radius_m, index), "exact Mie", mie_scattered_fields(g, radius_m, index))


def droplet_acquisitions(configuration: str, axis, ne: float, no: float) -> dict:
    from biref_sdk.geometry import preset
    from biref_sdk.samples import droplet_sample
    from biref_sdk.samples.droplets import Droplet
    from dda_reference import dda_scattered_fields, droplet_lattice

    g = preset("small")
    droplet = Droplet((0.0, 0.0, 0.0), LC_RADIUS_M, axis, configuration, ne, no)
    lattice = droplet_lattice(droplet, 33.3e-9, g.medium_index, g.wavelength_m)
    return acquisitions(droplet_sample([droplet], g), "dipole (DDA)", dda_scattered_fields(g, lattice, range(g.n_views)))


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
    parser.add_argument("--lc", action="store_true", help="also liquid-crystal droplets by the dipole reference")
    parser.add_argument("--no-spheres", action="store_true", help="skip the Mie spheres")
    add_refine_arguments(parser)
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
        methods.update(refined_variants(name, methods[name], args))
    rows = []
    print("| sample | method | physics | PSNR n_e / n_o (dB) | core n_e / n_o | isotropic core abs(n_e − n_o) "
          "| director error (deg) |")
    print("|---|---|---|---|---|---|---|")
    samples = [] if args.no_spheres else [(f"sphere r {r * 1e6:.1f} µm, n {n}", r, {"radius_m": r, "index": n},
                                           lambda r=r, n=n: sphere_acquisitions(r, n)) for r, n in SPHERES]
    if args.lc:
        samples += [(f"{c} axis {tuple(round(a, 2) for a in axis)}, r {LC_RADIUS_M * 1e6:.1f} µm", LC_RADIUS_M,
                     {"configuration": c, "axis": axis, "ne": ne, "no": no},
                     lambda c=c, axis=axis, ne=ne, no=no: droplet_acquisitions(c, axis, ne, no))
                    for c, axis, ne, no in LC_DROPLETS]
    for label, radius_m, description, make in samples:
        made = make()
        for method, reconstructor in methods.items():
            for physics, acquisition in made.items():
                volume = reconstructor.reconstruct(acquisition)
                scores = compare_volumes(acquisition.truth, volume)
                core_ne, core_no = core_means(volume, acquisition.truth, radius_m)
                row = {"sample": label, **description, "method": method, "physics": physics,
                       "core_ne": core_ne, "core_no": core_no, **scores}
                rows.append(row)
                print(f"| {label} | {method} | {physics} | {scores['psnr_ne']:.2f} / {scores['psnr_no']:.2f} | "
                      f"{core_ne:.4f} / {core_no:.4f} | {scores['isotropic_core_birefringence']:.4f} | "
                      f"{scores['director_error_deg']:.1f} |", flush=True)
    if args.out:
        clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in rows]
        Path(args.out).write_text(json.dumps({"rows": clean, "models": dict(s.partition("=")[::2] for s in args.model),
                                              "machine": machine(load_before), "code": code_version()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
