"""The Fourier-space side of the formula reconstruction: where every view's Rytov data land on the
3D frequency grid (Fourier diffraction theorem for an illumination scan), the per-frequency
normal equations of the six tensor components, and the inverse transform onto the volume grid.

Frequency grid. Laterally it is the camera's: spacing 2 pi / (W p) in x and 2 pi / (H p) in y, so
every demodulated frequency sits exactly on it. Axially the spacing is 2 pi / (N_z dz) with
``N_z = ceil(z_oversampling * Z)``, i.e. the periodic real-space box is ``z_oversampling`` times
deeper than the volume, which keeps nearest-plane gridding of the Ewald caps accurate and the
wrap-around out of the volume. Only the box of frequencies that data can reach is stored, and of
it only the frequencies some view actually hits ("compact" voxels): for ``paper`` that is under a
million of the 80 x 512 x 512 grid.

Tensor components are in the order (xx, yy, zz, xy, xz, yz) (``biref_sdk.samples.tensor``).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
import torch

from ..geometry import Geometry
from ..physics.frames import ViewWavevectors, polarization_basis, quadratic_form_rows, transverse_matrix

# Rytov data rows per frequency: the (u1,u1), symmetrised (u1,u2) and (u2,u2) entries of the log
# Jones matrix; the off-diagonal stands for two measured entries, hence weight 2 (Frobenius norm).
ROW_WEIGHTS = (1.0, 2.0, 1.0)
# Frobenius metric of a symmetric tensor in 6-vector form, and its isotropic direction
_FROBENIUS = np.diag([1.0, 1.0, 1.0, 2.0, 2.0, 2.0])
_ISOTROPIC = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])


def _views_key(views) -> tuple | None:
    return None if views is None else tuple(int(v) for v in views)


def regularizer(deviatoric: float, isotropic: float) -> np.ndarray:
    """Rotation-invariant Tikhonov matrix [6, 6]: ``deviatoric`` weighs the squared Frobenius norm
    of the traceless part, ``isotropic`` that of the isotropic part (trace^2 / 3)."""
    iso = np.outer(_ISOTROPIC, _ISOTROPIC) / 3.0
    return deviatoric * (_FROBENIUS - iso) + isotropic * iso


@dataclass
class ViewMapping:
    """Where one view's data go: crop-grid frequency bins, their scale to tensor units, and the
    compact frequency voxels of +K and -K (the conjugate datum of a real tensor)."""

    bins: torch.Tensor        # long [n]: flat indices into the Hc x Wc crop spectrum
    scale: torch.Tensor       # complex [n]: crop FFT -> b = A . Delta_hat(K)
    plus: torch.Tensor        # long [n]: compact voxel of K
    minus: torch.Tensor       # long [n]: compact voxel of -K
    rows: torch.Tensor        # real [3, 6]: weighted rows (W A) of this view


class FourierPlan:
    """Everything about the frequency grid that depends only on the geometry (cached per geometry).

    ``b = A . Delta_hat(K)`` is the model: for view ``v`` and crop frequency ``q``, with
    ``K = k_out - k_in``, ``k_out = (k_in,T + q, sqrt(k_m^2 - |k_in,T + q|^2))``,
    ``b_ab = R_hat_ab(q) * 2 n_m s_z / (i k0)`` where ``R_hat_ab`` is the 2D Fourier transform of
    the (a, b) entry of the log Jones matrix in the (u1, u2) basis, and ``A_ab = u_a^T . u_b``
    contracts the tensor. ``Delta = 2 n_m (N - n_m I)`` with N the index tensor (to first order
    ``Delta = eps - n_m^2 I``).
    """

    def __init__(self, geometry: Geometry, crop: tuple[int, int], device: torch.device,
                 z_oversampling: float, regularization: float, isotropic_regularization: float) -> None:
        if z_oversampling < 1.0:
            raise ValueError(f"z_oversampling must be >= 1, got {z_oversampling}")
        if regularization < 0 or isotropic_regularization < 0:
            raise ValueError("regularization weights must be >= 0")
        self.geometry = g = geometry
        self.device = torch.device(device)
        self.crop = Hc, Wc = crop
        H, W = g.hologram_shape
        Z = g.volume_shape[0]
        dz = g.voxel_size_m[0]
        p = g.pixel_size_m
        self.n_z = max(Z, int(math.ceil(z_oversampling * Z)))
        k0 = g.k0_per_m
        dkz = 2 * math.pi / (self.n_z * dz)
        k_hat, u1, u2 = polarization_basis(g)
        self.T = transverse_matrix(g)
        rows = np.stack([quadratic_form_rows(u1, u1), quadratic_form_rows(u1, u2), quadratic_form_rows(u2, u2)], 1)
        weighted = rows * np.asarray(ROW_WEIGHTS)[None, :, None]  # [V, 3, 6]
        self._view_normal = np.einsum("vri,vrj->vij", rows, weighted)  # A^T W A per view [V, 6, 6]

        my = np.fft.fftfreq(Hc, 1.0 / Hc).round().astype(np.int64)
        mx = np.fft.fftfreq(Wc, 1.0 / Wc).round().astype(np.int64)
        MY, MX = np.meshgrid(my, mx, indexing="ij")
        # crop pixel n sits at x = (n - Wc/2) * pitch: the Fourier transform about x = 0 carries
        # exp(i pi m) per axis, and the crop pixel area
        centring = np.where((MX + MY) % 2 == 0, 1.0, -1.0) * (p * W / Wc) * (p * H / Hc)
        per_view = []
        grid = ViewWavevectors.of(g, crop)
        for v in range(g.n_views):
            inside = grid.pupil[v].copy()
            mz = np.round((grid.kz[v] - grid.k_in[v, 2]) / dkz).astype(np.int64)
            inside &= np.abs(mz) < self.n_z // 2  # band limit of the volume's z grid
            flat = np.flatnonzero(inside.reshape(-1))
            scale = centring.reshape(-1)[flat] * (2 * g.medium_index * k_hat[v, 2] / (1j * k0))
            per_view.append((flat, MX.reshape(-1)[flat], MY.reshape(-1)[flat], mz.reshape(-1)[flat], scale))
        self.half_box = (max(int(np.abs(v[3]).max()) for v in per_view),
                         max(int(np.abs(v[2]).max()) for v in per_view),
                         max(int(np.abs(v[1]).max()) for v in per_view))
        Bz, By, Bx = (2 * m + 1 for m in self.half_box)
        self.box_shape = (Bz, By, Bx)
        Mz, My, Mx = self.half_box

        def box_index(mz, my, mx):
            return ((mz + Mz) * By + (my + My)) * Bx + (mx + Mx)

        all_ids = np.concatenate([np.concatenate([box_index(v[3], v[2], v[1]), box_index(-v[3], -v[2], -v[1])])
                                  for v in per_view])
        unique, inverse = np.unique(all_ids, return_inverse=True)
        self.n_voxels = len(unique)
        # a real tensor field's spectrum is Hermitian: the kx >= 0 half box [Bz, By, Mx + 1] holds it
        # all, and the compact voxels in it (``half_compact``) carry every independent datum
        iz, iy, ix = np.unravel_index(unique, self.box_shape)
        in_half = ix >= Mx
        self.half_shape = (Bz, By, Mx + 1)
        self.half_compact = torch.as_tensor(np.flatnonzero(in_half), device=self.device)
        self.half_index = torch.as_tensor(np.ravel_multi_index((iz[in_half], iy[in_half], ix[in_half] - Mx),
                                                               self.half_shape), device=self.device)
        self.views: list[ViewMapping] = []
        offset = 0
        for v, (flat, _, _, _, scale) in enumerate(per_view):
            n = len(flat)
            plus = inverse[offset:offset + n]
            minus = inverse[offset + n:offset + 2 * n]
            offset += 2 * n
            self.views.append(ViewMapping(
                bins=torch.as_tensor(flat, device=self.device),
                scale=torch.as_tensor(scale, dtype=torch.complex64, device=self.device),
                plus=torch.as_tensor(plus, device=self.device), minus=torch.as_tensor(minus, device=self.device),
                rows=torch.as_tensor(weighted[v], dtype=torch.float32, device=self.device)))
        _, dy, dx = g.voxel_size_m
        # voxels at the camera pitch laterally: the volume grid is a subset of the camera grid, so
        # real space <-> frequency box is a pair of pruned FFTs both ways (the constraint step)
        self.camera_pitch = math.isclose(dy, p, rel_tol=1e-6) and math.isclose(dx, p, rel_tol=1e-6)
        self._regularizer = regularizer(regularization, isotropic_regularization)
        self._cache: dict = {}  # normal_inverse and data_step per view set, oldest first
        self._cache_lock = threading.Lock()
        self._lateral_cache: dict[str, dict[str, torch.Tensor]] = {}
        self.regularization = (regularization, isotropic_regularization)

    def normal_matrices(self, views=None) -> torch.Tensor:
        """A^T W A per compact voxel, float64 [n_voxels, 6, 6], summed over ``views`` (default all)."""
        selected = range(self.geometry.n_views) if views is None else views
        normal = torch.zeros(self.n_voxels, 36, dtype=torch.float64)
        for v in selected:
            block = torch.as_tensor(self._view_normal[v].reshape(1, 36))
            mapping = self.views[v]
            for ids in (mapping.plus, mapping.minus):
                normal.index_add_(0, ids.cpu(), block.expand(len(ids), 36))
        return normal.reshape(-1, 6, 6)

    def normal_inverse(self, views=None) -> torch.Tensor:
        """(A^T W A + R)^-1 per compact voxel, float32 [n_voxels, 6, 6], for the given views (all by
        default; cached for the last few view sets: a warm start's is the same every acquisition)."""
        return self._normal_inverse(views)

    def _normal_inverse(self, views, normal: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`normal_inverse`, from ``normal_matrices(views)`` when the caller has them."""
        key = ("inverse", _views_key(views))
        cached = self._cache.get(key)
        if cached is None:
            normal = (self.normal_matrices(views) if normal is None else normal) + torch.as_tensor(self._regularizer)
            # a voxel with no data and a zero regularizer has a singular system: its solution is zero
            empty = normal.abs().amax(dim=(1, 2)) == 0
            normal[empty] = torch.eye(6, dtype=torch.float64)
            cached = self._remember(key, torch.linalg.inv(normal).to(torch.float32).to(self.device))
        return cached

    def data_step(self, views=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The constraint iterations' data step ``x <- G b + (I - G N) x`` on the independent
        (kx >= 0) compact voxels, ``N = A^T W A`` and ``G = (N + R)^-1`` of the given views (all by
        default; cached like ``normal_inverse``): ``(G`` complex64, ``I - G N`` float32``)``, each
        ``[len(half_compact), 6, 6]``; real matrices, so ``I - G N`` acts on the real and
        imaginary parts alike."""
        key = ("data_step", _views_key(views))
        cached = self._cache.get(key)
        if cached is None:
            keep = self.half_compact
            normal = self.normal_matrices(views)  # summed over the views once, for both matrices
            inverse = self._normal_inverse(views, normal)[keep].to(torch.float64)
            contraction = torch.eye(6, dtype=torch.float64) - inverse.cpu() @ normal[keep.cpu()]
            cached = self._remember(key, (inverse.to(torch.complex64).to(self.device),
                                          contraction.to(torch.float32).to(self.device)))
        return cached

    def _remember(self, key, value):
        with self._cache_lock:  # sessions finalize on several threads
            self._cache[key] = value
            while len(self._cache) > 6:
                self._cache.pop(next(iter(self._cache)))
        return value

    def to_dense(self, solution: torch.Tensor) -> torch.Tensor:
        """Compact solution [n_voxels, 6] -> dense half box complex64 [6, Bz, By, Mx + 1] (kx >= 0)."""
        half = torch.zeros(6, int(np.prod(self.half_shape)), dtype=torch.complex64, device=solution.device)
        half[:, self.half_index] = solution[self.half_compact].T.to(torch.complex64)
        return half.reshape(6, *self.half_shape)

    def to_compact(self, half: torch.Tensor) -> torch.Tensor:
        """Dense half box [6, Bz, By, Mx + 1] -> its compact voxels [len(half_compact), 6]."""
        return half.reshape(6, -1)[:, self.half_index].T

    # -- frequency box <-> volume grid ---------------------------------------------------------------
    # Axis by axis, each pruned to what is needed: z by a direct DFT (a [Z, Bz] matrix: only the
    # box's Bz frequencies in and the volume's Z planes out of the N_z-periodic axis, cheaper than
    # a zero-filled FFT); y and x the same way where the voxels have the camera pitch (matrices of
    # the box's frequencies and the volume's rows and columns), else by zero-filled FFTs over the
    # whole camera grid, interpolated onto the voxel centres.
    def _lateral_phase(self, dev, y0_m: float, x0_m: float) -> torch.Tensor:
        """exp(i (k_y y0 + k_x x0)) over the kx >= 0 half box [By, Mx + 1]."""
        g = self.geometry
        H, W = g.hologram_shape
        p = g.pixel_size_m
        _, My, Mx = self.half_box
        my = torch.arange(-My, My + 1, dtype=torch.float64)
        mx = torch.arange(0, Mx + 1, dtype=torch.float64)
        phase = 2 * math.pi * (my[:, None] * (y0_m / (H * p)) + mx[None, :] * (x0_m / (W * p)))
        return torch.exp(1j * phase).to(torch.complex64).to(dev)

    def _z_transform(self, dev, inverse: bool) -> torch.Tensor:
        """The z axis as a matrix: synthesis [Z, Bz] (frequency -> voxel planes, with the 1/N_z of
        the inverse DFT) or analysis [Bz, Z] (voxel planes -> frequencies), origin at the volume
        centre; both include the voxel volume factor ``dz p^2`` of the continuous transform."""
        g = self.geometry
        Z = g.volume_shape[0]
        dz = g.voxel_size_m[0]
        volume_m3 = dz * g.pixel_size_m**2
        Mz = self.half_box[0]
        m = torch.arange(-Mz, Mz + 1, dtype=torch.float64)
        j = torch.arange(Z, dtype=torch.float64) - Z / 2
        angle = 2 * math.pi * j[:, None] * m[None, :] / self.n_z  # [Z, Bz]
        if inverse:
            matrix = torch.exp(1j * angle) / (self.n_z * volume_m3)
        else:
            matrix = (torch.exp(-1j * angle) * volume_m3).T
        return matrix.to(torch.complex64).to(dev)

    def _lateral_matrices(self, dev) -> dict[str, torch.Tensor]:
        """The lateral transforms between the half box and a camera-pitch volume grid as matrices
        (the Y x X voxels sit on the camera's periodic H x W grid, origin at the volume centre):
        synthesis ``y`` [Y, By] (with the inverse DFT's 1/H) and ``x`` [2 (Mx + 1), X] (the real
        part of a Hermitian half spectrum, 1/W and the doubled kx > 0 terms, acting on the
        interleaved real and imaginary parts), analysis ``y_hat`` [By, Y] and ``x_hat``
        [X, 2 (Mx + 1)] (interleaved real and imaginary parts out). On the small grids of a volume
        matrix products beat zero-filled FFTs (2-3x, CPU). Each axis is transformed where the
        other axes are smallest (x last out of and first into the volume, y before z)."""
        key = str(dev)
        cached = self._lateral_cache.get(key)
        if cached is None:
            g = self.geometry
            H, W = g.hologram_shape
            _, Y, X = g.volume_shape
            _, My, Mx = self.half_box
            my = torch.arange(-My, My + 1, dtype=torch.float64)
            mx = torch.arange(0, Mx + 1, dtype=torch.float64)
            y = torch.arange(Y, dtype=torch.float64) - Y / 2
            x = torch.arange(X, dtype=torch.float64) - X / 2
            doubled = torch.where(mx == 0, 1.0, 2.0)[:, None]
            x_synthesis = doubled * torch.exp(2j * math.pi * mx[:, None] * x[None, :] / W) / W
            x_analysis = torch.exp(-2j * math.pi * x[:, None] * mx[None, :] / W)
            cached = {
                "y": (torch.exp(2j * math.pi * y[:, None] * my[None, :] / H) / H).to(torch.complex64).to(dev),
                # rows (real, imaginary) per frequency: acts on a complex tensor's view_as_real
                "x": torch.stack([x_synthesis.real, -x_synthesis.imag], 1).reshape(-1, X).to(torch.float32).to(dev),
                "y_hat": torch.exp(-2j * math.pi * my[:, None] * y[None, :] / H).to(torch.complex64).to(dev),
                # columns (real, imaginary) per frequency: its product is a complex tensor's view_as_real
                "x_hat": torch.view_as_real(x_analysis).reshape(X, -1).to(torch.float32).contiguous().to(dev),
                "z": self._z_transform(dev, inverse=True), "z_hat": self._z_transform(dev, inverse=False),
            }
            self._lateral_cache[key] = cached
        return cached

    def to_volume(self, half: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Half box [C, Bz, By, Mx + 1] (kx >= 0) of a Hermitian spectrum (a real tensor field) ->
        real samples float32 [C, Z, Y, X] on the volume grid (voxel centres of docs/formats.md),
        ``chunk`` channels at a time (default: all of a small volume's, one of a large one's)."""
        if chunk is None:
            chunk = half.shape[0] if math.prod(self.geometry.volume_shape) <= 1 << 21 else 1
        if self.camera_pitch:
            m = self._lateral_matrices(half.device)
            Z = self.geometry.volume_shape[0]
            out = []
            for start in range(0, half.shape[0], chunk):
                part = m["y"] @ half[start:start + chunk]  # [c, Bz, Y, Bx]
                c, Bz, Y, Bx = part.shape
                part = (m["z"] @ part.reshape(c, Bz, Y * Bx)).reshape(c, Z, Y, Bx)
                out.append(torch.view_as_real(part).reshape(c, Z, Y, 2 * Bx) @ m["x"])
            return torch.cat(out) if len(out) > 1 else out[0]
        # other voxel sizes: sample the whole camera grid, then interpolate onto the voxel centres
        g = self.geometry
        H, W = g.hologram_shape
        Z, Y, X = g.volume_shape
        p = g.pixel_size_m
        Mz, My, _ = self.half_box
        dev = half.device
        my = torch.arange(-My, My + 1, device=dev)
        lateral = self._lateral_phase(dev, -H / 2 * p, -W / 2 * p)
        synthesis = self._z_transform(dev, inverse=True)
        out = torch.empty(half.shape[0], Z, Y, X, dtype=torch.float32, device=dev)
        for start in range(0, half.shape[0], chunk):
            part = half[start:start + chunk] * lateral
            c, _, By, Bx = part.shape
            part = (synthesis @ part.reshape(c, 2 * Mz + 1, By * Bx)).reshape(c, Z, By, Bx)
            grid = torch.zeros(c, Z, H, Bx, dtype=part.dtype, device=dev)
            grid[:, :, my % H] = part
            part = torch.fft.ifft(grid, dim=2)
            real = torch.fft.irfft(part, n=W, dim=3)  # irfft zero-fills kx > Mx
            out[start:start + chunk] = _resample_lateral(real, g)
        return out

    def from_volume(self, volume: torch.Tensor) -> torch.Tensor:
        """Fourier transform of real samples [C, Z, Y, X] on the volume grid (zero outside it) onto
        the half box [C, Bz, By, Mx + 1]: the transform that ``to_volume`` inverts for fields
        band-limited to the box (used by the constraint iterations): x, z and y as matrix
        products onto the box's frequencies (``_lateral_matrices``)."""
        Z = self.geometry.volume_shape[0]
        if not self.camera_pitch:
            raise ValueError("from_volume needs voxels of the camera pixel size laterally")
        m = self._lateral_matrices(volume.device)
        c, _, Y, _ = volume.shape
        half = torch.view_as_complex((volume.float() @ m["x_hat"]).reshape(c, Z, Y, -1, 2))  # [C, Z, Y, Bx]
        Bx = half.shape[-1]
        half = (m["z_hat"] @ half.reshape(c, Z, Y * Bx)).reshape(c, -1, Y, Bx)
        return m["y_hat"] @ half  # [C, Bz, By, Bx]


def _resample_lateral(planes: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Linear interpolation of [C, Z, H, W] camera-grid samples onto the volume's (y, x) voxel
    centres; the camera grid is periodic (it comes from a discrete Fourier series)."""
    H, W = geometry.hologram_shape
    _, Y, X = geometry.volume_shape
    _, dy, dx = geometry.voxel_size_m
    p = geometry.pixel_size_m
    out = planes
    for axis, n_cam, n_vol, d in ((2, H, Y, dy), (3, W, X, dx)):
        position = ((torch.arange(n_vol, dtype=torch.float64) - n_vol / 2) * d / p + n_cam / 2)
        lo = torch.floor(position)
        w = (position - lo).to(planes.dtype).to(planes.device)
        lo = lo.long() % n_cam
        hi = (lo + 1) % n_cam
        a = out.index_select(axis, lo.to(planes.device))
        b = out.index_select(axis, hi.to(planes.device))
        shape = [1] * out.ndim
        shape[axis] = n_vol
        out = a + (b - a) * w.reshape(shape)
    return out
