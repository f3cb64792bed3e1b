"""Formula-based dielectric tensor tomography (DTT): holograms -> n_e, n_o and director, no training.

The method (docs/reconstruction.md has the equations):

1. Off-axis demodulation of each frame onto a crop grid (``holography.Demodulator`` with a crop), giving
   the (x, y) field for both input polarizations of a view: a 2x2 Jones matrix M per pixel; the
   same for the background frames, M_bg (its envelope low-passed: the illumination is smooth).
2. The relative Jones matrix in the view's polarization basis (u1, u2):
   ``J = T^-1 M M_bg^-1 T`` (identity without a sample), and its matrix logarithm with the
   unwrapped mean phase: the tensor Rytov field.
3. To first order, ``log J`` is ``i k0 / (2 n_m s_z)`` times the path integral of
   ``U^T Delta U`` (U = [u1 u2]), whose 2D spectrum is the 3D spectrum of the tensor contrast
   ``Delta`` on the view's Ewald cap ``K = k_out - k_in`` (Fourier diffraction theorem for an
   illumination scan). Each frequency bin of each view adds three equations in the six tensor
   components to that K's normal equations (``_kspace.FourierPlan``), at once when the view's
   second polarization arrives.
4. ``finalize``: per-frequency Tikhonov solve (a precomputed 6x6 inverse per frequency), the
   inverse 3D FFT onto the volume grid, the constraint step for the missing cone (accelerated
   Gerchberg-Papoulis iterations with a group soft threshold, on by default), and a closed-form
   eigen-decomposition per voxel: ``n_e, n_o = n_m + lambda_max,min / (2 n_m)``, the director the
   eigenvector of ``lambda_max``.
"""
from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..files import Volume
from ..geometry import Geometry
from ..holography import Demodulator
from ._eigen import symmetric_eigen, symmetric_eigen_full
from ._fields import crop_shape, jones_logarithm
from ._kspace import FourierPlan
from .base import ReconstructionSession, Reconstructor


