"""Physics refinement: a reconstruction's volume fitted to the measured fields with the forward model.

A network (or the formula) gives a volume; the measured scattered fields of all views say how far
it is from explaining the acquisition (:mod:`.consistency`, the same fields and fits). The
refinement moves the volume until it explains them as well as the camera noise allows:

* **What moves** (``model="voxels"``, the default). Only voxels near the particles of the start (where
  ``|n_e - n_m| + |n_o - n_m|`` exceeds ``mask_threshold``, grown by ``mask_growth_voxels``); the
  medium stays where the start put it. Each voxel is ``eps = n_o^2 I + w w^T`` with
  ``w = sqrt(n_e^2 - n_o^2) d``: uniaxial by construction with ``n_e >= n_o``, sign-free in the
  director, and a voxel the start calls isotropic stays isotropic (its gradient in ``w`` is 0).
* **Or particles** (``model="particles"``): each particle of the start is one material
  (:mod:`.particles`: the start is first rebuilt so), and the fit moves its two levels, ``n_o``
  and ``sqrt(n_e^2 - n_o^2)``, and every voxel's director (its changes smoothed as the voxels
  model's are), in
  ``eps = n_m^2 I + f (eps_k(d) - n_m^2 I)``. Two numbers per particle instead of two per voxel:
  the fields fix them far better. The shapes are the start's particles read as spheroids
  (``particle_shape="spheroid"``, :func:`~.particles.spheroid_shapes`) or voxel by voxel
  (``"voxels"``). ``fit_shapes`` fits each spheroid's centre and radius (and a spheroid's aspect
  and axis) too, through :func:`~.particles.soft_spheroid_occupancy`: a handful of numbers per
  particle, which the fields fix where they cannot fix a voxel's occupancy (with exact Mie fields
  it finds a sphere's radius within 0.3 % and its centre within a tenth of a voxel); and the
  occupancy of each particle that no spheroid fits, its changes smoothed as the director's (the
  fields fix such a shape's coarse form, not its voxels). Otherwise the occupancy ``f`` stays the
  start's unless ``fit_occupancy`` (everywhere, voxel by voxel): the fields hardly constrain a
  single voxel's surface along the axis (the missing cone), and on the network's volumes fitting
  it lowered n_e (docs/reconstruction.md); on a sphere whose size is wrong, with exact Mie
  fields, it recovers the size (tests/test_particles.py). It then
  carries a prior that a voxel is particle or medium, the double well ``16 f^2 (1 - f)^2``,
  weighted so that a region of half-full voxels costs ``binary_weight`` x the noise's residual,
  and a penalty on ``f`` outside [0, 1]. An isotropic particle stays isotropic. The levels step
  ``level_step_scale`` of a voxel's (a level moves thousands of voxels at once).
* **Director configurations** (``fit_configurations``, with ``fit_shapes``): after the fit, each
  fitted spheroid droplet's director is replaced by the closed-form nematic configuration that
  agrees with it best (:mod:`.configurations`: bipolar, twisted bipolar, radial, preradial,
  uniform, on any axis), where one agrees well; then ``configuration_iterations`` more steps refit
  the levels and shapes with that director held. The fields judge it: if they are explained
  worse than with the free director (by more than ``CONFIGURATION_RESIDUAL_TOLERANCE``), the free
  fit is kept. The free director scatters by several degrees voxel by voxel (the missing cone);
  the closed form does not.
* **Shape restarts** (``restart_shapes``, with ``fit_configurations``): before the configurations,
  the droplets whose fitted spheroid is neither a sphere nor prolate along its closed form's axis
  (a local minimum of the shape fit: a small droplet read oblate across the axis along which it is
  prolate) are restarted at those two shapes, and then each isotropic bead read elongated as a
  sphere, the fields choosing (:meth:`Refiner._restarted`).
* **Preconditioning.** The fields are far more sensitive to ``n_o`` (the mean phase) than to ``w``
  (the retardance), so plain gradients move ``n_o`` to absorb the birefringence's errors; ``w``
  is optimised as ``w / birefringence_step_scale``. Measured on a droplet of the single-droplet set
  (scale 1 against 30): n_o -4.5 dB against +1.4 dB, director 7.6 deg against 3.5 deg.
* **Optimiser.** L-BFGS with a strong-Wolfe line search (up to 5 trial steps) on the relative
  residual ``sum ||S_m - S_s||^2 / sum ||S_m||^2`` over all received views (on the volume's
  footprint).
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
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from ..files import Volume
from ..geometry import Geometry
from ..samples.tensor import _PAIRS, eps6_to_volume
from ._eigen import symmetric_eigen
from .base import ReconstructionSession, Reconstructor
from .configurations import configured_director
from .consistency import ConsistencyCheck
from .particles import (SHAPES, ParticleMap, dilate, particle_report, segment_particles, soft_spheroid_occupancy,
                        spheroid_droplet)

log = logging.getLogger(__name__)

MODELS = ("voxels", "particles")
#: fit_configurations keeps the closed-form directors if the fields' residual with them is at most this
#: much above the free director's (relative; right ones ended -2.9 % to +1.3 % from it on validation
#: fields, a wrong one at more than twice it): docs/reconstruction.md, "Director configurations"
CONFIGURATION_RESIDUAL_TOLERANCE = 0.05
#: restart_shapes restarts a droplet prolate along its closed form's axis with this aspect (nematic
#: droplets are spheres or elongated along that axis; the fit moves the aspect on from here)
RESTART_ASPECT = 1.3
#: a fitted spheroid at least this prolate within this angle of its closed form's axis is not restarted
PROLATE_ASPECT, PROLATE_ANGLE_DEG = 1.1, 20.0


@dataclass(frozen=True)
class RefineOptions:
    max_iterations: int = 8          # L-BFGS steps (each one or more forward and backward passes)
    view_groups: int = 6             # views per backward pass = V / view_groups (autograd's memory)
    mask_threshold: float = 1e-3     # voxels: |n_e - n_m| + |n_o - n_m| of the start where a particle is
    mask_growth_voxels: int = 2      # the particles' region grown by this many voxels
    birefringence_step_scale: float = 30.0  # w is optimised in units of 1/scale (preconditioning)
    stop_at_noise: float = 1.0       # stop once residual^2 <= this x the noise's
    update_smoothing_voxels: float = 1.0  # Gaussian sigma of the changes (n_o, w; director, occupancy); 0: none
    model: str = "voxels"            # what moves: "voxels" (n_o, w per voxel) or "particles" (module docstring)
    level_step_scale: float = 3.3e-4  # particles: their levels' step against a voxel's (preconditioning)
    fit_occupancy: bool = False      # particles: fit the shapes too (the start's otherwise; docstring)
    binary_weight: float = 1.0       # particles: the prior that a voxel is particle or medium, in noise units
    particle_shape: str = "spheroid"  # particles: the start's shapes, "spheroid" or "voxels" (.particles)
    fit_shapes: bool = False         # particles: fit spheroids' centre, size (axis, aspect), others' occupancy
    shape_step_scale: float = 0.05   # particles: a shape parameter's step, in voxels of surface motion
    fit_configurations: bool = False  # particles with fit_shapes: spheroid droplets' director as a closed form
    configuration_iterations: int = 10  # then this many more steps with that director held (.configurations)
    restart_shapes: bool = False     # with fit_configurations: droplets' shapes restarted first (docstring)
    restart_iterations: int = 8      # steps from each restart before the fields judge it

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.particle_shape not in SHAPES:
            raise ValueError(f"particle_shape must be one of {SHAPES}, got {self.particle_shape!r}")
        if self.fit_shapes and self.fit_occupancy:
            raise ValueError("fit_shapes and fit_occupancy are two ways to move the shapes: choose one")
        if self.fit_configurations and not (self.model == "particles" and self.fit_shapes):
            raise ValueError("fit_configurations needs the particles model with fit_shapes (the fitted spheroids)")
        if self.restart_shapes and not self.fit_configurations:
            raise ValueError("restart_shapes needs fit_configurations (the closed forms' axes)")
        if self.configuration_iterations < 0 or self.restart_iterations < 0:
            raise ValueError("configuration_iterations and restart_iterations must be >= 0")
        if not self.level_step_scale > 0 or self.binary_weight < 0 or not self.shape_step_scale > 0:
            raise ValueError("level_step_scale and shape_step_scale must be > 0 and binary_weight >= 0")
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
    # closed form, not torch.linalg.eigh: cuSOLVER's batched eigh failed on CUDA (H200, torch 2.11)
    outer = torch.stack([weight * director[i] * director[j] for i, j in _PAIRS])  # [6, Z, Y, X]
    _, _, axis = symmetric_eigen(smooth(outer))
    # the eigenvector's own sign is arbitrary too: its largest component is made positive, which
    # neighbours with nearly the same axis share (they differ only where two components tie)
    largest = axis.abs().argmax(0, keepdim=True)
    axis = axis * torch.where(axis.gather(0, largest) < 0, -1.0, 1.0)
    sign = torch.where((director * axis).sum(0) < 0, -1.0, 1.0)
    return director * sign


def _birefringence(volume: Volume, device) -> torch.Tensor:
    """``sqrt(n_e^2 - n_o^2)`` of each voxel (0 where n_e < n_o)."""
    ne = torch.as_tensor(volume.ne, dtype=torch.float32, device=device)
    no = torch.as_tensor(volume.no, dtype=torch.float32, device=device)
    return torch.sqrt((ne**2 - no**2).clamp_min(0))


def _start_director(volume: Volume, birefringence: torch.Tensor, opts: RefineOptions, smooth) -> torch.Tensor:
    """The start's director, its signs aligned where the changes are smoothed (they need neighbours
    of one sign; ``birefringence`` weighs each voxel's say)."""
    # contiguous: a transposed caller's array would give gradients L-BFGS cannot flatten
    director = torch.as_tensor(np.ascontiguousarray(volume.director), dtype=torch.float32,
                               device=birefringence.device)
    if opts.update_smoothing_voxels > 0:
        director = _aligned(director, birefringence, smooth)
    return director


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

        fit = (_ParticleFit if opts.model == "particles" else _VoxelFit)(volume, opts, self.device)
        medium = self.geometry.medium_index**2
        with torch.no_grad():
            start_eps = fit.eps6()
        # every voxel the fit may change, and every one the start already holds
        active = fit.region | ((start_eps[:3] - medium).abs().amax(0) + start_eps[3:].abs().amax(0) > 1e-7)

        def residual(backward: bool) -> tuple[float, float]:
            """(the fields' relative residual, the prior's penalty); gradients into the fit's parameters."""
            with torch.set_grad_enabled(backward):
                volume_eps6 = fit.eps6()
                penalty = fit.penalty(floor)
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
                if penalty.requires_grad:
                    penalty.backward()
            return total, float(penalty.detach())

        history = [residual(backward=False)]  # (residual, penalty) of each volume kept
        stopped = _optimise(fit.parameters, residual, history, opts.max_iterations, opts.stop_at_noise * floor)
        extra = {}
        if opts.restart_shapes:
            stopped, extra = self._restarted(fit, residual, history, floor, stopped)
        if opts.fit_configurations:
            stopped, configured = self._configured(fit, residual, history, floor, stopped)
            extra.update(configured)
        with torch.no_grad():
            refined = fit.volume()
        report = {"model": opts.model, "residual_squared": [round(h[0], 6) for h in history],
                  "noise_squared": round(floor, 6), "steps": len(history) - 1, "stopped": stopped,
                  "voxels": int(fit.region.sum()), "seconds": round(time.perf_counter() - began, 3),
                  "options": asdict(opts), **fit.report(), **extra}
        log.info("refined (%s) in %d steps (%s): residual^2 %.4f -> %.4f, noise %.4f, %.1f s", opts.model,
                 report["steps"], stopped, history[0][0], history[-1][0], floor, report["seconds"])
        return Volume(ne=refined.ne, no=refined.no, director=refined.director, voxel_size_m=volume.voxel_size_m,
                      medium_index=volume.medium_index, uncertainty=volume.uncertainty,
                      parameters={**volume.parameters, "refinement": report})

    def _restarted(self, fit: "_ParticleFit", residual, history: list, floor: float, stopped: str):
        """The shape fit stops in local minima: a droplet read oblate, or prolate across the axis
        along which it is prolate. Nematic droplets are spheres or prolate along their configuration's
        axis, so the droplets whose fitted spheroid is neither (the axis of their closed form,
        :func:`~.configurations.configured_director`, agreeing well or not) are restarted at those
        shapes (same centre and volume): first all as spheres (if the fields refuse that, each alone),
        then one by one prolate along that axis; last, each isotropic bead whose spheroid is not a
        sphere is restarted as one, alone. Each try takes ``restart_iterations`` steps from the
        best fit so far and replaces it where the residual is lower. Returns (why the fit stopped,
        the report's additions)."""
        with torch.no_grad():
            particles = fit.fitted_particles()
            director = fit.volume().director
        birefringent = particles.ne > particles.no
        _, rows = configured_director(director, particles, fit.voxel_size_m, birefringent)
        spheres, tries = [], []
        for row in rows:
            shape = fit.spheroid_shape(row["particle"])
            if shape is None:
                continue
            aspect, axis = shape
            closed_axis = None if row["configuration"] == "radial" else np.asarray(row["axis"][::-1])
            if closed_axis is not None:
                angle = math.degrees(math.acos(min(1.0, abs(float(closed_axis @ axis)))))
                if aspect >= PROLATE_ASPECT and angle <= PROLATE_ANGLE_DEG:
                    continue  # already what a nematic droplet is
                tries.append(("prolate", [(row["particle"], RESTART_ASPECT, closed_axis)]))
            if aspect != 1.0:
                spheres.append((row["particle"], 1.0, axis))
        # isotropic beads (spheres 80 % of the time in the simulator) last and each alone, so that a
        # bead's try cannot change which of the droplets' tries the fields keep
        for particle in np.flatnonzero(~birefringent) + 1:
            shape = fit.spheroid_shape(int(particle))
            if shape is not None and shape[0] != 1.0:
                tries.append(("isotropic sphere", [(int(particle), 1.0, shape[1])]))
        report = {"shape_restarts": []}
        best = history[-1][0]
        target = self.options.stop_at_noise * floor
        if spheres:
            tries.insert(0, ("sphere", spheres))
        while tries:
            name, restarts = tries.pop(0)
            saved = fit.checkpoint()
            for particle, aspect, axis in restarts:
                fit.restart_spheroid(particle, aspect, axis)
            after = [residual(backward=False)]
            why = _optimise_through_stalls(fit.parameters, residual, after, self.options.restart_iterations, target)
            better = after[-1][0] < best
            report["shape_restarts"].append({"restart": name, "particles": [r[0] for r in restarts],
                                             "residual_squared": round(after[-1][0], 6), "kept": better})
            if better:
                best, stopped = after[-1][0], why
                history.extend(after[1:])
                continue
            fit.restore(saved)
            if name == "sphere" and len(restarts) > 1:  # one of them may be elongated: each alone
                tries[:0] = [("sphere", [restart]) for restart in restarts]
        return stopped, report

    def _configured(self, fit: "_ParticleFit", residual, history: list, floor: float, stopped: str):
        """Each fitted spheroid droplet's director set to its closed-form configuration
        (:func:`~.configurations.configured_director`), then ``configuration_iterations`` more steps
        with it held (the levels and shapes refitted to it). Kept only if the fields agree with it
        nearly as well as with the free director (``CONFIGURATION_RESIDUAL_TOLERANCE``), or to the
        noise: a closed form that is wrong for a droplet raises the residual. Returns (why the fit
        stopped, the report's additions)."""
        opts = self.options
        with torch.no_grad():
            particles = fit.fitted_particles()
            director = fit.volume().director
        configured, rows = configured_director(director, particles, fit.voxel_size_m, particles.ne > particles.no)
        held = np.isin(particles.owner, [row["particle"] for row in rows if row["used"]])
        report = {"configurations": rows}
        if not held.any():
            return stopped, report
        saved = fit.checkpoint()
        fit.hold_director(configured, held)
        target = opts.stop_at_noise * floor
        after = [residual(backward=False)]
        configured_stop = _optimise(fit.parameters, residual, after, opts.configuration_iterations, target)
        kept = after[-1][0] <= max(history[-1][0] * (1 + CONFIGURATION_RESIDUAL_TOLERANCE), target)
        report.update(configuration_residual_squared=[round(h[0], 6) for h in after], configurations_kept=kept)
        if not kept:
            fit.restore(saved)
            return stopped, report
        history.extend(after[1:])
        return configured_stop, report


