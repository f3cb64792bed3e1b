"""Figures as in the paper: xy / zy / xz slices of n_e and n_o with director lines (Fig. 2a).

matplotlib is imported on first use (extra ``[viz]``); the Agg backend keeps it headless.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .files import Volume

INDEX_RANGE = (1.54, 1.57)  # the paper's colour range for refractive index


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError("figures need matplotlib: pip install 'biref_sdk[viz]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _slices(volume: Volume, centre):
    """The three orthogonal slices through ``centre`` (z, y, x) as (name, ne, no, director
    components in the slice plane (horizontal, vertical), extent in micrometres)."""
    z, y, x = centre
    dz, dy, dx = (v * 1e6 for v in volume.voxel_size_m)
    Z, Y, X = volume.shape
    d = volume.director
    return [
        ("xy", volume.ne[z], volume.no[z], d[0, z], d[1, z], (0, X * dx, Y * dy)),
        ("zy", volume.ne[:, :, x].T, volume.no[:, :, x].T, d[2, :, :, x].T, d[1, :, :, x].T, (0, Z * dz, Y * dy)),
        ("xz", volume.ne[:, y, :], volume.no[:, y, :], d[0, :, y, :], d[2, :, y, :], (0, X * dx, Z * dz)),
    ]


def _birefringent_centre(volume: Volume) -> tuple[int, int, int]:
    weight = np.clip(volume.ne - volume.no, 0, None)
    if weight.sum() <= 0:
        return tuple(n // 2 for n in volume.shape)
    grids = np.meshgrid(*(np.arange(n) for n in volume.shape), indexing="ij")
    return tuple(int(round(float((g * weight).sum() / weight.sum()))) for g in grids)


def slices_figure(volume: Volume, path, title: str | None = None, truth: Volume | None = None,
                  centre: tuple[int, int, int] | None = None, line_step: int | None = None) -> Path:
    """Save xy/zy/xz slices of n_e and n_o with the in-plane director drawn as red lines where the
    sample is birefringent. With ``truth``, its slices form the upper rows for comparison."""
    plt = _pyplot()
    centre = centre or _birefringent_centre(truth if truth is not None else volume)
    rows = [("truth", truth), ("result", volume)] if truth is not None else [("", volume)]
    fig, axes = plt.subplots(2 * len(rows), 3, figsize=(10, 3.2 * 2 * len(rows)), squeeze=False)
    image = None
    for r, (label, vol) in enumerate(rows):
        for c, (name, ne, no, d_h, d_v, (lo, width, height)) in enumerate(_slices(vol, centre)):
            for k, (index_name, data) in enumerate((("n_e", ne), ("n_o", no))):
                ax = axes[2 * r + k, c]
                image = ax.imshow(data, origin="lower", cmap="viridis", vmin=INDEX_RANGE[0], vmax=INDEX_RANGE[1],
                                  extent=(lo, width, lo, height), aspect="equal")
                ax.set_title(f"{label} {index_name} {name}".strip(), fontsize=9)
                ax.set_xlabel(f"{name[0]} (µm)", fontsize=8)
                ax.set_ylabel(f"{name[1]} (µm)", fontsize=8)
                if index_name == "n_e":
                    _director_lines(ax, d_h, d_v, ne - no, width, height, line_step)
                    ax.set_xlim(lo, width)  # the lines must not widen the axes
                    ax.set_ylim(lo, height)
    fig.colorbar(image, ax=axes, shrink=0.6, label="refractive index")
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _director_lines(ax, d_h, d_v, birefringence, width, height, step):
    """Short headless segments along the director's in-plane projection (sign-free)."""
    rows, cols = d_h.shape
    step = step or max(2, min(rows, cols) // 12)
    ii, jj = np.mgrid[step // 2:rows:step, step // 2:cols:step]
    keep = birefringence[ii, jj] > 2e-3
    if not keep.any():
        return
    ii, jj = ii[keep], jj[keep]
    u, v = d_h[ii, jj], d_v[ii, jj]
    cell = min(width / cols, height / rows) * step * 0.45
    x = (jj + 0.5) * width / cols
    y = (ii + 0.5) * height / rows
    segments = np.stack([np.stack([x - u * cell, y - v * cell], -1), np.stack([x + u * cell, y + v * cell], -1)], 1)
    from matplotlib.collections import LineCollection

    ax.add_collection(LineCollection(segments, colors="red", linewidths=0.9))