@dataclass(frozen=True)
class FormulaOptions:
    """Options of the formula reconstruction (all have working defaults).

    regularization: Tikhonov weight on the traceless (anisotropic) part of the tensor at each
        frequency, in units of one view's data; frequencies seen by too few views to fix all six
        components fall back towards the isotropic tensor their data determine.
    isotropic_regularization: the same for the isotropic part (kept small: every view sees it).
    z_oversampling: depth of the periodic reconstruction box over the volume depth.
    constraint_iterations: accelerated Gerchberg-Papoulis iterations for the missing cone (0:
        off), alternating the measured frequencies with the real-space constraints: a real
        tensor, the medium outside the volume grid, the ``shrinkage`` soft threshold, and
        principal indices within ``index_bounds`` when given. Few iterations on purpose: with
        noisy data more of them fit the noise (semi-convergence); 5 measured best.
    shrinkage: soft threshold (index units) on each voxel's index-contrast tensor
        ``N - n_m I`` (Frobenius norm), applied in every constraint iteration and to the output:
        a group-sparsity prior for samples that are mostly medium; 0 is off.
    late_views: streaming warm start of the constraint iterations. All but the last
        ``late_iterations`` of them run on the data of the views before the acquisition's last
        ``late_views`` (in view order), as soon as those views have arrived, while the rest
        arrive; the last ``late_iterations`` continue from there with every view's data. 0
        (default): every iteration after the last view. With 8 and 2 of 5 iterations (the
        shipped model's prior) the result is as accurate as five iterations after the last view
        (docs/reconstruction.md) and three fifths of the work is done before it. With views
        missing at ``finalize`` all iterations run then, on the views there are.
    late_iterations: see ``late_views`` (1 to ``constraint_iterations``).
    index_bounds: (low, high) bounds on every principal index, enforced by projection in the
        constraint step and on the output; only for samples whose index range is known (e.g.
        liquid crystal droplets, never below their medium). None (default) assumes nothing.
    background_smoothing_m: Gaussian low-pass (standard deviation, metres) of the background
        field's envelope before it normalises the sample field; the illumination is smooth, so
        this removes the background frames' camera noise. 0 is off. None (default): 0.5 um when
        the frames are periodic (``Geometry.frames_periodic``: illumination and carriers on the
        FFT grid, as in the presets), else off: off the grid the demodulated fields carry leakage
        ringing that only the unsmoothed background cancels (smoothing it left up to 4e-3 of
        false birefringence in exact-Mie tests, docs/reconstruction.md).
    """

    regularization: float = 0.3
    isotropic_regularization: float = 1e-3
    z_oversampling: float = 2.0
    constraint_iterations: int = 5
    shrinkage: float = 1.5e-3
    index_bounds: tuple[float, float] | None = None
    background_smoothing_m: float | None = None
    late_views: int = 0
    late_iterations: int = 1

    def __post_init__(self) -> None:
        if self.regularization < 0 or self.isotropic_regularization < 0:
            raise ValueError("regularization weights must be >= 0")
        if self.z_oversampling < 1:
            raise ValueError(f"z_oversampling must be >= 1, got {self.z_oversampling}")
        if self.constraint_iterations < 0:
            raise ValueError("constraint_iterations must be >= 0")
        if self.late_views < 0:
            raise ValueError(f"late_views must be >= 0, got {self.late_views}")
        if self.late_views and not 1 <= self.late_iterations <= self.constraint_iterations:
            raise ValueError(f"late_iterations must be 1..constraint_iterations ({self.constraint_iterations}) "
                             f"with late_views, got {self.late_iterations}")
        if self.shrinkage < 0 or (self.background_smoothing_m or 0.0) < 0:
            raise ValueError("shrinkage and background_smoothing_m must be >= 0")
        if self.background_smoothing_m is not None:
            object.__setattr__(self, "background_smoothing_m", float(self.background_smoothing_m))
        if self.index_bounds is not None:
            lo, hi = (float(v) for v in self.index_bounds)
            if not 0 < lo < hi:
                raise ValueError(f"index_bounds {self.index_bounds} must be 0 < low < high")
            object.__setattr__(self, "index_bounds", (lo, hi))

    def background_smoothing_for(self, geometry: Geometry) -> float:
        """The smoothing (metres) used on ``geometry``: the option, or its geometry-aware default."""
        if self.background_smoothing_m is not None:
            return self.background_smoothing_m
        return 0.5e-6 if geometry.frames_periodic() else 0.0


class _Background:
    """Per-view inverse background Jones matrices ``M_bg^-1 T`` [2, 2, Hc, Wc], computed on first
    use and shared by every session of one background (a data set's samples share one)."""

    def __init__(self, frames: np.ndarray, demodulator: Demodulator, T: torch.Tensor,
                 smoothing_m: float) -> None:
        self._frames = frames
        self._demodulator = demodulator
        self._T = T
        self._views: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()
        g = demodulator.geometry
        (Hc, Wc), (H, W) = demodulator.crop, g.hologram_shape
        self._y = (torch.arange(Hc, dtype=torch.float64) - Hc / 2) * g.pixel_size_m * H / Hc
        self._x = (torch.arange(Wc, dtype=torch.float64) - Wc / 2) * g.pixel_size_m * W / Wc
        self._lowpass = None
        if smoothing_m > 0:
            fy = torch.fft.fftfreq(Hc, g.pixel_size_m * H / Hc, dtype=torch.float64)[:, None]
            fx = torch.fft.fftfreq(Wc, g.pixel_size_m * W / Wc, dtype=torch.float64)[None, :]
            self._lowpass = torch.exp(-2 * (math.pi * smoothing_m) ** 2 * (fx**2 + fy**2)).to(T.device)

    def _smooth(self, fields: torch.Tensor, view: int) -> torch.Tensor:
        """Low-pass the envelope of the background fields [pol, comp, h, w] around its plane wave."""
        if self._lowpass is None:
            return fields
        g = self._demodulator.geometry
        s = g.sines[view] * g.k_medium_per_m
        carrier = torch.exp(1j * (s[0] * self._x[None, :] + s[1] * self._y[:, None])).to(fields.device)
        envelope = torch.fft.ifft2(torch.fft.fft2(fields * carrier.conj()) * self._lowpass)
        return envelope * carrier

    def inverse(self, view: int) -> torch.Tensor:
        with self._lock:
            cached = self._views.get(view)
            if cached is None:
                fields = self._smooth(self._demodulator(self._frames[:, view]).to(torch.complex128), view)
                m = fields.permute(1, 0, 2, 3)  # rows: output component, columns: input pol
                det = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
                inv = torch.stack([torch.stack([m[1, 1], -m[0, 1]]), torch.stack([-m[1, 0], m[0, 0]])]) / det
                cached = torch.einsum("ijyx,jk->ikyx", inv, self._T[view])
                self._views[view] = cached
            return cached


