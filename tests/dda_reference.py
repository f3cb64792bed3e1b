"""An independent reference for anisotropic particles: the discrete dipole approximation (DDA), an
exact solution of Maxwell's volume integral equation in the limit of a fine lattice, imaged by the
geometry's microscope (tests of the simulator on liquid-crystal droplets, issue 12).

Nothing here shares the simulator's physics (no slices, no paraxial step, no Jones screens): the
particle is a cubic lattice of point dipoles of spacing ``d`` in the medium (wavenumber k = k0 n_m),
each with the Clausius-Mossotti polarizability of its permittivity tensor relative to the medium,
``a_CM = 3 d^3 / (4 pi) (e - I)(e + 2 I)^-1``, with the radiative-reaction correction
``a = a_CM (I - (2 i / 3) k^3 a_CM)^-1`` (Gaussian units). The dipoles answer the illumination and
each other's fields, ``p_j = a_j (E_inc(r_j) + sum_k A(r_j - r_k) p_k)`` with the free-space dyadic
``A(r) = exp(i k r) / r [k^2 (I - r^ r^) + (1 - i k r) / r^2 (3 r^ r^ - I)]``; the system is solved by
GMRES with the lattice convolution done by FFT. The far field is
``F(k^) = k^2 (I - k^ k^) sum_j p_j exp(-i k k^ . r_j)`` and is imaged exactly as the exact-Mie
reference images its far field (``mie_reference.focal_plane_field``). Checked against exact Mie
scattering in tests/test_lc_reference.py before it judges anything.
"""
from __future__ import annotations

import numpy as np
import scipy.fft
import scipy.sparse.linalg

from biref_sdk.geometry import Geometry

from mie_reference import focal_plane_field, input_vectors, pupil_directions, wavevectors


class DipoleLattice:
    """Dipoles at ``points_m`` [n, 3] (x, y, z; on a cubic lattice of ``spacing_m``) with absolute
    permittivity tensors ``eps`` [n, 3, 3], in a medium of index ``medium_index``."""

    def __init__(self, points_m: np.ndarray, eps: np.ndarray, spacing_m: float, medium_index: float,
                 wavelength_m: float) -> None:
        self.points_m = np.asarray(points_m, np.float64)
        self.k = 2 * np.pi * medium_index / wavelength_m
        d = spacing_m
        relative = np.asarray(eps, np.complex128) / medium_index**2
        identity = np.eye(3)
        cm = 3 * d**3 / (4 * np.pi) * (relative - identity) @ np.linalg.inv(relative + 2 * identity)
        alpha = cm @ np.linalg.inv(identity - (2j / 3) * self.k**3 * cm)
        self.inverse_alpha = np.linalg.inv(alpha)  # [n, 3, 3]
        # lattice indices and the FFT grid of the convolution (large enough for every offset)
        low = self.points_m.min(0)
        self.index = np.round((self.points_m - low) / d).astype(np.int64)
        if not np.allclose(self.index * d + low, self.points_m, atol=1e-6 * d):
            raise ValueError("points are not on a cubic lattice of the given spacing")
        size = self.index.max(0) + 1
        self.fft_shape = tuple(scipy.fft.next_fast_len(int(2 * n - 1)) for n in size)
        self._kernel = self._interaction_spectrum(d)

    def _interaction_spectrum(self, d: float) -> np.ndarray:
        """FFT of A on the grid of lattice offsets, [3, 3, *fft_shape] (zero at the origin)."""
        axes = [np.fft.fftfreq(n, 1.0 / n).round() * d for n in self.fft_shape]  # wrapped offsets
        x, y, z = np.meshgrid(*axes, indexing="ij")
        r = np.sqrt(x * x + y * y + z * z)
        r[0, 0, 0] = 1.0
        unit = np.stack([x / r, y / r, z / r])
        k = self.k
        phase = np.exp(1j * k * r) / r
        far = k**2 * phase
        near = (1 - 1j * k * r) / r**2 * phase
        kernel = np.empty((3, 3, *self.fft_shape), np.complex128)
        for a in range(3):
            for b in range(a, 3):
                rr = unit[a] * unit[b]
                value = far * ((a == b) - rr) + near * (3 * rr - (a == b))
                value[0, 0, 0] = 0.0
                kernel[a, b] = kernel[b, a] = scipy.fft.fftn(value, workers=-1)
        return kernel

    def _fields_of(self, p: np.ndarray) -> np.ndarray:
        """E at every dipole from all the others, [n, 3]."""
        grid = np.zeros((3, *self.fft_shape), np.complex128)
        i, j, k = self.index.T
        grid[:, i, j, k] = p.T
        spectrum = scipy.fft.fftn(grid, axes=(1, 2, 3), workers=-1)
        field = scipy.fft.ifftn(np.einsum("ab...,b...->a...", self._kernel, spectrum), axes=(1, 2, 3), workers=-1)
        return field[:, i, j, k].T

    def solve(self, incident: np.ndarray, rtol: float = 1e-8) -> np.ndarray:
        """Dipole moments [n, 3] under the incident field [n, 3] at the dipoles."""
        n = len(self.points_m)

        def apply(flat):
            p = flat.reshape(n, 3)
            return (np.einsum("nab,nb->na", self.inverse_alpha, p) - self._fields_of(p)).ravel()

        operator = scipy.sparse.linalg.LinearOperator((3 * n, 3 * n), matvec=apply, dtype=np.complex128)
        guess = np.linalg.solve(self.inverse_alpha, incident[..., None])[..., 0]  # the dipoles alone (first Born order)
        p, info = scipy.sparse.linalg.gmres(operator, incident.ravel(), x0=guess.ravel(), rtol=rtol, restart=60,
                                            maxiter=20)
        if info != 0:
            raise RuntimeError(f"GMRES did not converge (info {info})")
        return p.reshape(n, 3)

    def far_field(self, p: np.ndarray, directions: np.ndarray) -> np.ndarray:
        """F(k^) [m, 3] in the unit directions [m, 3]."""
        phases = np.exp(-1j * self.k * directions @ self.points_m.T)  # [m, n]
        total = phases @ p  # [m, 3]
        along = np.sum(directions * total, 1, keepdims=True)
        return self.k**2 * (total - directions * along)


