"""The physics consistency score of a reconstruction: its volume re-simulated with the forward model
and compared, view by view, with the fields the microscope measured.

For each checked view ``(p, v)`` the measured scattered field is ``S_m = (M - B) / (a_q b_pv)``: the
demodulated sample frame ``M`` minus the demodulated background ``B``, per field component ``q``,
divided by the reference's complex amplitude ``a_q`` (one per reference, fitted over all checked
views) and the view's illumination amplitude ``b_pv`` (fitted per view: a real microscope's views
differ in power and phase). Subtracting the measured background also removes what both frames share
(dust, stray light). The re-simulated scattered field is ``S_s = F(volume) - I`` (``I``: the
illumination alone), with the simulator's forward model (:class:`~biref_sdk.physics.MultiSlice`). The
view's **residual** is ``r = ||S_m - S_s|| / ||S_m||`` over the volume's footprint on the camera (the
fields are imaged at the focal plane, inside the volume, so what the volume scatters lies there; the
rest of the field would only add noise): 0 for a volume that explains the measurement, 1 for one
that explains none of it (an empty volume).

Noise sets a floor: the residual of the true volume is about ``f = ||noise|| / ||S_m||``, large for
a weakly scattering sample. Camera noise is white, so each frame's spectrum measures it where no
signal is (:meth:`~biref_sdk.holography.Demodulator.noise_variance`); sample and background frame
both add theirs, so ``f^2 = (s_M^2 + s_B^2) N_f sum_q 1/|a_q b_pv|^2 / ||S_m||^2`` per view (``s^2``:
the per-pixel variance of a demodulated component, ``N_f``: the footprint's pixels;
``noise_floor``: the median of ``f``). An earlier estimate, the background's deviation from the
fitted illumination, also counted the pupil's cut of illuminations off the FFT grid, which the
subtraction ``M - B`` removes: for the off-grid geometries of tests/mie_acquisition.py it put
the floor above the residual and the score at 0. The **score** is the median over the checked
views of ``sqrt(max(r^2 - f^2, 0))``, the part of the residual that noise does not explain: near 0
when the volume explains the data; large when the sample is unlike what the reconstruction knows, or
the acquisition is not what its geometry says (benchmarks/trust.py measures how well it tells
held-out sample types apart).
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from ..files import Consistency, Volume
from ..geometry import Geometry
from ..holography import Demodulator
from .base import ReconstructionSession, Reconstructor

log = logging.getLogger(__name__)

DEFAULT_VIEWS = 5  # the axial view and four ring views a quarter turn apart: ~1/7 of the full cost


def checked_views(geometry: Geometry, views: int | str | None) -> np.ndarray:
    """The indices of the views to check: ``"all"``, or ``n``: the view nearest the axis and
    ``n - 1`` more spread evenly in azimuth over the rest."""
    V = geometry.n_views
    if views == "all" or views is None:
        return np.arange(V)
    n = int(views)
    if not 1 <= n <= V:
        raise ValueError(f"consistency views must be 1..{V} or 'all', got {views!r}")
    sines = geometry.sines
    radius = np.hypot(sines[:, 0], sines[:, 1])
    axial = int(np.argmin(radius))
    rest = np.array([v for v in range(V) if v != axial])
    if n == 1 or rest.size == 0:
        return np.array([axial])
    order = rest[np.argsort(np.arctan2(sines[rest, 1], sines[rest, 0]))]
    picks = order[np.round(np.arange(n - 1) * order.size / (n - 1)).astype(int)]
    return np.sort(np.concatenate([[axial], picks]))


def noise_corrected_score(residual: np.ndarray, floor: np.ndarray) -> float:
    """The median over the checked views (finite entries) of ``sqrt(max(r^2 - f^2, 0))``: noise
    and the volume's error add in quadrature, so this is the part of each residual the noise does
    not explain. Unlike the raw residual it does not grow for a weakly scattering sample."""
    checked = np.isfinite(residual)
    return float(np.median(np.sqrt(np.maximum(residual[checked] ** 2 - floor[checked] ** 2, 0.0))))


class ConsistencyCheck:
    """Re-simulates volumes at a fixed set of views of one geometry and scores them against the
    demodulated measurement (module docstring). Built once per geometry; ``score`` is reentrant."""

    def __init__(self, geometry: Geometry, views: int | str | None = DEFAULT_VIEWS, device="cpu") -> None:
        from ..physics import MultiSlice

        self.geometry = geometry
        self.views = checked_views(geometry, views)
        self._subset = geometry.replace(illumination_sines=geometry.sines[self.views])
        self._optics = MultiSlice(self._subset, device=device)
        self._illumination = self._optics.illumination()  # [2, n, 2, H, W]
        self.demodulate = Demodulator(geometry, device)
        (_, y_m, x_m), (dy, dx) = geometry.volume_coordinates_m(), geometry.voxel_size_m[1:]
        rows, cols = geometry.hologram_coordinates_m()
        inside_y = (rows >= y_m[0] - dy / 2) & (rows <= y_m[-1] + dy / 2)
        inside_x = (cols >= x_m[0] - dx / 2) & (cols <= x_m[-1] + dx / 2)
        self._footprint = torch.as_tensor(inside_y[:, None] & inside_x[None, :], device=device)

    def _reference_amplitudes(self, background: torch.Tensor) -> torch.Tensor:
        """``a_q`` [2] up to a common factor (absorbed by each view's ``b``). Views differ in power and
        phase, so the ratio ``a_1 / a_0`` comes from views where the illumination has both field
        components (then ``b`` cancels), weighted by the weaker component's energy."""
        energy = (self._illumination.abs() ** 2).sum(dim=(3, 4))  # [2, n, 2]
        fit = (self._illumination.conj() * background).sum(dim=(3, 4)) / energy.clamp_min(1e-30)
        weight = torch.minimum(energy[..., 0], energy[..., 1])
        weight = weight * (weight > 1e-6 * energy.sum(dim=-1))
        if float(weight.sum()) > 0:
            ratio = (weight * fit[..., 1] / torch.where(weight > 0, fit[..., 0], 1)).sum() / weight.sum()
            return torch.stack([torch.ones_like(ratio), ratio])
        # no view with both components (e.g. the axial view alone): one fit per component
        return ((self._illumination.conj() * background).sum(dim=(0, 1, 3, 4))
                / (self._illumination.abs() ** 2).sum(dim=(0, 1, 3, 4)).clamp_min(1e-30))

    def frame_noise(self, frames) -> torch.Tensor:
        """The per-pixel noise variance of each demodulated frame [...] of ``frames`` [..., H, W]."""
        return self.demodulate.noise_variance(frames)

    def scattered_fields(self, measured: torch.Tensor, background: torch.Tensor,
                         noise_variance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The measured scattered fields ``S_m`` of the checked views, complex[2, n, 2, H, W] in units of
        a unit-amplitude illumination, and the energy of their camera noise over the footprint [2, n]
        (module docstring). ``noise_variance`` [2, n]: ``frame_noise`` of sample plus background frame."""
        a = self._reference_amplitudes(background)
        fitted = a[None, None, :, None, None] * self._illumination
        b = ((fitted.conj() * background).sum(dim=(2, 3, 4))
             / (fitted.abs() ** 2).sum(dim=(2, 3, 4)).clamp_min(1e-30))  # [2, n]
        scale = b[:, :, None] * a[None, None, :]  # [2, n, 2]
        inverse_gain = (1.0 / scale.abs().pow(2).clamp_min(1e-30)).sum(dim=2)
        energy = torch.as_tensor(noise_variance, device=inverse_gain.device) * int(self._footprint.sum()) * inverse_gain
        return (measured - background) / scale[..., None, None], energy

    def footprint_energy(self, field: torch.Tensor) -> torch.Tensor:
        """The squared norm of each view's field [2, n, 2, H, W] over the volume's footprint: [2, n]."""
        return (field.abs().pow(2) * self._footprint).sum(dim=(2, 3, 4))

    def footprint_norm(self, field: torch.Tensor) -> torch.Tensor:
        return self.footprint_energy(field).sqrt()

    def score(self, volume: Volume, measured: torch.Tensor, background: torch.Tensor,
              received: np.ndarray | None = None, *, noise_variance: torch.Tensor) -> Consistency:
        """``measured``, ``background``: the demodulated frames of the checked views,
        complex[2(pol), n, 2(x, y), H, W] (``self.demodulate`` of ``[2, n, H, W]`` frames);
        ``received`` bool[2, n]: which of them arrived (all by default; the others are not scored);
        ``noise_variance`` [2, n]: ``frame_noise`` of each sample frame plus its background's."""
        from ..samples.tensor import volume_to_eps6

        began = time.perf_counter()
        scattered, noise_energy = self.scattered_fields(measured, background, noise_variance)
        simulated = self._optics.transmit(volume_to_eps6(volume), volume.voxel_size_m) - self._illumination
        norm = self.footprint_norm
        size = norm(scattered).clamp_min(1e-30)
        residual = (norm(scattered - simulated) / size).double().cpu().numpy()
        floor = (noise_energy.sqrt() / size).double().cpu().numpy()
        if received is not None:
            residual[~received] = floor[~received] = np.nan
        full = np.full((2, self.geometry.n_views), np.nan)
        full[:, self.views] = residual
        return Consistency(residual=full, score=noise_corrected_score(residual, floor),
                           noise_floor=float(np.nanmedian(floor)), time_s=time.perf_counter() - began)


class CheckedSession(ReconstructionSession):
    """A session whose volume carries the consistency score (``Volume.consistency``). The checked
    views are demodulated as they arrive; with views missing, the score is over those present."""

    def __init__(self, inner: ReconstructionSession, check: ConsistencyCheck, background: np.ndarray) -> None:
        super().__init__(inner.geometry)
        self.inner = inner
        self._check = check
        self._slot = {int(v): i for i, v in enumerate(check.views)}
        frames = np.asarray(background)[:, check.views]
        self._background = check.demodulate(frames)
        self._noise = check.frame_noise(frames)  # [2, n]: the background's; each sample frame adds its own
        self._measured = torch.zeros_like(self._background)

    def _add_view(self, polarization: int, view: int, hologram: np.ndarray) -> None:
        self.inner.add_view(polarization, view, hologram)
        slot = self._slot.get(view)
        if slot is not None:
            self._measured[polarization, slot] = self._check.demodulate(hologram)
            self._noise[polarization, slot] += self._check.frame_noise(hologram)

    def finalize(self, allow_missing: bool = False) -> Volume:
        volume = self.inner.finalize(allow_missing=allow_missing)
        received = self.received[:, self._check.views]
        if not received.any():
            return volume
        try:
            volume.consistency = self._check.score(volume, self._measured, self._background, received,
                                                   noise_variance=self._noise)
        except Exception as error:  # the volume is the result; a failed check must not lose it
            log.warning("consistency check failed: %s: %s", type(error).__name__, error)
            volume.parameters = {**volume.parameters, "consistency_error": f"{type(error).__name__}: {error}"}
        return volume

    def __getattr__(self, name):  # the wrapped session's own API (missing_views, finalize_timings_s …)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class ConsistencyChecked(Reconstructor):
    """Any reconstructor whose volumes carry the physics consistency score: ``views`` checked per
    acquisition (an int, or ``"all"``). Everything else is the wrapped reconstructor's."""

    def __init__(self, inner: Reconstructor, views: int | str = DEFAULT_VIEWS, device="cpu") -> None:
        self.inner = inner
        self.name = inner.name
        self.views = views
        self._device = device
        self._checks: dict[Geometry, ConsistencyCheck] = {}

    def check_for(self, geometry: Geometry) -> ConsistencyCheck:
        """The check of ``geometry``, built once (its illumination and demodulator tables)."""
        check = self._checks.get(geometry)
        if check is None:
            check = self._checks[geometry] = ConsistencyCheck(geometry, self.views, self._device)
        return check

    def session_bytes(self, geometry: Geometry) -> int:
        """The wrapped session's, plus the checked views' demodulated sample and background fields."""
        fields = 2 * 2 * len(checked_views(geometry, self.views)) * 2 * math.prod(geometry.hologram_shape) * 8
        return int(self.inner.session_bytes(geometry)) + fields

    def start(self, geometry: Geometry, background: np.ndarray) -> CheckedSession:
        return CheckedSession(self.inner.start(geometry, background), self.check_for(geometry), background)

    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