def _fingerprint(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array)
    digest = hashlib.blake2b(memoryview(array).cast("B"), digest_size=16)
    digest.update(str((array.dtype.str, array.shape)).encode())
    return digest.hexdigest()


class FormulaReconstructor(Reconstructor):
    """Formula-based DTT reconstruction (the baseline of the paper, and a fallback without a model).

    ``FormulaReconstructor(device="cpu", **options)``: options are the fields of
    :class:`FormulaOptions`. Geometry-dependent tables and demodulated backgrounds are cached on the
    instance, so one reconstructor serving many acquisitions does that work once.
    """

    name = "formula"

    def __init__(self, device: str | torch.device = "cpu", options: FormulaOptions | None = None, **kwargs) -> None:
        if options is not None and kwargs:
            raise ValueError("give either options= or keyword options, not both")
        unknown = set(kwargs) - set(FormulaOptions.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown formula options: {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(FormulaOptions.__dataclass_fields__)}")
        self.options = options or FormulaOptions(**kwargs)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        self._lock = threading.Lock()
        self._plans: OrderedDict = OrderedDict()
        self._backgrounds: OrderedDict = OrderedDict()
        self._executor: ThreadPoolExecutor | None = None

    def parameters(self) -> dict:
        return {"method": self.name, "options": asdict(self.options), "device": str(self.device)}

    def _plan(self, geometry: Geometry) -> tuple[FourierPlan, Demodulator]:
        with self._lock:
            entry = self._plans.get(geometry)
            if entry is None:
                crop = crop_shape(geometry)
                o = self.options
                plan = FourierPlan(working_geometry(geometry), crop, self.device, o.z_oversampling, o.regularization,
                                   o.isotropic_regularization)
                entry = (plan, Demodulator(geometry, self.device, crop))
                self._plans[geometry] = entry
                while len(self._plans) > 2:
                    self._plans.popitem(last=False)
            return entry

    def _background(self, geometry: Geometry, background: np.ndarray) -> _Background:
        plan, demodulator = self._plan(geometry)
        smoothing_m = self.options.background_smoothing_for(geometry)
        key = (geometry, smoothing_m, _fingerprint(background))
        with self._lock:
            entry = self._backgrounds.get(key)
            if entry is None:
                T = torch.as_tensor(plan.T, dtype=torch.complex128, device=self.device)
                entry = _Background(np.array(background, copy=True), demodulator, T, smoothing_m)
                self._backgrounds[key] = entry
                while len(self._backgrounds) > 2:
                    self._backgrounds.popitem(last=False)
            return entry

    def start(self, geometry: Geometry, background: np.ndarray, executor: Executor | None = None) -> "FormulaSession":
        """``executor``: where the warm start of the constraint iterations runs
        (``FormulaOptions.late_views``); default: this reconstructor's own worker thread."""
        expected = (2, geometry.n_views, *geometry.hologram_shape)
        if tuple(np.shape(background)) != expected:
            raise ValueError(f"background has shape {np.shape(background)}, expected {expected}")
        if self.options.late_views >= geometry.n_views:
            raise ValueError(f"late_views {self.options.late_views} must be below the {geometry.n_views} views")
        if executor is None and self.options.late_views:
            executor = self._worker()
        return FormulaSession(self, geometry, self._background(geometry, np.asarray(background)), executor)

    def _worker(self) -> ThreadPoolExecutor:
        """One thread for the sessions' warm starts, started on first use."""
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="biref-formula")
            return self._executor


