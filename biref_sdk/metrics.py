"""The paper's image-quality metrics for refractive-index volumes, and the director error.

* PSNR: the index is mapped linearly from [1.54, 1.57] to [0, 255] (values outside are clipped, as
  the paper's 8-bit rendering does), then ``10 log10(255**2 / MSE)``.
* SSIM: Wang et al. (2004) with a Gaussian window (sigma 1.5, 11 taps), K1 = 0.01, K2 = 0.03,
  L = 255, population (co)variances, computed in 3D on the same 0-255 mapping; the mean is taken
  over the voxels whose window lies wholly inside the volume (as scikit-image does).
* RMSE in refractive-index units (no mapping, no clipping).
* Director error: the median sign-invariant angle ``arccos |d_true . d_rec|`` in degrees over the
  voxels where the truth is birefringent (``ne - no`` above a threshold), i.e. inside droplets.
* Isotropic-core birefringence: the mean reconstructed ``|ne - no|`` in the cores of isotropic
  particles (false birefringence; nan without such particles).

All functions take numpy arrays or torch tensors indexed ``[z, y, x]`` and return Python floats.
"""
from __future__ import annotations

import math

import numpy as np

# The paper's display range of the refractive index (1.54-1.57) and its 8-bit scale.
INDEX_RANGE = (1.54, 1.57)
PIXEL_MAX = 255.0
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # 11-tap window for sigma 1.5, as Wang et al. and scikit-image
SSIM_K1 = 0.01
SSIM_K2 = 0.03
DEFAULT_BIREFRINGENCE_THRESHOLD = 0.004  # half the smallest droplet birefringence the simulator draws


def _torch():
    import torch

    return torch


def _as_double(volume):
    torch = _torch()
    if isinstance(volume, torch.Tensor):
        return volume.detach().to(torch.float64)
    return torch.as_tensor(np.asarray(volume, dtype=np.float64))


