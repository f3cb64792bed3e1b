"""Per-view field processing of the formula reconstruction: the crop grid of the demodulated fields
(demodulation itself is ``biref_sdk.holography.Demodulator``), and the matrix logarithm of the
relative Jones matrix (the tensor Rytov field) with phase unwrapping.

Grids: the hologram has H x W pixels of ``pixel_size_m``. The fields are band-limited to the
objective pupil around each illumination, so after demodulation they are kept on a coarser
"crop" grid of Hc x Wc samples covering the same field of view (pitch ``pixel_size_m * W / Wc``):
sample ``n`` of the crop grid sits at ``x = (n - Wc/2) * pitch``, the same convention as the
camera's pixels (docs/formats.md).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..geometry import Geometry

_TWO_PI = 2.0 * math.pi


def _smooth_size(minimum: int) -> int:
    """The smallest even integer >= ``minimum`` whose only prime factors are 2, 3 and 5 (fast FFTs)."""
    n = max(2, int(minimum) + (int(minimum) % 2))
    while True:
        m = n
        for f in (2, 3, 5):
            while m % f == 0:
                m //= f
        if m == 1:
            return n
        n += 2


def crop_shape(geometry: Geometry, margin: float = 1.1) -> tuple[int, int]:
    """(Hc, Wc): the crop grid that holds, without aliasing, the relative fields of every view.

    The relative field of a view (sample field over illumination) has its spectrum in the pupil
    disc shifted by minus the illumination's transverse frequency, so it reaches
    ``pupil radius + max |illumination frequency|`` (cycles per pixel); the grid's Nyquist limit
    must exceed that, with ``margin`` for the broadening of the logarithm.
    """
    scale = geometry.medium_index * geometry.pixel_size_m / geometry.wavelength_m  # sine -> cycles/pixel
    f_max = geometry.pupil_radius_cycles_per_pixel + float(np.max(np.linalg.norm(geometry.sines, axis=1))) * scale
    shape = []
    for n in geometry.hologram_shape:
        size = _smooth_size(math.ceil(2.0 * f_max * margin * n))
        shape.append(min(size, n) if n % 2 == 0 else min(size, n - 1))
    return tuple(shape)


def unwrap_phase(wrapped: torch.Tensor) -> torch.Tensor:
    """Least-squares phase unwrapping (Ghiglia & Romero 1994) of [..., h, w], then made congruent
    with the wrapped phase (it differs from it by whole turns only).

    The Poisson equation of the wrapped phase differences with Neumann boundaries is solved with
    the cosine transform, done here as an FFT of the mirror-symmetric extension.
    """
    h, w = wrapped.shape[-2:]
    wrap = lambda a: a - _TWO_PI * torch.round(a / _TWO_PI)  # noqa: E731
    dx = wrap(torch.diff(wrapped, dim=-1))
    dy = wrap(torch.diff(wrapped, dim=-2))
    rho = torch.zeros_like(wrapped)
    rho[..., :, :-1] += dx
    rho[..., :, 1:] -= dx
    rho[..., :-1, :] += dy
    rho[..., 1:, :] -= dy  # rho = divergence of the wrapped gradient (Neumann boundaries)
    ext = torch.cat([rho, rho.flip(-1)], -1)
    ext = torch.cat([ext, ext.flip(-2)], -2)
    ky = torch.fft.fftfreq(2 * h, dtype=wrapped.dtype, device=wrapped.device)[:, None]
    kx = torch.fft.fftfreq(2 * w, dtype=wrapped.dtype, device=wrapped.device)[None, :]
    eig = 2 * torch.cos(_TWO_PI * kx) + 2 * torch.cos(_TWO_PI * ky) - 4
    eig[0, 0] = 1.0
    spectrum = torch.fft.fft2(ext) / eig
    spectrum[..., 0, 0] = 0.0
    smooth = torch.fft.ifft2(spectrum).real[..., :h, :w]
    # the least-squares solution has an arbitrary offset: match it to the wrapped phase, then
    # snap every pixel to the wrapped value plus the nearest whole number of turns
    offset = torch.angle(torch.exp(1j * (wrapped - smooth)).mean(dim=(-2, -1), keepdim=True))
    smooth = smooth + offset
    return wrapped + _TWO_PI * torch.round((smooth - wrapped) / _TWO_PI)


def jones_logarithm(J: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Matrix logarithm of 2x2 Jones matrices ``J`` [2, 2, h, w] (per pixel), the tensor Rytov field.

    ``log J = s I + N``: the scalar part ``s = log(det J) / 2`` carries the mean phase, whose
    argument is unwrapped over the image; ``N`` is the traceless part, from
    ``B = J / exp(s) = cosh(theta) I + sinh(theta)/theta N`` (det B = 1), valid for retardances
    below 2 pi. ``reference`` [h, w] (bool) marks pixels known to be outside the sample, whose
    mean phase is taken as zero to fix the unwrapped phase's whole-turn offset (all pixels when
    empty).
    """
    a, b, c, d = J[0, 0], J[0, 1], J[1, 0], J[1, 1]
    det = a * d - b * c
    phase = unwrap_phase(torch.angle(det))
    ref = phase[reference] if bool(reference.any()) else phase.reshape(-1)
    phase = phase - _TWO_PI * torch.round(ref.median() / _TWO_PI)
    log_abs = torch.log(torch.clamp(det.abs(), min=1e-30))
    s = torch.complex(0.5 * log_abs, 0.5 * phase)
    inv_root = torch.exp(-s)
    a, b, c, d = a * inv_root, b * inv_root, c * inv_root, d * inv_root
    half_trace = 0.5 * (a + d)
    theta = torch.acosh(half_trace)
    sinh = torch.sinh(theta)
    small = theta.abs() < 1e-6
    factor = torch.where(small, torch.ones_like(theta), theta / torch.where(small, torch.ones_like(sinh), sinh))
    return torch.stack([torch.stack([s + factor * (a - half_trace), factor * b]),
                        torch.stack([factor * c, s + factor * (d - half_trace)])])