class FormulaSession(ReconstructionSession):
    """One acquisition in progress: each view's Rytov data are added to the frequency-space
    normal equations as soon as both of its polarizations have arrived; with
    ``FormulaOptions.late_views`` the constraint iterations start on ``executor`` as soon as the
    views before the last ``late_views`` are in."""

    def __init__(self, reconstructor: FormulaReconstructor, geometry: Geometry, background: _Background,
                 executor: Executor | None = None) -> None:
        super().__init__(geometry)
        self._reconstructor = reconstructor
        self._options = reconstructor.options
        self._device = reconstructor.device
        self._plan, self._demodulator = reconstructor._plan(geometry)
        self._background = background
        self._pending: dict[int, dict[int, torch.Tensor]] = {}
        # right-hand sides of the views before the last late_views (all views without them) and of those
        self._n_early = geometry.n_views - self._options.late_views
        self._rhs = torch.zeros(self._plan.n_voxels, 6, dtype=torch.complex64, device=self._device)
        self._rhs_late = torch.zeros_like(self._rhs) if self._options.late_views else None
        self._executor = executor
        self._warm_start: Future | None = None
        self._done = np.zeros(geometry.n_views, dtype=bool)
        T = torch.as_tensor(self._plan.T, dtype=torch.complex128, device=self._device)
        self._T_inv = torch.linalg.inv(T)
        self._reference = self._outside_volume()
        self.seconds_in_views = 0.0

    def _outside_volume(self) -> torch.Tensor:
        """Crop-grid pixels outside the volume's lateral footprint (where the sample is not)."""
        g = self.geometry
        Hc, Wc = self._plan.crop
        H, W = g.hologram_shape
        _, Y, X = g.volume_shape
        _, dy, dx = g.voxel_size_m
        y = (torch.arange(Hc, dtype=torch.float64) - Hc / 2) * g.pixel_size_m * H / Hc
        x = (torch.arange(Wc, dtype=torch.float64) - Wc / 2) * g.pixel_size_m * W / Wc
        inside = (y.abs()[:, None] <= Y * dy / 2) & (x.abs()[None, :] <= X * dx / 2)
        return (~inside).to(self._device)

    def _add_view(self, polarization: int, view: int, hologram: np.ndarray) -> None:
        start = time.perf_counter()
        fields = self._demodulator(hologram)  # [2(comp), h, w]
        pending = self._pending.setdefault(view, {})
        pending[polarization] = fields
        if len(pending) == 2:
            del self._pending[view]
            self._accumulate(view, pending[0], pending[1])
            if (self._rhs_late is not None and self._warm_start is None and view < self._n_early
                    and self._done[:self._n_early].all()):
                self._warm_start = self._executor.submit(self._early_iterations)
        self.seconds_in_views += time.perf_counter() - start

    @torch.no_grad()
    def _accumulate(self, view: int, pol0: torch.Tensor, pol1: torch.Tensor) -> None:
        # M: rows output component (x, y), columns input polarization
        m = torch.stack([pol0, pol1], 1).to(torch.complex128)
        jones = torch.einsum("ij,jkyx,klyx->ilyx", self._T_inv[view], m, self._background.inverse(view))
        log = jones_logarithm(jones, self._reference)
        rytov = torch.stack([log[0, 0], 0.5 * (log[0, 1] + log[1, 0]), log[1, 1]]).to(torch.complex64)
        mapping = self._plan.views[view]
        spectra = torch.fft.fft2(rytov).reshape(3, -1)[:, mapping.bins] * mapping.scale  # [3, n]
        contribution = spectra.T @ mapping.rows.to(torch.complex64)  # [n, 6]
        rhs = self._rhs if view < self._n_early else self._rhs_late
        rhs.index_add_(0, mapping.plus, contribution)
        rhs.index_add_(0, mapping.minus, contribution.conj())
        self._done[view] = True

    @torch.no_grad()
    def _early_iterations(self) -> "_Iterate":
        """The warm start: the solve and all but the last ``late_iterations`` constraint
        iterations, on the views before the last ``late_views``."""
        o, plan = self._options, self._plan
        early = range(self._n_early)
        start = _Iterate.from_solution(plan, plan.normal_inverse(early), self._rhs)
        return start.iterate(plan, self._rhs, early, _RealSpace(o, self.geometry.medium_index),
                             o.constraint_iterations - o.late_iterations)

    @torch.no_grad()
    def finalize(self, allow_missing: bool = False) -> Volume:
        start = time.perf_counter()
        missing = np.flatnonzero(~self._done)
        if missing.size and not allow_missing:
            raise ValueError(f"{missing.size} views incomplete (e.g. view {int(missing[0])}); "
                             "finalize(allow_missing=True) reconstructs from the complete views")
        if missing.size == self.geometry.n_views:
            raise ValueError("no complete view (both polarizations) was received")
        plan, options = self._plan, self._options
        views = None if not missing.size else np.flatnonzero(self._done)
        real_space = _RealSpace(options, self.geometry.medium_index)
        rhs = self._rhs if self._rhs_late is None else self._rhs + self._rhs_late
        iterations = options.constraint_iterations
        if self._rhs_late is not None and not missing.size:
            warm = self._warm_start.result() if self._warm_start is not None else self._early_iterations()
            solved = time.perf_counter()  # "solve": waiting for (or running) the warm start
            state = warm.iterate(plan, rhs, None, real_space, options.late_iterations)
            iterations_after = options.late_iterations
        else:
            state = _Iterate.from_solution(plan, plan.normal_inverse(views), rhs)
            solved = time.perf_counter()
            state = state.iterate(plan, rhs, views, real_space, iterations)
            iterations_after = iterations
        delta = real_space(state.delta)
        if plan.geometry != self.geometry:
            delta = resample_volume(delta, plan.geometry, self.geometry)
        constrained = time.perf_counter()
        ne, no, director = principal_indices(delta, self.geometry.medium_index)
        parameters = dict(self._reconstructor.parameters())
        parameters.update({
            "views_used": int(self._done.sum()),
            "constraint_iterations_run": iterations,
            "constraint_iterations_after_last_view": iterations_after,
            "missing_views": missing.tolist(),
            "frequency_voxels": plan.n_voxels,
            "frequency_box": list(plan.box_shape),
            "seconds_views": round(self.seconds_in_views, 4),
            "seconds_finalize": round(time.perf_counter() - start, 4),
            # finalize's stages (on CUDA without synchronisation: indicative only); "constraint"
            # includes the inverse transform onto the volume grid
            "seconds_solve": round(solved - start, 4),
            "seconds_constraint": round(constrained - solved, 4),
            "seconds_eigen": round(time.perf_counter() - constrained, 4),
        })
        g = self.geometry
        return Volume(ne=ne.cpu().numpy(), no=no.cpu().numpy(), director=director.cpu().numpy(),
                      voxel_size_m=g.voxel_size_m, medium_index=g.medium_index, parameters=parameters)