def _check_pair(truth, estimate, ndim: int | None = 3):
    t, e = _as_double(truth), _as_double(estimate)
    if tuple(t.shape) != tuple(e.shape):
        raise ValueError(f"volumes differ in shape: {tuple(t.shape)} vs {tuple(e.shape)}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"expected {ndim}-D volumes [z, y, x], got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError("empty volumes")
    return t, e.to(t.device)


def to_8bit_scale(index, index_range=INDEX_RANGE):
    """Refractive index -> [0, 255] linearly over ``index_range`` (clipped); float64 tensor."""
    lo, hi = index_range
    if not hi > lo:
        raise ValueError(f"index_range {index_range} must be increasing")
    return ((_as_double(index) - lo) * (PIXEL_MAX / (hi - lo))).clamp(0.0, PIXEL_MAX)


def psnr(truth, estimate, index_range=INDEX_RANGE) -> float:
    """Peak signal-to-noise ratio (dB) on the 0-255 mapping of ``index_range``; inf if identical."""
    t, e = _check_pair(truth, estimate, ndim=None)
    mse = float(((to_8bit_scale(t, index_range) - to_8bit_scale(e, index_range)) ** 2).mean())
    return math.inf if mse == 0.0 else 10.0 * math.log10(PIXEL_MAX**2 / mse)


def _gaussian_window(sigma: float, truncate: float, dtype, device):
    torch = _torch()
    radius = int(truncate * sigma + 0.5)  # scipy.ndimage's rounding
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _filter_valid(volume, window):
    """Separable Gaussian filter over every axis, keeping only fully-covered positions."""
    out = volume
    taps = window.numel()
    for axis in range(volume.ndim):
        out = out.movedim(axis, -1)
        out = out.unfold(-1, taps, 1) @ window
        out = out.movedim(-1, axis)
    return out


def ssim(truth, estimate, index_range=INDEX_RANGE, sigma: float = SSIM_SIGMA) -> float:
    """Mean structural similarity (Wang et al. 2004) in 3D with a Gaussian window, on the 0-255
    mapping of ``index_range`` (K1 = 0.01, K2 = 0.03, L = 255)."""
    t, e = _check_pair(truth, estimate, ndim=None)
    window = _gaussian_window(sigma, SSIM_TRUNCATE, t.dtype, t.device)
    if min(t.shape) < window.numel():
        raise ValueError(f"volume {tuple(t.shape)} smaller than the {window.numel()}-voxel SSIM window")
    x, y = to_8bit_scale(t, index_range), to_8bit_scale(e, index_range)
    mx, my = _filter_valid(x, window), _filter_valid(y, window)
    vx = _filter_valid(x * x, window) - mx * mx
    vy = _filter_valid(y * y, window) - my * my
    vxy = _filter_valid(x * y, window) - mx * my
    c1, c2 = (SSIM_K1 * PIXEL_MAX) ** 2, (SSIM_K2 * PIXEL_MAX) ** 2
    s = (2 * mx * my + c1) * (2 * vxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def rmse(truth, estimate) -> float:
    """Root-mean-square error in refractive-index units."""
    t, e = _check_pair(truth, estimate, ndim=None)
    return float(((t - e) ** 2).mean().sqrt())


def director_angles_deg(truth_director, estimate_director):
    """Sign-invariant angle (degrees) between unit-vector fields [3, ...] -> tensor [...]."""
    torch = _torch()
    t, e = _check_pair(truth_director, estimate_director, ndim=None)
    if t.shape[0] != 3:
        raise ValueError(f"director fields must be [3, ...] with (x, y, z) first, got {tuple(t.shape)}")
    t = t / t.norm(dim=0, keepdim=True).clamp(min=1e-30)
    e = e / e.norm(dim=0, keepdim=True).clamp(min=1e-30)
    cosine = (t * e).sum(0).abs().clamp(max=1.0)
    return torch.rad2deg(torch.arccos(cosine))


def director_error_deg(truth_director, estimate_director, truth_ne, truth_no,
                       birefringence_threshold: float = DEFAULT_BIREFRINGENCE_THRESHOLD) -> float:
    """Median sign-invariant director angle (degrees) over the voxels where the truth's
    ``ne - no`` exceeds ``birefringence_threshold``; nan if there is no such voxel."""
    angles = director_angles_deg(truth_director, estimate_director)
    ne, no = _check_pair(truth_ne, truth_no, ndim=None)
    if tuple(ne.shape) != tuple(angles.shape):
        raise ValueError(f"index volumes {tuple(ne.shape)} do not match the director grid {tuple(angles.shape)}")
    mask = (ne - no) > birefringence_threshold
    if not bool(mask.any()):
        return math.nan
    return float(angles[mask.to(angles.device)].median())


def _eroded(mask: np.ndarray, voxels: int) -> np.ndarray:
    """``mask`` without the voxels within ``voxels`` steps (6-neighbourhood) of its outside."""
    for _ in range(voxels):
        padded = np.pad(mask, 1, constant_values=False)
        mask = mask.copy()
        for axis in range(3):
            for shift in (-1, 1):
                mask &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
    return mask


def isotropic_core_birefringence(truth_ne, truth_no, estimate_ne, estimate_no, medium_index: float,
                                 erosion_voxels: int = 2) -> float:
    """Mean reconstructed ``|ne - no|`` in the cores of isotropic particles: voxels where the truth is
    isotropic and above the medium's index, ``erosion_voxels`` inside the particle's surface (the
    partial-volume shell is left out); nan if there is no such voxel. A model that has only seen
    birefringent droplets reports birefringence there that is not in the sample."""
    t_ne, t_no, e_ne, e_no = (np.asarray(v, dtype=np.float64) for v in (truth_ne, truth_no, estimate_ne, estimate_no))
    particle = (np.abs(t_ne - t_no) < 1e-5) & (t_ne > medium_index + 1e-4)
    core = _eroded(particle, erosion_voxels)
    if not core.any():
        return math.nan
    return float(np.abs(e_ne - e_no)[core].mean())


METRIC_KEYS = ("psnr_ne", "psnr_no", "ssim_ne", "ssim_no", "rmse_ne", "rmse_no", "director_error_deg",
               "isotropic_core_birefringence")


def compare_volumes(truth, estimate, birefringence_threshold: float = DEFAULT_BIREFRINGENCE_THRESHOLD) -> dict:
    """All metrics of one reconstruction against its truth (both ``files.Volume``-like objects with
    ``ne``, ``no``, ``director``): a dict with the keys of ``METRIC_KEYS``."""
    if tuple(np.shape(truth.ne)) != tuple(np.shape(estimate.ne)):
        raise ValueError(f"reconstruction grid {np.shape(estimate.ne)} differs from the truth's {np.shape(truth.ne)}")
    return {
        "psnr_ne": psnr(truth.ne, estimate.ne),
        "psnr_no": psnr(truth.no, estimate.no),
        "ssim_ne": ssim(truth.ne, estimate.ne),
        "ssim_no": ssim(truth.no, estimate.no),
        "rmse_ne": rmse(truth.ne, estimate.ne),
        "rmse_no": rmse(truth.no, estimate.no),
        "director_error_deg": director_error_deg(truth.director, estimate.director, truth.ne, truth.no,
                                                 birefringence_threshold),
        "isotropic_core_birefringence": isotropic_core_birefringence(
            _numpy(truth.ne), _numpy(truth.no), _numpy(estimate.ne), _numpy(estimate.no),
            float(getattr(truth, "medium_index", INDEX_RANGE[0]))),
    }


def _numpy(volume) -> np.ndarray:
    return volume.detach().cpu().numpy() if hasattr(volume, "detach") else np.asarray(volume)
