"""Physics refinement: a reconstruction's volume fitted to the measured fields with the forward model.

A network (or the formula) gives a volume; the measured scattered fields of all views say how far
it is from explaining the acquisition (:mod:`.consistency`, the same fields and fits). The
refinement moves the volume until it explains them as well as the camera noise allows:

* **What moves.** Only voxels near the particles of the starting volume (where
  ``|n_e - n_m| + |n_o - n_m|`` exceeds ``mask_threshold``, grown by ``mask_growth_voxels``); the
  medium stays where the start put it. Each voxel is ``eps = n_o^2 I + w w^T`` with
  ``w = sqrt(n_e^2 - n_o^2) d``: uniaxial by construction with ``n_e >= n_o``, sign-free in the
  director, and a voxel the start calls isotropic stays isotropic (its gradient in ``w`` is 0).
* **Preconditioning.** The fields are far more sensitive to ``n_o`` (the mean phase) than to ``w``
  (the retardance), so plain gradients move ``n_o`` to absorb the birefringence's errors; ``w``
  is optimised as ``w / birefringence_step_scale``. Measured on a droplet of the single-droplet set
  (scale 1 against 30): n_o -4.5 dB against +1.4 dB, director 7.6 deg against 3.5 deg.
* **Optimiser.** L-BFGS with a strong-Wolfe line search on the relative residual
  ``sum ||S_m - S_s||^2 / sum ||S_m||^2`` over all received views (on the volume's footprint).
  Gradients come through :meth:`~biref_sdk.physics.MultiSlice.transmit_differentiable`, in
  ``view_groups`` groups of views, which bounds autograd's memory.
* **Stop** (the discrepancy principle): once the residual is at the noise's own, ``||noise||^2 /
  ||S_m||^2`` (sample and background frame, each measured in its spectrum where no signal is:
  :meth:`.ConsistencyCheck.scattered_fields`), or after ``max_iterations``. Fitting below the
  noise fits noise: on the single-droplet set n_e and the director got worse past that point.

The forward model is the simulator's, so on simulated data the fit is exact in the limit; the
benchmarks measure it on acquisitions made by independent physics too (exact Mie scattering, the
discrete dipole approximation: ``benchmarks/generalization_mie.py --refine``). The cost is tens of
forward and backward passes of all views: about a minute per acquisition of the ``small`` geometry
on two CPU cores, so it is an offline option (``biref reconstruct/evaluate --refine-iterations``),
not part of the streaming service's latency.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..files import Volume
from ..geometry import Geometry
from .base import ReconstructionSession, Reconstructor
from .consistency import ConsistencyCheck

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefineOptions:
    max_iterations: int = 8          # L-BFGS steps (each one or more forward and backward passes)
    view_groups: int = 6             # views per backward pass = V / view_groups (autograd's memory)
    mask_threshold: float = 1e-3     # |n_e - n_m| + |n_o - n_m| of the start where a particle is
    mask_growth_voxels: int = 2      # the particles' region grown by this many voxels
    birefringence_step_scale: float = 30.0  # w is optimised in units of 1/scale (preconditioning)
    stop_at_noise: float = 1.0       # stop once residual^2 <= this x the noise's
    update_smoothing_voxels: float = 1.0  # Gaussian sigma of the changes (0: voxel by voxel)

    def __post_init__(self) -> None:
        if self.max_iterations < 0:
            raise ValueError("max_iterations must be >= 0")
        if self.view_groups < 1:
            raise ValueError("view_groups must be >= 1")
        if self.mask_growth_voxels < 0 or self.mask_threshold <= 0:
            raise ValueError("mask_growth_voxels must be >= 0 and mask_threshold > 0")
        if not self.birefringence_step_scale > 0 or self.stop_at_noise < 0:
            raise ValueError("birefringence_step_scale must be > 0 and stop_at_noise >= 0")


def _gaussian_smoother(sigma_voxels: float, device):
    """A separable 3D Gaussian filter of fields [C, Z, Y, X] (identity for sigma 0): the fit's changes
    pass through it, so it cannot put single-voxel noise into the volume."""
    if sigma_voxels <= 0:
        return lambda fields: fields
    radius = max(1, int(math.ceil(2.5 * sigma_voxels)))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma_voxels) ** 2)
    taps = (taps / taps.sum()).to(device)

    def smooth(fields: torch.Tensor) -> torch.Tensor:
        out = fields[:, None]  # [C, 1, Z, Y, X]
        for axis in range(3):
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = taps.numel()
            padding = [0, 0, 0]
            padding[axis] = radius
            out = torch.nn.functional.conv3d(out, taps.view(shape), padding=tuple(padding))
        return out[:, 0]

    return smooth


def _aligned(director: torch.Tensor, weight: torch.Tensor, smooth) -> torch.Tensor:
    """The director [3, Z, Y, X] with each voxel's sign along its neighbourhood's axis (the leading
    eigenvector of the smoothed ``weight d d^T``, its largest component positive): the director's
    sign is arbitrary, and smoothed changes of ``w = sqrt(n_e^2 - n_o^2) d`` would cancel between
    neighbours of opposite sign."""
    outer = (weight * director)[:, None] * director[None, :]  # [3, 3, Z, Y, X]
    mean = smooth(outer.reshape(9, *director.shape[1:])).reshape(3, 3, -1).permute(2, 0, 1)
    axis = torch.linalg.eigh(mean.double())[1][:, :, 2].T.to(director.dtype).reshape(director.shape)
    # the eigenvector's own sign is arbitrary too: its largest component is made positive, which
    # neighbours with nearly the same axis share (they differ only where two components tie)
    largest = axis.abs().argmax(0, keepdim=True)
    axis = axis * torch.where(axis.gather(0, largest) < 0, -1.0, 1.0)
    sign = torch.where((director * axis).sum(0) < 0, -1.0, 1.0)
    return director * sign


def particle_region(volume: Volume, threshold: float, growth_voxels: int) -> torch.Tensor:
    """bool[Z, Y, X]: voxels within ``growth_voxels`` of one whose indices differ from the medium's
    by more than ``threshold`` in all (``|n_e - n_m| + |n_o - n_m|``)."""
    deviation = np.abs(volume.ne - volume.medium_index) + np.abs(volume.no - volume.medium_index)
    region = torch.as_tensor(deviation > threshold, dtype=torch.float32)[None, None]
    if growth_voxels:
        size = 2 * growth_voxels + 1
        region = torch.nn.functional.max_pool3d(region, size, stride=1, padding=growth_voxels)
    return region[0, 0] > 0


class Refiner:
    """Fits volumes to the demodulated fields of one geometry (module docstring). Built once per
    geometry: the consistency check's fits and footprint, one forward model per group of views."""

    def __init__(self, geometry: Geometry, options: RefineOptions = RefineOptions(), device="cpu") -> None:
        from ..physics import MultiSlice

        self.geometry = geometry
        self.options = options
        self.device = torch.device(device)
        self.check = ConsistencyCheck(geometry, "all", device=device)
        groups = min(options.view_groups, geometry.n_views)
        self._groups = [np.arange(geometry.n_views)[i::groups] for i in range(groups)]
        self._optics = [MultiSlice(geometry.replace(illumination_sines=geometry.sines[views]), device=device)
                        for views in self._groups]
        self._illumination = [optics.illumination() for optics in self._optics]

    def refine(self, volume: Volume, holograms: np.ndarray, background: np.ndarray,
               received: np.ndarray | None = None) -> Volume:
        """The refined copy of ``volume``; ``holograms``, ``background``: the acquisition's frames
        [2, V, H, W]; ``received`` bool[2, V] (all by default): the views to fit.
        ``parameters["refinement"]`` records the residuals, the noise, the steps and why it stopped."""
        from ..samples.tensor import _PAIRS, eps6_to_volume

        began = time.perf_counter()
        opts = self.options
        check = self.check
        noise_variance = check.frame_noise(holograms) + check.frame_noise(background)
        scattered, noise_energy = check.scattered_fields(check.demodulate(holograms), check.demodulate(background),
                                                         noise_variance)
        weight = torch.ones(2, self.geometry.n_views, device=self.device)
        if received is not None:
            weight = torch.as_tensor(np.asarray(received, dtype=np.float32), device=self.device)
        signal = float((check.footprint_energy(scattered) * weight).sum())
        if signal <= 0:
            raise ValueError("no scattered field to fit: the received views carry no signal")
        floor = float((noise_energy * weight).sum()) / signal

        region = particle_region(volume, opts.mask_threshold, opts.mask_growth_voxels).to(self.device)
        no_start = torch.as_tensor(volume.no, dtype=torch.float32, device=self.device)
        director = torch.as_tensor(volume.director, dtype=torch.float32, device=self.device)
        smooth = _gaussian_smoother(opts.update_smoothing_voxels, self.device)
        birefringence = torch.sqrt((torch.as_tensor(volume.ne, device=self.device) ** 2 - no_start**2).clamp_min(0))
        if opts.update_smoothing_voxels > 0:  # smoothed changes need neighbours of one sign
            director = _aligned(director, birefringence, smooth)
        w_start = birefringence * director
        scale = opts.birefringence_step_scale
        # the changes, as fields whose smoothed copy (inside the region) is added to the start
        no_free = torch.zeros_like(no_start, requires_grad=True)
        w_free = torch.zeros_like(w_start, requires_grad=True)
        inside = region.to(no_start.dtype)
        medium = self.geometry.medium_index**2
        start_eps = torch.stack([no_start**2 * (i == j) + w_start[i] * w_start[j] for i, j in _PAIRS])
        active = region | ((start_eps[:3] - medium).abs().amax(0) + start_eps[3:].abs().amax(0) > 1e-7)

        def eps6() -> torch.Tensor:
            no = no_start + smooth(no_free[None])[0] * inside
            w = w_start + smooth(w_free) * (inside * scale)
            return torch.stack([no**2 * (i == j) + w[i] * w[j] for i, j in _PAIRS])

        def residual(backward: bool) -> float:
            with torch.set_grad_enabled(backward):
                volume_eps6 = eps6()
            # the groups' gradients gather on a detached copy, then flow once through eps6()
            tensor = volume_eps6.detach().requires_grad_(backward)
            total = 0.0
            for views, optics, illumination in zip(self._groups, self._optics, self._illumination):
                index = torch.as_tensor(views, device=self.device)
                with torch.set_grad_enabled(backward):
                    simulated = optics.transmit_differentiable(tensor, volume.voxel_size_m, active) - illumination
                    miss = check.footprint_energy(scattered[:, index] - simulated)
                    part = (miss * weight[:, index]).sum() / signal
                if backward:
                    part.backward()
                total += float(part.detach())
            if backward:
                volume_eps6.backward(tensor.grad)
            return total

        optimiser = torch.optim.LBFGS([no_free, w_free], lr=1.0, max_iter=1, history_size=10,
                                      line_search_fn="strong_wolfe")

        def closure():
            optimiser.zero_grad()
            return torch.tensor(residual(backward=True))

        history = [residual(backward=False)]
        stopped = "max_iterations"
        for _ in range(opts.max_iterations):
            if history[-1] <= opts.stop_at_noise * floor:
                stopped = "noise"
                break
            before = [no_free.detach().clone(), w_free.detach().clone()]
            optimiser.step(closure)
            history.append(residual(backward=False))
            if history[-1] > history[-2] * (1 - 1e-4):
                stopped = "no_progress"
                if history[-1] > history[-2]:  # a failed line search: keep the better volume
                    with torch.no_grad():
                        no_free.copy_(before[0])
                        w_free.copy_(before[1])
                    history.pop()  # the residuals listed are those of the volumes kept
                break
        else:
            if history[-1] <= opts.stop_at_noise * floor:
                stopped = "noise"
        with torch.no_grad():
            refined = eps6_to_volume(eps6(), volume.voxel_size_m, volume.medium_index)
        report = {"residual_squared": [round(h, 6) for h in history], "noise_squared": round(floor, 6),
                  "steps": len(history) - 1, "stopped": stopped, "voxels": int(region.sum()),
                  "seconds": round(time.perf_counter() - began, 3), "options": asdict(opts)}
        log.info("refined in %d steps (%s): residual^2 %.4f -> %.4f, noise %.4f, %.1f s", report["steps"], stopped,
                 history[0], history[-1], floor, report["seconds"])
        return Volume(ne=refined.ne, no=refined.no, director=refined.director, voxel_size_m=volume.voxel_size_m,
                      medium_index=volume.medium_index, uncertainty=volume.uncertainty,
                      parameters={**volume.parameters, "refinement": report})