def working_geometry(geometry: Geometry) -> Geometry:
    """The geometry the frequency-space solve and the constraint iterations run on: the volume
    grid itself when its voxels have the camera pitch laterally, else a camera-pitch grid of the
    same depth covering the volume's footprint (the iterations' FFTs need the camera pitch; the
    result is interpolated onto the volume grid afterwards, ``resample_volume``)."""
    Z, Y, X = geometry.volume_shape
    dz, dy, dx = geometry.voxel_size_m
    p = geometry.pixel_size_m
    if math.isclose(dy, p, rel_tol=1e-6) and math.isclose(dx, p, rel_tol=1e-6):
        return geometry
    H, W = geometry.hologram_shape
    covering = (min(n_cam, math.ceil(n * d / p - 1e-9) + 1) for n_cam, n, d in ((H, Y, dy), (W, X, dx)))
    return geometry.replace(volume_shape=(Z, *covering), voxel_size_m=(dz, p, p))


def resample_volume(field: torch.Tensor, source: Geometry, target: Geometry) -> torch.Tensor:
    """Linear interpolation of [C, Z, Y, X] on ``source``'s voxel centres onto ``target``'s (same
    z grid; docs/formats.md's centres ``(n - N/2) * d``); positions beyond the source grid take
    its edge values."""
    out = field
    for axis, n_src, d_src, n_dst, d_dst in ((2, source.volume_shape[1], source.voxel_size_m[1],
                                              target.volume_shape[1], target.voxel_size_m[1]),
                                             (3, source.volume_shape[2], source.voxel_size_m[2],
                                              target.volume_shape[2], target.voxel_size_m[2])):
        position = ((torch.arange(n_dst, dtype=torch.float64) - n_dst / 2) * d_dst / d_src + n_src / 2)
        position = position.clamp(0, n_src - 1)
        lo = torch.floor(position).long().clamp(max=n_src - 2) if n_src > 1 else torch.zeros(n_dst, dtype=torch.long)
        w = (position - lo).to(field.dtype).to(field.device)
        hi = (lo + 1).clamp(max=n_src - 1)
        a = out.index_select(axis, lo.to(field.device))
        b = out.index_select(axis, hi.to(field.device))
        shape = [1] * out.ndim
        shape[axis] = n_dst
        out = a + (b - a) * w.reshape(shape)
    return out


