"""Exact Mie scattering of a sphere imaged by the geometry's microscope: the independent reference
the simulator is checked against (tests and benchmarks/mie_sweep.py).

The simulator's field is periodic over the camera's field of view (L_x x L_y) and is the forward
field propagated back to the focal plane z = 0 and cut by the objective pupil. The same for a
sphere at the origin: its scattered field is, per camera frequency k_T in the pupil, the plane wave
``c(k) exp(i k . r)`` with ``c = i 2 pi F(k^) / (k_z L_x L_y)`` (Weyl's expansion of the far field
``F(k^) exp(i k r) / r``, sampled on the grid of a periodic array), and
``F = (i / k_m) [S2 (e_par,in . E) e_par,out + S1 (e_perp . E) e_perp]`` (Bohren & Huffman, exp(-i w t)).
"""
from __future__ import annotations

import functools

import numpy as np

from biref_sdk.geometry import Geometry
from biref_sdk.physics import ViewWavevectors, transverse_matrix, input_coefficients


def amplitude_functions(relative_index: float, size_parameter: float, mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bohren & Huffman's S1, S2 (exp(-i w t)) at scattering-angle cosines ``mu``."""
    import miepython

    # miepython's "wiscombe" amplitudes are Bohren & Huffman's complex conjugated (checked against
    # the Rayleigh limit in tests/test_mie_reference.py)
    s1, s2 = miepython.S1_S2(relative_index, size_parameter, np.asarray(mu, dtype=np.float64), norm="wiscombe")
    return np.conj(s1), np.conj(s2)


@functools.lru_cache(maxsize=4)
def wavevectors(geometry: Geometry) -> ViewWavevectors:
    return ViewWavevectors.of(geometry)


def input_vectors(geometry: Geometry) -> np.ndarray:
    """float[2(pol), V, 3]: each input polarization as a 3D unit vector transverse to k_in."""
    inputs = np.einsum("vij,pvj->pvi", transverse_matrix(geometry), input_coefficients(geometry))  # (x, y)
    k_hat = wavevectors(geometry).k_in / geometry.k_medium_per_m
    z = -(inputs[..., 0] * k_hat[None, :, 0] + inputs[..., 1] * k_hat[None, :, 1]) / k_hat[None, :, 2]
    return np.concatenate([inputs, z[..., None]], -1)


def pupil_directions(geometry: Geometry, view: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask [H, W] of the camera frequencies in the pupil, their unit directions k^ [n, 3])."""
    grid = wavevectors(geometry)
    inside = grid.pupil[view] & grid.propagating[view]
    k_out = np.stack([grid.kx[view][inside], grid.ky[view][inside], grid.kz[view][inside]], 1)
    return inside, k_out / geometry.k_medium_per_m


def focal_plane_field(geometry: Geometry, view: int, far: np.ndarray) -> np.ndarray:
    """The pupil-limited field at z = 0, complex[2(x, y), H, W], of a scatterer at the origin whose far
    field is ``far`` [n, 3] (``F`` of ``F exp(i k r) / r`` in the directions of ``pupil_directions``)."""
    g = geometry
    H, W = g.hologram_shape
    grid = wavevectors(g)
    inside, _ = pupil_directions(g, view)
    coeff = 1j * 2 * np.pi * far / (grid.kz[view][inside][:, None] * H * W * g.pixel_size_m**2)
    spectrum = np.zeros((2, H, W), np.complex128)
    spectrum[:, inside] = coeff[:, :2].T
    # sum over plane waves exp(i k_T . r) at the pixel centres (x = (j - W/2) p)
    y, x = g.hologram_coordinates_m()
    phase = np.exp(1j * (grid.k_in[view, 0] * x[None, :] + grid.k_in[view, 1] * y[:, None]))
    shift_y = np.exp(-1j * np.pi * np.fft.fftfreq(H, 1.0 / H).round())[:, None]
    shift_x = np.exp(-1j * np.pi * np.fft.fftfreq(W, 1.0 / W).round())[None, :]
    return np.fft.ifft2(spectrum * shift_y * shift_x) * H * W * phase


def mie_scattered_fields(geometry: Geometry, radius_m: float, index: float) -> np.ndarray:
    """Pupil-limited scattered fields at z = 0, complex[2(pol), V, 2(x, y), H, W], unit illumination."""
    g = geometry
    H, W = g.hologram_shape
    km = g.k_medium_per_m
    inputs = input_vectors(g)
    out = np.zeros((2, g.n_views, 2, H, W), np.complex128)
    for v in range(g.n_views):
        k_in = wavevectors(g).k_in[v] / km
        _, k_out = pupil_directions(g, v)
        mu = np.clip(k_out @ k_in, -1.0, 1.0)
        s1, s2 = amplitude_functions(index / g.medium_index, km * radius_m, mu)
        perp = np.cross(k_in, k_out)
        norm = np.linalg.norm(perp, axis=1, keepdims=True)
        forward = norm[:, 0] < 1e-12
        # the forward direction: any perpendicular (S1 = S2 there)
        perp[forward] = np.cross(k_in, [0.0, 0.0, 1.0] if abs(k_in[2]) < 0.9 else [1.0, 0.0, 0.0])
        perp /= np.linalg.norm(perp, axis=1, keepdims=True)
        par_in = np.cross(perp, k_in)
        par_out = np.cross(perp, k_out)
        for p in range(2):
            e = inputs[p, v]
            far = (1j / km) * (s2[:, None] * (par_in @ e)[:, None] * par_out + s1[:, None] * (perp @ e)[:, None] * perp)
            out[p, v] = focal_plane_field(g, v, far)
    return out


def relative_errors(simulated: np.ndarray, reference: np.ndarray, geometry: Geometry, radius_m: float) -> np.ndarray:
    """Relative L2 error per view [V] of scattered fields [2, V, 2, H, W] within 1.5 radii of the centre."""
    y, x = geometry.hologram_coordinates_m()
    disc = (x[None, :] ** 2 + y[:, None] ** 2) <= (1.5 * radius_m) ** 2
    diff = np.abs(simulated - reference)[..., disc] ** 2
    ref = np.abs(reference)[..., disc] ** 2
    return np.sqrt(diff.sum((0, 2, 3)) / ref.sum((0, 2, 3)))