class RefinedSession(ReconstructionSession):
    """Feeds the wrapped session and keeps the raw frames; ``finalize`` refines its volume."""

    def __init__(self, inner: ReconstructionSession, refiner: Refiner, background: np.ndarray) -> None:
        super().__init__(inner.geometry)
        self.inner = inner
        self._refiner = refiner
        self._background = np.asarray(background)
        self._frames = np.zeros((2, inner.geometry.n_views, *inner.geometry.hologram_shape), dtype=np.float32)

    def _add_view(self, polarization: int, view: int, hologram: np.ndarray) -> None:
        self.inner.add_view(polarization, view, hologram)
        self._frames[polarization, view] = hologram

    def finalize(self, allow_missing: bool = False) -> Volume:
        volume = self.inner.finalize(allow_missing=allow_missing)
        try:
            return self._refiner.refine(volume, self._frames, self._background, self.received.copy())
        except Exception as error:  # the wrapped volume is a result; a failed fit must not lose it
            log.warning("refinement failed: %s: %s", type(error).__name__, error)
            volume.parameters = {**volume.parameters, "refinement_error": f"{type(error).__name__}: {error}"}
            return volume

    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class PhysicsRefined(Reconstructor):
    """Any reconstructor whose volumes are refined against the measured fields (module docstring)."""

    def __init__(self, inner: Reconstructor, options: RefineOptions = RefineOptions(), device="cpu") -> None:
        self.inner = inner
        self.name = f"{inner.name}+refined"
        self.options = options
        self._device = device
        self._refiners: dict[Geometry, Refiner] = {}

    def refiner_for(self, geometry: Geometry) -> Refiner:
        refiner = self._refiners.get(geometry)
        if refiner is None:
            refiner = self._refiners[geometry] = Refiner(geometry, self.options, self._device)
        return refiner

    def session_bytes(self, geometry: Geometry) -> int:
        """The wrapped session's plus the kept frames; the fit's own working memory (autograd over one
        group of views, about 1 GB for ``small``) comes and goes within ``finalize``."""
        frames = 2 * geometry.n_views * math.prod(geometry.hologram_shape) * 4
        return int(self.inner.session_bytes(geometry)) + frames

    def start(self, geometry: Geometry, background: np.ndarray) -> RefinedSession:
        return RefinedSession(self.inner.start(geometry, background), self.refiner_for(geometry), background)

    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