def _optimise(parameters, residual, history: list, iterations: int, target: float) -> str:
    """L-BFGS steps on ``parameters`` until ``residual`` (a function of whether to backpropagate,
    returning (the fields' residual, the prior's penalty)) reaches ``target`` or stops falling;
    each kept volume's pair is appended to ``history``. Returns why it stopped."""
    # max_eval: room for the line search to shrink a first step that overshoots
    optimiser = torch.optim.LBFGS(parameters, lr=1.0, max_iter=1, max_eval=6, history_size=10,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        return torch.tensor(sum(residual(backward=True)))

    for _ in range(iterations):
        if history[-1][0] <= target:
            return "noise"
        before = [p.detach().clone() for p in parameters]
        optimiser.step(closure)
        history.append(residual(backward=False))
        if sum(history[-1]) > sum(history[-2]) * (1 - 1e-4):
            if sum(history[-1]) > sum(history[-2]):  # a failed line search: keep the better volume
                with torch.no_grad():
                    for parameter, kept in zip(parameters, before):
                        parameter.copy_(kept)
                history.pop()
            return "no_progress"
    return "noise" if history[-1][0] <= target else "max_iterations"


def _optimise_through_stalls(parameters, residual, history: list, iterations: int, target: float) -> str:
    """:func:`_optimise` for ``iterations`` steps in all, with a fresh L-BFGS memory after a stop
    for want of progress that followed a kept step: from a restarted shape the line search stalls
    after a step or two, and a fresh start goes on (on a validation droplet: 1 step and stopped at
    0.042016, then 4 more to 0.041789). Returns why it stopped."""
    while True:
        steps = len(history)
        why = _optimise(parameters, residual, history, iterations, target)
        iterations -= len(history) - steps
        if why != "no_progress" or len(history) == steps or iterations <= 0:
            return why


class _VoxelFit:
    """The ``voxels`` model: n_o and ``w = sqrt(n_e^2 - n_o^2) d`` of every voxel near the particles,
    their changes smoothed (module docstring)."""

    def __init__(self, volume: Volume, opts: RefineOptions, device) -> None:
        self.region = particle_region(volume, opts.mask_threshold, opts.mask_growth_voxels).to(device)
        self._voxel_size_m, self._medium_index = volume.voxel_size_m, volume.medium_index
        self._no_start = torch.as_tensor(volume.no, dtype=torch.float32, device=device)
        self._smooth = _gaussian_smoother(opts.update_smoothing_voxels, device)
        birefringence = _birefringence(volume, device)
        self._w_start = birefringence * _start_director(volume, birefringence, opts, self._smooth)
        self._scale = opts.birefringence_step_scale
        self._inside = self.region.to(torch.float32)
        # the changes, as fields whose smoothed copy (inside the region) is added to the start
        self._no_free = torch.zeros_like(self._no_start, requires_grad=True)
        self._w_free = torch.zeros_like(self._w_start, requires_grad=True)
        self.parameters = [self._no_free, self._w_free]

    def eps6(self) -> torch.Tensor:
        no = self._no_start + self._smooth(self._no_free[None])[0] * self._inside
        w = self._w_start + self._smooth(self._w_free) * (self._inside * self._scale)
        return torch.stack([no**2 * (i == j) + w[i] * w[j] for i, j in _PAIRS])

    def penalty(self, floor: float) -> torch.Tensor:
        return torch.zeros(())

    def volume(self) -> Volume:
        return eps6_to_volume(self.eps6(), self._voxel_size_m, self._medium_index)

    def report(self) -> dict:
        return {}


class _ParticleFit:
    """The ``particles`` model: each particle's (n_o, sqrt(n_e^2 - n_o^2)), each voxel's occupancy and
    director (:mod:`.particles`), with a prior that pulls the occupancy to 0 or 1."""

    def __init__(self, volume: Volume, opts: RefineOptions, device) -> None:
        particles = segment_particles(volume, growth_voxels=opts.mask_growth_voxels, shape=opts.particle_shape)
        if particles.count == 0:
            raise ValueError("the start volume holds no particle to fit")
        self._particles = particles
        self._voxel_size_m, self._medium_index = volume.voxel_size_m, volume.medium_index
        self._spheroids = _SpheroidShapes(particles, volume.voxel_size_m, opts, device) if opts.fit_shapes else None
        # the spheroids' surfaces may move into the medium around them: their owner map is grown
        self._owner = particles.owner if self._spheroids is None else self._spheroids.owner
        owner = torch.as_tensor(self._owner, device=device)
        self.region = owner > 0
        self._inside = self.region.to(torch.float32)
        self._level = (owner - 1).clamp_min(0)
        self._no_start = torch.as_tensor(particles.no, dtype=torch.float32, device=device)
        # an isotropic particle's 0 has no gradient in b: it stays isotropic
        self._b_start = torch.sqrt(torch.as_tensor(np.maximum(particles.ne**2 - particles.no**2, 0),
                                                   dtype=torch.float32, device=device))
        self._f_start = torch.as_tensor(particles.occupancy, dtype=torch.float32, device=device)
        # the director's changes are smoothed as the voxel model's are (validation: docs/reconstruction.md)
        self._smooth = _gaussian_smoother(opts.update_smoothing_voxels, device)
        self._director_start = _start_director(volume, _birefringence(volume, device), opts, self._smooth)
        self._level_step = opts.level_step_scale
        self._scale = opts.birefringence_step_scale
        self._binary_weight = opts.binary_weight
        self._fit_occupancy = opts.fit_occupancy
        # where the occupancy moves (None: nowhere): every voxel with fit_occupancy; with fit_shapes, the
        # particles no spheroid fits, their changes smoothed (the fields fix such a shape's coarse form)
        self._f_moves, self._f_smooth = None, _gaussian_smoother(0, device)
        if opts.fit_occupancy:
            self._f_moves = self._inside
        elif opts.fit_shapes and "voxels" in particles.shapes:
            voxels_shaped = torch.as_tensor([0.0] + [float(kind == "voxels") for kind in particles.shapes],
                                            dtype=torch.float32, device=device)
            self._f_moves = voxels_shaped[torch.as_tensor(particles.owner, device=device)]
            self._f_smooth = self._smooth
        self._levels_free = torch.zeros(2, particles.count, device=device, requires_grad=True)
        self._f_free = torch.zeros_like(self._f_start, requires_grad=self._f_moves is not None)
        self._director_free = torch.zeros_like(self._director_start, requires_grad=True)
        self._director_moves = self._inside
        self.parameters = [self._levels_free, self._director_free]
        if self._f_moves is not None:
            self.parameters.append(self._f_free)
        if self._spheroids is not None and self._spheroids.count:
            self.parameters.append(self._spheroids.free)

    def _state(self):
        no = self._no_start + self._levels_free[0] * self._level_step
        b = self._b_start + self._levels_free[1] * (self._level_step * self._scale)
        f = self._f_start
        if self._f_moves is not None:
            f = f + self._f_smooth(self._f_free[None])[0] * self._f_moves
        if self._spheroids is not None:
            f = self._spheroids.paint(f)
        d = self._director_start + self._smooth(self._director_free) * self._director_moves
        return no, b, f, d / d.norm(dim=0, keepdim=True).clamp_min(1e-6)

    @property
    def voxel_size_m(self):
        return self._voxel_size_m

    def hold_director(self, director: np.ndarray, held: np.ndarray) -> None:
        """From here on the director is ``director`` [3, Z, Y, X] where ``held``, and moves on from its
        current value elsewhere."""
        with torch.no_grad():
            current = self._state()[3]
            held = torch.as_tensor(held, device=current.device)
            self._director_start = torch.where(held, torch.as_tensor(director, device=current.device), current)
            self._director_free.zero_()
            self._director_moves = self._inside * ~held

    def checkpoint(self):
        starts = None if self._spheroids is None else self._spheroids.starts()
        return [p.detach().clone() for p in self.parameters], self._director_start, self._director_moves, starts

    def restore(self, checkpoint) -> None:
        values, self._director_start, self._director_moves, starts = checkpoint
        if starts is not None:
            self._spheroids.set_starts(starts)
        with torch.no_grad():
            for parameter, value in zip(self.parameters, values):
                parameter.copy_(value)

    def spheroid_shape(self, particle: int):
        """(aspect, axis zyx) of ``particle``'s fitted spheroid; None where it has none."""
        if self._spheroids is None or particle not in self._spheroids.ids:
            return None
        return self._spheroids.shape(particle)

    def restart_spheroid(self, particle: int, aspect: float, axis_zyx) -> None:
        self._spheroids.restart(particle, aspect, axis_zyx)

    def fitted_particles(self) -> ParticleMap:
        """The particles as now fitted, each fitted spheroid as a uniform ``Droplet``."""
        particles = self._fitted()
        spheroids = list(particles.spheroids or (None,) * particles.count)
        if self._spheroids is not None:
            for k, droplet in self._spheroids.droplets(self._medium_index).items():
                spheroids[k - 1] = droplet
        return replace(particles, spheroids=tuple(spheroids))

    def eps6(self) -> torch.Tensor:
        no, b, f, d = self._state()
        medium = self._medium_index**2
        isotropic = medium + (no[self._level] ** 2 - medium) * f * self._inside
        birefringence = b[self._level] ** 2 * f * self._inside
        return torch.stack([isotropic * (i == j) + birefringence * d[i] * d[j] for i, j in _PAIRS])

    def penalty(self, floor: float) -> torch.Tensor:
        """``binary_weight`` x the noise's residual when every voxel of the region is half full (the
        double well ``16 f^2 (1 - f)^2`` averaged over the region; 0 when all are 0 or 1), and the
        mean squared excursion of ``f`` outside [0, 1] where it moves (with ``fit_shapes`` only the
        latter: a shape unlike a spheroid keeps the partial volumes of the start's blur)."""
        if self._f_moves is None:
            return torch.zeros(())
        f = self._state()[2]
        voxels = self._f_moves.sum().clamp_min(1)
        # outside [0, 1] an occupancy is unphysical: it would trade a particle's level for its size
        beyond = ((f - f.clamp(0, 1)) ** 2 * self._f_moves).sum() / voxels
        if not self._fit_occupancy:
            return beyond
        well = (16 * (f * (1 - f)) ** 2 * self._inside).sum() / voxels
        return self._binary_weight * floor * well + beyond

    def _fitted(self, state=None) -> ParticleMap:
        no, b, f, _ = state or self._state()
        return ParticleMap(owner=self._owner, occupancy=f.detach().clamp(0, 1).cpu().numpy(),
                           ne=torch.sqrt(no**2 + b**2).detach().double().cpu().numpy(),
                           no=no.detach().double().cpu().numpy(), shapes=self._particles.shapes,
                           spheroids=self._particles.spheroids)

    def volume(self) -> Volume:
        state = self._state()  # once: with fitted spheroids it renders them
        ne, no = self._fitted(state).indices(self._medium_index)
        director = state[3].detach().cpu().numpy()
        return Volume(ne=ne, no=no, director=director, voxel_size_m=self._voxel_size_m,
                      medium_index=self._medium_index)

    def report(self) -> dict:
        report = {"particles": particle_report(self._fitted())}
        if self._spheroids is not None:
            report["particles"]["spheroids"] = self._spheroids.report()
        return report


class _SpheroidShapes:
    """The ``fit_shapes`` parameters: each spheroid particle's centre, equatorial radius and (not for
    a sphere) aspect and axis, as changes from its start in units of ``shape_step_scale`` voxels of
    surface motion. Its surface may move into the medium within ``mask_growth_voxels`` of it; the
    occupancy there is :func:`~.particles.soft_spheroid_occupancy` of the current parameters."""

    def __init__(self, particles: ParticleMap, voxel_size_m, opts: RefineOptions, device) -> None:
        owner = torch.as_tensor(particles.owner)
        shape = tuple(owner.shape)
        margin = opts.mask_growth_voxels + 2  # the box holds the grown region
        self._boxes, self._regions, self._coords, starts = [], [], [], []
        self._ids = []
        for k, droplet in enumerate(particles.spheroids or (), 1):
            if droplet is None:
                continue
            centre = np.asarray(droplet.center_m[::-1])
            reach = droplet.bounding_radius_m
            box = tuple(slice(max(0, int(math.floor((c - reach) / d + n / 2)) - margin),
                              min(n, int(math.ceil((c + reach) / d + n / 2)) + margin + 1))
                        for c, d, n in zip(centre, voxel_size_m, shape))
            grown = dilate(owner == k, opts.mask_growth_voxels) & ((owner == k) | (owner == 0))
            owner[grown] = k
            self._boxes.append(box)
            self._regions.append(grown[box].to(device=device, dtype=torch.float32))
            self._coords.append([torch.as_tensor((np.arange(b.start, b.stop) - n / 2) * d, device=device)
                                 for b, n, d in zip(box, shape, voxel_size_m)])
            starts.append((centre, droplet.radius_m, droplet.aspect, np.asarray(droplet.axis[::-1])))
            self._ids.append(k)
        self.owner = owner.numpy()
        self.count = len(self._ids)
        self._voxel_size_m = tuple(voxel_size_m)
        self._starts = [tuple(torch.as_tensor(np.asarray(x, dtype=np.float64), device=device) for x in start)
                        for start in starts]
        self._spherical = [start[2] == 1.0 for start in starts]
        # per unit the centre moves shape_step_scale voxels along each axis, and the radius, the aspect
        # and the axis move the surface by about as much
        self._centre_unit_m = torch.as_tensor(opts.shape_step_scale * np.asarray(voxel_size_m), device=device)
        self._unit_m = opts.shape_step_scale * min(voxel_size_m)
        self.free = torch.zeros(self.count, 8, dtype=torch.float64, device=device, requires_grad=True)

    @property
    def ids(self) -> list[int]:
        return list(self._ids)

    def starts(self):
        return list(self._starts), list(self._spherical)

    def set_starts(self, starts) -> None:
        self._starts, self._spherical = list(starts[0]), list(starts[1])

    def shape(self, particle: int):
        """(aspect, axis zyx as numpy) of ``particle``'s spheroid as now fitted."""
        with torch.no_grad():
            _, _, aspect, axis = self._parameters(self._ids.index(particle))
        return float(aspect), axis.cpu().numpy()

    def restart(self, particle: int, aspect: float, axis_zyx) -> None:
        """``particle``'s spheroid started again at its fitted centre and volume with ``aspect`` along
        ``axis_zyx`` (aspect 1: a sphere, which stays one)."""
        i = self._ids.index(particle)
        with torch.no_grad():
            centre, radius, fitted_aspect, _ = self._parameters(i)
            radius = radius * (fitted_aspect / aspect) ** (1 / 3)  # a spheroid's volume goes as r^3 aspect
            self._starts[i] = (centre.clone(), radius.clone(), torch.tensor(float(aspect), dtype=torch.float64,
                                                                            device=centre.device),
                               torch.as_tensor(np.asarray(axis_zyx, dtype=np.float64), device=centre.device))
            self._spherical[i] = aspect == 1.0
            self.free[i] = 0

    def _parameters(self, i: int):
        centre, radius, aspect, axis = self._starts[i]
        free = self.free[i]
        unit = self._unit_m
        shape_free = free[4:] * (0.0 if self._spherical[i] else 1.0)  # a sphere stays a sphere
        centre = centre + free[:3] * self._centre_unit_m
        radius = radius * torch.exp(free[3] * unit / radius)
        aspect = aspect * torch.exp(shape_free[0] * unit / radius)
        axis = axis + shape_free[1:] * unit / radius
        return centre, radius, aspect, axis / axis.norm()

    def paint(self, occupancy: torch.Tensor) -> torch.Tensor:
        """``occupancy`` with each spheroid's region holding its soft occupancy."""
        occupancy = occupancy.clone()
        for i, (box, region, coords) in enumerate(zip(self._boxes, self._regions, self._coords)):
            soft = soft_spheroid_occupancy(*self._parameters(i), coords, self._voxel_size_m).to(occupancy.dtype)
            occupancy[box] = occupancy[box] * (1 - region) + soft * region
        return occupancy

    def droplets(self, medium_index: float) -> dict:
        """{particle: its spheroid as now fitted, a uniform ``Droplet``}."""
        out = {}
        with torch.no_grad():
            for i, k in enumerate(self._ids):
                centre, radius, aspect, axis = self._parameters(i)
                out[k] = spheroid_droplet(centre.tolist(), radius, aspect, axis.tolist(), medium_index)
        return out

    def report(self) -> list[dict]:
        rows = []
        with torch.no_grad():
            for i, k in enumerate(self._ids):
                centre, radius, aspect, axis = self._parameters(i)
                rows.append({"particle": k, "center_m": [round(float(c), 10) for c in centre.flip(0)],
                             "radius_m": round(float(radius), 10), "aspect": round(float(aspect), 4),
                             "axis": [round(float(a), 4) for a in axis.flip(0)]})
        return rows


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
