"""The hologram model of docs/formats.md (a camera frame from two multiplexed references) and
its inverse, off-axis demodulation."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .geometry import Geometry


@dataclass(frozen=True)
class CameraConfig:
    """Reference strength and a CMOS camera: photo-electrons, read noise, gain and an ADC.

    With the defaults a unit-intensity illumination plus both references (mean intensity 3)
    collects 6000 e-, a shot-noise SNR near 80, well inside the 20 ke- full well.
    """

    reference_amplitude: float = 1.0
    electrons_per_unit_intensity: float = 2000.0
    read_noise_e: float = 2.5
    gain_e_per_adu: float = 5.0
    offset_adu: float = 100.0
    bit_depth: int = 12
    noise: bool = True


def reference_waves(geometry: Geometry, amplitude: float = 1.0, device="cpu") -> torch.Tensor:
    """a exp(i 2 pi (f_x j + f_y i)) for both references, complex64[2, H, W]."""
    H, W = geometry.hologram_shape
    i = torch.arange(H, dtype=torch.float64, device=device)[:, None]
    j = torch.arange(W, dtype=torch.float64, device=device)[None, :]
    c = torch.as_tensor(geometry.carriers, dtype=torch.float64, device=device)
    phase = 2 * math.pi * (c[:, 0, None, None] * j + c[:, 1, None, None] * i)
    return (amplitude * torch.exp(1j * phase)).to(torch.complex64)


def intensity(fields: torch.Tensor, geometry: Geometry, reference_amplitude: float = 1.0) -> torch.Tensor:
    """Noise-free frames float32[..., H, W] of fields complex[..., 2(x, y), H, W]."""
    ref = reference_waves(geometry, reference_amplitude, fields.device)
    return ((fields + ref) .abs() ** 2).sum(-3).to(torch.float32)


def expose(frames: torch.Tensor, camera: CameraConfig, generator: torch.Generator | None = None) -> np.ndarray:
    """Camera read-out of intensity frames: shot noise, read noise, gain, offset and an ADC.
    Returns uint16 counts (ADU)."""
    electrons = frames.double() * camera.electrons_per_unit_intensity
    if camera.noise:
        electrons = torch.poisson(electrons.clamp(min=0), generator=generator)
        electrons = electrons + camera.read_noise_e * torch.randn(electrons.shape, generator=generator,
                                                                   dtype=electrons.dtype, device=electrons.device)
    counts = torch.round(electrons / camera.gain_e_per_adu + camera.offset_adu)
    counts = counts.clamp(0, 2**camera.bit_depth - 1)
    return counts.cpu().numpy().astype(np.uint16)


class Demodulator:
    """Off-axis demodulation of frames [..., H, W] into the fields [..., 2(x, y), h, w].

    The field E_q sits in the sideband at minus carrier q (docs/formats.md): its spectrum is the
    frame's shifted by the carrier (exp(+i 2 pi c_q . (j, i)) in real space), cut to the objective
    pupil (radius NA/wavelength) and inverse transformed. ``crop`` (h, w) keeps only the h x w
    lowest frequencies, i.e. a coarser grid of the same field of view (pitch ``p W / w``; sample n
    at ``x = (n - w/2) * pitch``, the camera's convention); the full H x W grid by default. The
    result is ``a E`` in camera units; dividing by the demodulated background removes ``a`` and
    the camera gain.
    """

    def __init__(self, geometry: Geometry, device="cpu", crop: tuple[int, int] | None = None) -> None:
        self.geometry = geometry
        self.device = torch.device(device)
        H, W = geometry.hologram_shape
        self.crop = Hc, Wc = tuple(crop) if crop is not None else (H, W)
        if not (0 < Hc <= H and 0 < Wc <= W):
            raise ValueError(f"crop {self.crop} must lie within the {H}x{W} camera grid")
        # the grid's frequency indices, in units of 1/H, 1/W cycles per pixel (FFT order)
        my = torch.fft.fftfreq(Hc, 1.0 / Hc, dtype=torch.float64).round().long()
        mx = torch.fft.fftfreq(Wc, 1.0 / Wc, dtype=torch.float64).round().long()
        r = geometry.pupil_radius_cycles_per_pixel
        self._pupil = (((mx[None, :] / W) ** 2 + (my[:, None] / H) ** 2) <= r * r).to(self.device)
        bins = geometry.carriers * np.array([W, H])
        self._on_grid = bool(np.all(np.abs(bins - np.round(bins)) < 1e-6))
        if self._on_grid:
            # the sideband of reference q at index m is the frame's spectrum at (m - c_q) mod N: a gather
            self._rows = torch.stack([(my - int(round(bins[q, 1]))) % H for q in range(2)]).to(self.device)
            self._cols = torch.stack([(mx - int(round(bins[q, 0]))) % W for q in range(2)]).to(self.device)
        else:
            # carriers off the FFT grid: shift each sideband to zero frequency in real space first
            self._shift = reference_waves(geometry, 1.0, self.device)  # exp(+i 2 pi c.(j, i))
            self._rows = torch.stack([my % H, my % H]).to(self.device)
            self._cols = torch.stack([mx % W, mx % W]).to(self.device)
        # the camera noise's tables (noise_variance)
        self._empty = self._noise_bins(geometry).to(self.device)
        self._noise_bin_count = int(self._empty.sum())
        self._hann = (torch.hann_window(H, periodic=False, dtype=torch.float32)[:, None]
                      * torch.hann_window(W, periodic=False, dtype=torch.float32)[None, :]).to(self.device)
        self._hann_power = float(self._hann.pow(2).mean())

    @staticmethod
    def _noise_bins(geometry: Geometry) -> torch.Tensor:
        """bool[H, W]: the frame's frequencies that carry no signal, only camera noise: outside the
        sample's autocorrelation (radius twice the pupil's) around zero, the sidebands (the pupil) at
        plus and minus each carrier and the references' cross term at plus and minus their
        difference, each with a margin of 3 bins (leakage of carriers off the FFT grid)."""
        H, W = geometry.hologram_shape
        fy = torch.fft.fftfreq(H, dtype=torch.float64)[:, None]
        fx = torch.fft.fftfreq(W, dtype=torch.float64)[None, :]
        r = geometry.pupil_radius_cycles_per_pixel
        margin = 3.0 / min(H, W)
        c = torch.as_tensor(geometry.carriers, dtype=torch.float64)
        centres = [(torch.zeros(2, dtype=torch.float64), 2 * r), (c[0], r), (-c[0], r), (c[1], r), (-c[1], r),
                   (c[0] - c[1], 0.0), (c[1] - c[0], 0.0)]
        signal = torch.zeros(H, W, dtype=torch.bool)
        for (cx, cy), radius in centres:
            dx = (fx - cx + 0.5) % 1.0 - 0.5  # periodic: the spectrum wraps
            dy = (fy - cy + 0.5) % 1.0 - 0.5
            signal |= dx**2 + dy**2 <= (radius + margin) ** 2
        return ~signal

    def _frames(self, frames) -> torch.Tensor:
        frames = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
        frames = frames.to(device=self.device, dtype=torch.float32)
        if tuple(frames.shape[-2:]) != self.geometry.hologram_shape:
            raise ValueError(f"frames of shape {tuple(frames.shape[-2:])} do not match the geometry's "
                             f"{self.geometry.hologram_shape}")
        return frames

    def noise_variance(self, frames) -> torch.Tensor:
        """Per frame [...] of ``frames`` [..., H, W]: the variance per pixel of the camera noise in each
        demodulated field component. Shot and read noise are white, so every frequency of the frame
        carries the same noise power, measured where no signal is (``_noise_bins``; the median of
        the exponentially distributed power over ln 2), and the demodulation keeps the pupil's bins
        of it. Unlike the deviation of a background frame from the ideal illumination, this holds
        for illuminations and carriers off the FFT grid too."""
        if self._noise_bin_count < 16:
            raise ValueError("this geometry leaves too few frequencies without signal to measure the camera noise")
        # a Hann window keeps the leakage of illuminations and carriers off the FFT grid out of the
        # empty bins (it falls as 1/f^3, not 1/f); it scales white noise's power by mean(w^2)
        power = torch.fft.fft2(self._frames(frames) * self._hann).abs().pow(2)[..., self._empty]
        per_bin = power.median(dim=-1).values.double() / math.log(2.0) / self._hann_power
        Hc, Wc = self.crop
        return per_bin * int(self._pupil.sum()) / (Hc * Wc) ** 2

    def __call__(self, frames) -> torch.Tensor:
        frames = self._frames(frames)
        if self._on_grid:
            spectrum = torch.fft.fft2(frames)
            parts = [spectrum[..., self._rows[q][:, None], self._cols[q][None, :]] for q in range(2)]
        else:
            spectra = torch.fft.fft2(frames[..., None, :, :] * self._shift)
            parts = [spectra[..., q, self._rows[q][:, None], self._cols[q][None, :]] for q in range(2)]
        return torch.fft.ifft2(torch.stack(parts, -3) * self._pupil)


def demodulate(holograms, geometry: Geometry, device="cpu") -> torch.Tensor:
    """Fields ``a E`` complex64[..., 2(x, y), H, W] from frames [..., H, W]; see ``Demodulator``."""
    return Demodulator(geometry, device)(holograms)