def dda_scattered_fields(geometry: Geometry, lattice: DipoleLattice, views) -> np.ndarray:
    """Pupil-limited scattered fields at z = 0 of the dipole lattice, complex[2(pol), len(views), 2, H, W]."""
    g = geometry
    inputs = input_vectors(g)
    k_in = wavevectors(g).k_in
    out = np.zeros((2, len(views), 2, *g.hologram_shape), np.complex128)
    for slot, v in enumerate(views):
        _, directions = pupil_directions(g, v)
        wave = np.exp(1j * lattice.points_m @ k_in[v])  # [n]
        for p in range(2):
            moments = lattice.solve(wave[:, None] * inputs[p, v][None, :])
            out[p, slot] = focal_plane_field(g, v, lattice.far_field(moments, directions))
    return out


def droplet_lattice(droplet, spacing_m: float, medium_index: float, wavelength_m: float) -> DipoleLattice:
    """The lattice of a droplet (``biref_sdk.samples.Droplet``) at its own centre: the lattice points
    inside it, with the liquid crystal's tensor ``n_o^2 I + (n_e^2 - n_o^2) d d^T`` of its director."""
    import torch

    from biref_sdk.samples.droplets import director_field
    from biref_sdk.samples.tensor import _inside  # the droplet's shape, as the simulator voxelizes it

    n = int(np.ceil(droplet.bounding_radius_m / spacing_m))
    axis = np.arange(-n, n + 1) * spacing_m
    offsets = torch.as_tensor(np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3))
    offsets = offsets[_inside(droplet, offsets)]
    points = offsets.numpy() + np.asarray(droplet.center_m)
    director = director_field(droplet, torch.as_tensor(points)).numpy()
    eps = (droplet.no**2 * np.eye(3)[None] + (droplet.ne**2 - droplet.no**2)
           * director[:, :, None] * director[:, None, :])
    return DipoleLattice(points, eps, spacing_m, medium_index, wavelength_m)
