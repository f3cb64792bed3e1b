"""The shared optics of every view, one definition for the simulator and the reconstruction: the
polarization basis, the transverse projection and the wavevector grids of the camera's spectrum.

Polarization basis of view ``v``: ``k_hat`` the illumination direction, ``u1`` = x^ projected
perpendicular to ``k_hat`` (the geometry's first input polarization), ``u2 = k_hat x u1``. The
transverse (x, y) components of a field with coefficients (A1, A2) in that basis are
``T @ (A1, A2)``, ``T = [[u1_x, u2_x], [u1_y, u2_y]]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..geometry import Geometry


def polarization_basis(geometry: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(k_hat, u1, u2) float[V, 3]: illumination directions and the orthonormal polarization basis."""
    k_hat = geometry.illumination_directions()
    u1 = geometry.input_polarizations()[0]
    u2 = np.cross(k_hat, u1)
    return k_hat, u1, u2


def input_coefficients(geometry: Geometry) -> np.ndarray:
    """float[2(pol), V, 2]: each input polarization in the (u1, u2) basis."""
    _, u1, u2 = polarization_basis(geometry)
    pol = geometry.input_polarizations()
    return np.stack([np.stack([np.sum(pol[p] * u1, 1), np.sum(pol[p] * u2, 1)], 1) for p in range(2)])


def transverse_matrix(geometry: Geometry) -> np.ndarray:
    """T float[V, 2, 2] mapping (u1, u2) coefficients to (x, y) field components."""
    _, u1, u2 = polarization_basis(geometry)
    return np.stack([np.stack([u1[:, 0], u2[:, 0]], 1), np.stack([u1[:, 1], u2[:, 1]], 1)], 1)


def quadratic_form_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """c [V, 6] with ``a^T S b = c . s6`` for a symmetric tensor ``s6`` (xx, yy, zz, xy, xz, yz)."""
    return np.stack([a[:, 0] * b[:, 0], a[:, 1] * b[:, 1], a[:, 2] * b[:, 2],
                     a[:, 0] * b[:, 1] + a[:, 1] * b[:, 0], a[:, 0] * b[:, 2] + a[:, 2] * b[:, 0],
                     a[:, 1] * b[:, 2] + a[:, 2] * b[:, 1]], axis=1)


@dataclass(frozen=True)
class ViewWavevectors:
    """Wavevectors (rad/m) of every view's plane-wave components, float64 [V, h, w].

    Component (i, j) of view ``v`` on a grid of h x w frequencies at the camera's spacing
    (2 pi / (W p) in x, 2 pi / (H p) in y; indices in FFT order) has
    ``k_T = k_in,T + 2 pi (m_x / (W p), m_y / (H p))`` and ``k_z = sqrt(k_m^2 - |k_T|^2)`` (zero where
    evanescent). ``propagating`` marks ``|k_T| < k_m``, ``pupil`` the objective's ``|k_T| <= k0 NA``.
    """

    kx: np.ndarray
    ky: np.ndarray
    kz: np.ndarray
    k_in: np.ndarray        # [V, 3] the illumination wavevectors
    propagating: np.ndarray
    pupil: np.ndarray

    @classmethod
    def of(cls, geometry: Geometry, shape: tuple[int, int] | None = None) -> "ViewWavevectors":
        """The grid of ``shape`` (h, w) frequencies, the camera's full grid by default."""
        H, W = geometry.hologram_shape
        h, w = shape or (H, W)
        p = geometry.pixel_size_m
        km = geometry.k_medium_per_m
        my = np.fft.fftfreq(h, 1.0 / h).round()
        mx = np.fft.fftfreq(w, 1.0 / w).round()
        k_in = geometry.illumination_directions() * km
        kx = k_in[:, 0, None, None] + (2 * math.pi / (W * p)) * mx[None, None, :]
        ky = k_in[:, 1, None, None] + (2 * math.pi / (H * p)) * my[None, :, None]
        kx, ky = np.broadcast_to(kx, (len(k_in), h, w)), np.broadcast_to(ky, (len(k_in), h, w))
        kt2 = kx**2 + ky**2
        return cls(kx=kx, ky=ky, kz=np.sqrt(np.maximum(km**2 - kt2, 0.0)), k_in=k_in,
                   propagating=kt2 < km**2, pupil=kt2 <= (geometry.k0_per_m * geometry.na_objective) ** 2)