def principal_indices(delta: torch.Tensor, medium_index: float, chunk_voxels: int = 1 << 20):
    """n_e, n_o [Z, Y, X] and director [3, Z, Y, X] of the tensor contrast ``delta`` [6, Z, Y, X]
    (``Delta = 2 n_m (N - n_m I)``, N the index tensor), eigen-decomposed in chunks. float32 is
    enough: against float64 the indices of a reconstruction differ by ~1e-8 (1e-6 at worst, for an
    exactly degenerate tensor) and birefringent voxels' directors by < 0.1 deg. Voxels of exactly
    the medium (most of a shrunk reconstruction) are the medium, director z^, without the work."""
    shape = delta.shape[1:]
    flat = delta.reshape(6, -1)
    sample = torch.nonzero((flat != 0).any(dim=0)).squeeze(1)
    ne = torch.full((flat.shape[1],), medium_index, dtype=torch.float32, device=delta.device)
    no = ne.clone()
    director = torch.zeros(3, flat.shape[1], dtype=torch.float32, device=delta.device)
    director[2] = 1.0
    for s in range(0, len(sample), chunk_voxels):
        voxels = sample[s:s + chunk_voxels]
        largest, smallest, vector = symmetric_eigen(flat[:, voxels].float())
        ne[voxels] = (medium_index + largest / (2 * medium_index)).float()
        no[voxels] = (medium_index + smallest / (2 * medium_index)).float()
        director[:, voxels] = vector.float()
    return ne.reshape(shape), no.reshape(shape), director.reshape(3, *shape)


