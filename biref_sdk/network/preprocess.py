"""Holograms -> network inputs: per-view normalisation, then the paper's window mean.

Two input modes (``NetworkConfig.input_mode``):

``"hologram"`` (the paper): each frame divided by the mean of the same view's background frame,
    so exposure and camera gain drop out; one channel per polarization.

``"field"`` (default): each frame is demodulated (off-axis, :mod:`biref_sdk.holography`) and
    divided by the co-polarized component of the same view's demodulated background, then the
    background's own ratio is subtracted: ``u = E/B_p - B/B_p``. This removes the reference
    amplitude, the camera gain and the illumination's tilt, so ``u`` is zero without a sample and
    carries the sample's transmitted field (x and y components: the cross-polarized one holds the
    birefringence signal). The field is band-limited (pupil radius plus illumination sine, below
    a quarter cycle per pixel), so it is resampled by Fourier cropping by ``field_downsample``
    without loss. Channels: Re/Im of u_x, u_y (4 per polarization).

The views of a window (``NetworkConfig.window_views``) are then averaged, the two polarizations
stacked as channels: one encoder input ``[C_in, 1, H', W']`` per window.

A network with ``NetworkConfig.prior == "formula"`` also takes the formula reconstruction of the
same acquisition in its decoder (built by :mod:`biref_sdk.reconstruction.prior`: the network
package imports nothing from ``reconstruction``).
"""
from __future__ import annotations

import numpy as np
import torch

from ..geometry import Geometry
from .config import NetworkConfig


def fourier_downsample(field: torch.Tensor, factor: int) -> torch.Tensor:
    """Resample a band-limited complex image ``[..., H, W]`` to ``[..., H/f, W/f]`` by keeping the
    central ``H/f x W/f`` frequencies (exact for content below the new Nyquist frequency)."""
    if factor == 1:
        return field
    h, w = field.shape[-2:]
    hn, wn = h // factor, w // factor
    spectrum = torch.fft.fftshift(torch.fft.fft2(field), dim=(-2, -1))
    top, left = h // 2 - hn // 2, w // 2 - wn // 2
    cropped = spectrum[..., top:top + hn, left:left + wn]
    return torch.fft.ifft2(torch.fft.ifftshift(cropped, dim=(-2, -1))) / (factor * factor)


class InputPreprocessor:
    """Per-view normalisation against one acquisition's background frames ``[2, V, H, W]``."""

    def __init__(self, config: NetworkConfig, geometry: Geometry, background) -> None:
        background = np.asarray(background) if not isinstance(background, torch.Tensor) else background.cpu().numpy()
        expected = (2, geometry.n_views, *geometry.hologram_shape)
        if tuple(background.shape) != expected:
            raise ValueError(f"background has shape {tuple(background.shape)}, expected {expected}")
        if geometry.n_views != config.n_views or geometry.hologram_shape != config.hologram_shape:
            raise ValueError(f"geometry ({geometry.n_views} views of {geometry.hologram_shape}) does not match the "
                             f"network ({config.n_views} views of {config.hologram_shape})")
        self.config = config
        self.geometry = geometry
        background = background.astype(np.float32)
        if config.input_mode == "hologram":
            mean = background.mean(axis=(-2, -1))  # [2, V]
            if np.any(mean <= 0):
                raise ValueError("a background frame has a non-positive mean: cannot normalise by it")
            self._scale = torch.as_tensor(1.0 / mean, dtype=torch.float32)
        else:
            from ..holography import Demodulator

            self._demodulator = Demodulator(geometry)
            fields = self._demodulator(background)  # [2, V, 2(comp), H, W]
            co = torch.stack([fields[0, :, 0], fields[1, :, 1]])  # co-polarized component [2, V, H, W]
            power = co.abs() ** 2
            if float(power.mean()) <= 0:
                raise ValueError("the background carries no field: cannot normalise by it")
            # 1/B_p with a floor at 1e-6 of the mean power, so no pixel divides by ~0
            self._inverse = co.conj() / (power + 1e-6 * power.mean())
            self._background_ratio = fields * self._inverse[:, :, None]  # B/B_p [2, V, 2, H, W]

    def views(self, polarization: int, views, holograms) -> torch.Tensor:
        """Frames ``[n, H, W]`` of ``views`` (a sequence of view indices) of one polarization ->
        inputs ``[n, channels_per_polarization, H', W']``."""
        views = list(views)
        frames = torch.as_tensor(np.asarray(holograms, dtype=np.float32))
        if self.config.input_mode == "hologram":
            return (frames * self._scale[polarization, views][:, None, None])[:, None]
        fields = self._demodulator(frames)  # [n, 2, H, W]
        u = fields * self._inverse[polarization, views][:, None] - self._background_ratio[polarization, views]
        u = fourier_downsample(u, self.config.field_downsample)
        return torch.cat([u.real, u.imag], dim=1).to(torch.float32)

    def view(self, polarization: int, view: int, hologram) -> torch.Tensor:
        """One frame ``[H, W]`` -> ``[channels_per_polarization, H', W']``."""
        return self.views(polarization, [view], np.asarray(hologram)[None])[0]

    def per_view(self, holograms, n_views: int | None = None) -> torch.Tensor:
        """Frames ``[2, V, H, W]`` -> per-view inputs ``[n, C_in, H', W']`` of the first ``n_views``
        views (all by default), the two polarizations stacked as channels."""
        holograms = np.asarray(holograms)
        n = holograms.shape[1] if n_views is None else n_views
        return torch.cat([self.views(p, range(n), holograms[p, :n]) for p in range(2)], dim=1)

    def window_mean(self, per_view: torch.Tensor) -> torch.Tensor:
        """Per-view inputs ``[>= used, C_in, H', W']`` -> the window sequence ``[S, C_in, 1, H', W']``."""
        used = self.config.sequence_length * self.config.window_length
        x = per_view[:used]
        x = x.reshape(self.config.sequence_length, self.config.window_length, *x.shape[1:]).mean(dim=1)
        return x[:, :, None]

    def acquisition(self, holograms) -> torch.Tensor:
        """All frames ``[2, V, H, W]`` -> the window sequence ``[S, C_in, 1, H', W']``."""
        used = self.config.sequence_length * self.config.window_length
        return self.window_mean(self.per_view(holograms, used))
