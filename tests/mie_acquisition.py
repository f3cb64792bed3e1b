"""Exact-Mie acquisitions of a weak isotropic sphere in geometries that are not presets (issue 15),
written per docs/formats.md, and the figures the formula is judged by: centre n_e/n_o, background
and the excess index integral against the truth.

The frames follow the hologram model of holography.py: |E + references|^2 summed over the x and y
components, with E = illumination + exact Mie scattered field (tests/mie_reference.py); the
background is the same without the sphere. Noise-free float32 frames (allowed by docs/formats.md).
"""
from __future__ import annotations

import numpy as np
import torch

from biref_sdk.files import Acquisition, Volume
from biref_sdk.geometry import Geometry, ring_illumination_sines
from biref_sdk.holography import intensity
from biref_sdk.simulate import Simulator

from mie_reference import mie_scattered_fields


def _geometry(wavelength_m, medium_index, na, pixel_m, shape, n_views, na_ill, carriers, volume_shape, voxel_m):
    return Geometry(wavelength_m=wavelength_m, medium_index=medium_index, na_objective=na, pixel_size_m=pixel_m,
                    illumination_sines=ring_illumination_sines(n_views, na_ill, medium_index),
                    reference_carriers=carriers, hologram_shape=shape, volume_shape=volume_shape,
                    voxel_size_m=voxel_m)


# name: (geometry, sphere radius, sphere index); no sine or carrier is on the FFT grid
CASES = {
    # the issue's: 192 x 192 frames of 60 nm, NA 0.9, 37 views at illumination NA 0.6
    "issue": (_geometry(532e-9, 1.54, 0.9, 60e-9, (192, 192), 37, 0.6, ((0.3317, 0.1183), (-0.1203, 0.3391)),
                        (40, 96, 96), (150e-9, 120e-9, 120e-9)), 1.0e-6, 1.555),
    # water immersion at 633 nm, 150 x 150 frames (not a power of two), 25 views
    "water633": (_geometry(633e-9, 1.33, 1.1, 80e-9, (150, 150), 25, 0.8, ((0.3551, 0.2617), (-0.2583, 0.3537)),
                           (30, 72, 72), (200e-9, 160e-9, 160e-9)), 1.2e-6, 1.345),
    # oil at 488 nm, NA 1.3, non-square 160 x 200 frames, 13 views
    "oil488": (_geometry(488e-9, 1.518, 1.3, 45e-9, (160, 200), 13, 1.0, ((0.3697, 0.0731), (-0.0689, 0.3713)),
                         (24, 64, 80), (120e-9, 100e-9, 100e-9)), 0.8e-6, 1.533),
}


def sphere_truth(g: Geometry, radius_m: float, index: float) -> Volume:
    z, y, x = g.volume_coordinates_m()
    inside = (z[:, None, None] ** 2 + y[None, :, None] ** 2 + x[None, None, :] ** 2) <= radius_m**2
    n = np.where(inside, index, g.medium_index).astype(np.float32)
    director = np.zeros((3, *n.shape), np.float32)
    director[2] = 1.0
    return Volume(ne=n, no=n.copy(), director=director, voxel_size_m=g.voxel_size_m, medium_index=g.medium_index)


def mie_acquisition(name: str) -> Acquisition:
    g, radius_m, index = CASES[name]
    illumination = Simulator(g).background_fields().to(torch.complex128)
    scattered = torch.from_numpy(mie_scattered_fields(g, radius_m, index))
    holograms = intensity(illumination + scattered, g).numpy()
    background = intensity(illumination, g).numpy()
    return Acquisition(holograms=holograms, background=background, geometry=g,
                       truth=sphere_truth(g, radius_m, index),
                       parameters={"sample": f"Mie sphere r={radius_m} n={index}", "case": name})


def sphere_figures(volume: Volume, g: Geometry, radius_m: float, index: float) -> dict:
    """Centre n_e / n_o (mean over the voxels within r/3), background (median beyond 1.5 r) and
    the excess of the mean index integrated over the volume / the sphere's (4/3 pi r^3 (n - n_m))."""
    z, y, x = g.volume_coordinates_m()
    r = np.sqrt(z[:, None, None] ** 2 + y[None, :, None] ** 2 + x[None, None, :] ** 2)
    ne, no = np.asarray(volume.ne, float), np.asarray(volume.no, float)
    background = float(np.median(((ne + no) / 2)[r > 1.5 * radius_m]))
    excess = float((((ne + no) / 2) - g.medium_index).sum() * np.prod(g.voxel_size_m))
    truth = 4 / 3 * np.pi * radius_m**3 * (index - g.medium_index)
    centre = r <= radius_m / 3
    return {"centre_ne": float(ne[centre].mean()), "centre_no": float(no[centre].mean()),
            "background": background, "excess_ratio": excess / truth}


if __name__ == "__main__":
    import sys

    from biref_sdk.files import write_acquisition

    for case in sys.argv[2:] or CASES:
        write_acquisition(f"{sys.argv[1]}/mie_{case}.h5", mie_acquisition(case))
        print(f"wrote {sys.argv[1]}/mie_{case}.h5")