def shrink_tensors(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """Group soft threshold of a tensor field [6, ...]: every voxel's tensor is scaled by
    ``max(0, 1 - threshold / |Delta|_F)``, the proximal step of ``threshold * sum |Delta|_F`` (a
    group-sparsity prior: most voxels are medium). Rotation invariant, so it keeps directors."""
    weights = torch.tensor([[1.0, 1.0, 1.0, 2.0, 2.0, 2.0]], dtype=delta.dtype, device=delta.device)
    norm = torch.sqrt(weights @ delta.reshape(6, -1).square()).reshape(delta.shape[1:])  # Frobenius
    factor = torch.clamp(1 - threshold / torch.clamp(norm, min=torch.finfo(delta.dtype).tiny), min=0.0)
    return delta * factor


def project_eigenvalues(delta: torch.Tensor, low: float, high: float, chunk_voxels: int = 1 << 20) -> torch.Tensor:
    """Nearest (Frobenius) tensor field [6, ...] whose eigenvalues lie in [low, high]: eigenvalues
    outside are clamped, eigenvectors kept (closed-form eigen-decomposition in float64, in chunks)."""
    flat = delta.reshape(6, -1)
    out = flat.clone()
    for s in range(0, flat.shape[1], chunk_voxels):
        part = flat[:, s:s + chunk_voxels].to(torch.float64, copy=True)  # never the caller's tensor
        values, vectors = symmetric_eigen_full(part)  # [3, n], [3(which), 3(x, y, z), n]
        change = values.clamp(min=low, max=high) - values  # add sum_i change_i v_i v_i^T
        for k, (a, b) in enumerate(((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))):
            part[k] += (change * vectors[:, a] * vectors[:, b]).sum(0)
        out[:, s:s + chunk_voxels] = part.to(out.dtype)
    return out.reshape(delta.shape)


class _RealSpace:
    """The constraint iterations' real-space step on a tensor contrast [6, Z, Y, X]: the
    ``shrinkage`` soft threshold of each voxel's tensor, and its eigenvalues clamped into
    ``index_bounds`` when given."""

    def __init__(self, options: FormulaOptions, medium_index: float) -> None:
        scale = 2 * medium_index
        self.shrink = scale * options.shrinkage
        self.bounds = None
        if options.index_bounds is not None:
            self.bounds = tuple(scale * (n - medium_index) for n in options.index_bounds)

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:
        if self.shrink > 0:
            delta = shrink_tensors(delta, self.shrink)
        if self.bounds is not None:
            delta = project_eigenvalues(delta, *self.bounds)
        return delta


@dataclass(frozen=True)
class _Iterate:
    """Gerchberg-Papoulis iterations for the missing cone, with Nesterov (FISTA) momentum on the
    real-space iterates (as good in 5 iterations as plain alternation in 10,
    docs/reconstruction.md). They alternate (a) real space (``_RealSpace``; the tensor lives on
    the volume grid only, the medium outside it) and (b) frequency space: at the measured
    frequencies the tensor is moved back onto its data (a relaxed projection
    ``x += G (A^T b - A^T A x)``, ``G`` the regularised inverse), elsewhere it keeps what the
    constraints filled in. The state is the last frequency-space iterate on the volume grid
    (``delta``) and the momentum; the output is ``real_space(delta)``, so shrinkage and bounds
    always hold (with 0 iterations they are applied once). Immutable: a warm start can be
    continued by several ``finalize`` calls."""

    delta: torch.Tensor
    previous: torch.Tensor | None = None
    t: float = 1.0

    @staticmethod
    def from_solution(plan: FourierPlan, inverse: torch.Tensor, rhs: torch.Tensor) -> "_Iterate":
        """The per-frequency solution ``G b`` on the volume grid: the iterations' start."""
        solution = torch.einsum("nij,nj->ni", inverse.to(torch.complex64), rhs)
        return _Iterate(plan.to_volume(plan.to_dense(solution)))

    def iterate(self, plan: FourierPlan, rhs: torch.Tensor, views, real_space: _RealSpace,
                iterations: int) -> "_Iterate":
        if not iterations:
            return self
        # the data step on the independent (kx >= 0) compact voxels: x <- G b + (I - G N) x
        solution, contraction = plan.data_step(views)
        target = torch.view_as_real(torch.einsum("nij,nj->ni", solution, rhs[plan.half_compact]))
        delta, previous, t_prev = self.delta, self.previous, self.t
        for _ in range(iterations):
            z = real_space(delta)
            t = (1 + math.sqrt(1 + 4 * t_prev * t_prev)) / 2
            extrapolated = z if previous is None else torch.lerp(previous, z, 1 + (t_prev - 1) / t)
            previous, t_prev = z, t
            half = plan.from_volume(extrapolated)
            x = torch.view_as_real(plan.to_compact(half).contiguous())  # [n, 6, 2]
            x = torch.view_as_complex(torch.baddbmm(target, contraction, x))
            half.reshape(6, -1)[:, plan.half_index] = x.T
            delta = plan.to_volume(half)
        return _Iterate(delta, previous, t_prev)
