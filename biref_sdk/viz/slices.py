"""Slice figures as the paper's Fig. 2a: xy, zy and xz planes of n_e, n_o and Δn = n_e − n_o with
the director drawn as red, sign-free line segments, axes in µm at the true aspect.

Coordinates follow docs/formats.md: voxel ``k`` is centred at ``(k - N/2) * d``. Planes are drawn
as (horizontal, vertical): xy = (x, y), zy = (z, y), xz = (x, z), all with ``origin="lower"``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import Volume

PLANES = ("xy", "zy", "xz")
QUANTITIES = ("n_e", "n_o", "Δn")
# Δn below this (index units) counts as isotropic: no droplet, no director segment
BIREFRINGENCE_THRESHOLD = 1e-3
SEGMENTS_PER_PANEL = 12  # director segments across the longer side of a panel


def pyplot():
    """matplotlib's pyplot on the headless Agg canvas (extra ``[viz]``)."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("figures need matplotlib: pip install 'biref_sdk[viz]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _quantity(volume: Volume, name: str) -> np.ndarray:
    return {"n_e": volume.ne, "n_o": volume.no, "Δn": volume.ne - volume.no}[name]


def largest_droplet_centre(volume: Volume, threshold: float = BIREFRINGENCE_THRESHOLD) -> tuple[int, int, int]:
    """(z, y, x) voxel of the Δn-weighted centroid of the largest connected birefringent region;
    the volume's centre when nothing is birefringent."""
    try:
        from scipy import ndimage
    except ImportError:
        raise ImportError("finding droplets needs scipy: pip install 'biref_sdk[viz]'") from None
    dn = volume.ne - volume.no
    mask = dn > threshold
    if not mask.any():
        return tuple(n // 2 for n in volume.shape)
    labels, count = ndimage.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    largest = labels == int(np.argmax(sizes))
    centre = ndimage.center_of_mass(np.where(largest, dn, 0.0))
    return tuple(int(np.clip(round(c), 0, n - 1)) for c, n in zip(centre, volume.shape))


@dataclass
class Plane:
    """One slice: ``image`` [vertical, horizontal], the director's in-plane components (same
    shape), and the extent (left, right, bottom, top) in µm."""

    name: str
    image: np.ndarray
    d_h: np.ndarray
    d_v: np.ndarray
    dn: np.ndarray
    extent: tuple[float, float, float, float]
    pixel_um: tuple[float, float]  # (horizontal, vertical)


def _axis_um(n: int, d_m: float) -> tuple[float, float]:
    """Edges of a voxel axis in µm: voxel k is centred at (k - n/2) * d."""
    d = d_m * 1e6
    return (-n / 2 - 0.5) * d, (n / 2 - 0.5) * d


def extract_plane(volume: Volume, quantity: str, plane: str, centre: tuple[int, int, int]) -> Plane:
    z, y, x = centre
    data = _quantity(volume, quantity)
    dn = volume.ne - volume.no
    d = volume.director
    Z, Y, X = volume.shape
    dz, dy, dx = volume.voxel_size_m
    ex, ey, ez = _axis_um(X, dx), _axis_um(Y, dy), _axis_um(Z, dz)
    if plane == "xy":
        return Plane(plane, data[z], d[0, z], d[1, z], dn[z], (*ex, *ey), (dx * 1e6, dy * 1e6))
    if plane == "zy":
        return Plane(plane, data[:, :, x].T, d[2, :, :, x].T, d[1, :, :, x].T, dn[:, :, x].T, (*ez, *ey),
                     (dz * 1e6, dy * 1e6))
    if plane == "xz":
        return Plane(plane, data[:, y, :], d[0, :, y, :], d[2, :, y, :], dn[:, y, :], (*ex, *ez), (dx * 1e6, dz * 1e6))
    raise ValueError(f"unknown plane {plane!r}; one of {PLANES}")


def director_segments(plane: Plane, threshold: float = BIREFRINGENCE_THRESHOLD,
                      per_panel: int = SEGMENTS_PER_PANEL) -> np.ndarray:
    """Segments [n, 2, 2] (µm) centred on sampled voxels where Δn > threshold, along the director's
    in-plane projection: a director in the plane draws a full segment, one along the view a dot.
    Sign-free: each segment runs from −d/2 to +d/2."""
    rows, cols = plane.d_h.shape
    left, right, bottom, top = plane.extent
    spacing = max(right - left, top - bottom) / per_panel  # µm between segments, the same along both axes
    step_h = max(1, int(round(spacing / plane.pixel_um[0])))
    step_v = max(1, int(round(spacing / plane.pixel_um[1])))
    ii, jj = np.mgrid[step_v // 2:rows:step_v, step_h // 2:cols:step_h]
    keep = plane.dn[ii, jj] > threshold
    ii, jj = ii[keep], jj[keep]
    if ii.size == 0:
        return np.zeros((0, 2, 2))
    half = 0.45 * spacing
    u, v = plane.d_h[ii, jj] * half, plane.d_v[ii, jj] * half
    x = left + (jj + 0.5) * plane.pixel_um[0]
    y = bottom + (ii + 0.5) * plane.pixel_um[1]
    return np.stack([np.stack([x - u, y - v], -1), np.stack([x + u, y + v], -1)], 1)


def _index_limits(volumes, names) -> tuple[float, float]:
    lo = min(float(_quantity(v, n).min()) for v in volumes for n in names)
    hi = max(float(_quantity(v, n).max()) for v in volumes for n in names)
    if hi - lo < 1e-6:  # a uniform volume still gets a readable bar
        lo, hi = lo - 5e-4, hi + 5e-4
    return lo, hi


def _scales(volumes) -> dict[str, tuple[float, float]]:
    """One colour scale per quantity over all volumes; n_e and n_o share theirs."""
    index = _index_limits(volumes, ("n_e", "n_o"))
    lo, hi = _index_limits(volumes, ("Δn",))
    return {"n_e": index, "n_o": index, "Δn": (min(0.0, lo), hi)}


# grey under Δn so that the red director segments stand out
CMAPS = {"n_e": "viridis", "n_o": "viridis", "Δn": "gray"}


def _style_axes(ax, plane: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel(f"{plane[0]} (µm)", fontsize=7, labelpad=1)
    ax.set_ylabel(f"{plane[1]} (µm)", fontsize=7, labelpad=1)
    ax.tick_params(labelsize=6, pad=1, length=2)
    ax.xaxis.set_major_locator(MaxNLocator(3))
    ax.yaxis.set_major_locator(MaxNLocator(3))


def _draw(ax, plane: Plane, cmap, limits, segments: bool):
    image = ax.imshow(plane.image, origin="lower", cmap=cmap, vmin=limits[0], vmax=limits[1], extent=plane.extent,
                      aspect="equal", interpolation="nearest")
    if segments:
        from matplotlib.collections import LineCollection

        lines = director_segments(plane)
        if len(lines):
            ax.add_collection(LineCollection(lines, colors="red", linewidths=1.0, label="director"))
        ax.set_xlim(plane.extent[:2])  # the segments must not widen the axes
        ax.set_ylim(plane.extent[2:])
    return image


def _width_ratios(volume: Volume) -> list[float]:
    Z, Y, X = volume.shape
    dz, dy, dx = volume.voxel_size_m
    return [X * dx, Z * dz, X * dx]


def volume_figure(volume: Volume, centre: tuple[int, int, int] | None = None, title: str | None = None):
    """The matplotlib Figure: rows n_e, n_o, Δn; columns xy, zy, xz through ``centre`` (z, y, x;
    default the largest droplet); the director on the Δn row; one colour bar per row."""
    plt = pyplot()
    centre = tuple(centre) if centre is not None else largest_droplet_centre(volume)
    _check_centre(centre, volume.shape)
    scales = _scales([volume])
    fig, axes = plt.subplots(3, 3, figsize=(8.6, 7.4), layout="constrained", squeeze=False,
                             gridspec_kw={"width_ratios": _width_ratios(volume)})
    for r, quantity in enumerate(QUANTITIES):
        for c, name in enumerate(PLANES):
            plane = extract_plane(volume, quantity, name, centre)
            image = _draw(axes[r, c], plane, CMAPS[quantity], scales[quantity], segments=quantity == "Δn")
            axes[r, c].set_title(f"{quantity}, {name}", fontsize=8, pad=2)
            _style_axes(axes[r, c], name)
        bar = fig.colorbar(image, ax=axes[r, :], shrink=0.9, pad=0.01)
        bar.set_label(f"{quantity} (refractive index)", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    fig.suptitle(_plane_title(title, volume, centre), fontsize=9)
    return fig


def compare_figure(volumes: list[tuple[str, Volume]], centre: tuple[int, int, int] | None = None,
                   title: str | None = None):
    """Volumes side by side on one colour scale per quantity, then each one's difference from the
    first (the reference, e.g. the truth). Rows: n_e, n_o, Δn × xy, zy, xz; the director on Δn."""
    if len(volumes) < 2:
        raise ValueError("compare needs at least two volumes (the reference first)")
    reference = volumes[0][1]
    for label, volume in volumes[1:]:
        if volume.shape != reference.shape:
            raise ValueError(f"{label}: shape {volume.shape} differs from the reference's {reference.shape}")
    plt = pyplot()
    centre = tuple(centre) if centre is not None else largest_droplet_centre(reference)
    _check_centre(centre, reference.shape)
    scales = _scales([v for _, v in volumes])
    n, n_diff = len(volumes), len(volumes) - 1
    diffs = {q: max(float(np.abs(_quantity(v, q) - _quantity(reference, q)).max()) for _, v in volumes[1:]) or 1e-4
             for q in QUANTITIES}
    ratios = _width_ratios(reference)
    rows = [(q, p) for q in QUANTITIES for p in PLANES]
    heights = [{"xy": ratios[0] * reference.shape[1] / reference.shape[2], "zy": ratios[0] * reference.shape[1] /
                reference.shape[2], "xz": ratios[1]}[p] for _, p in rows]
    fig, axes = plt.subplots(len(rows), n + n_diff, figsize=(1.9 * (n + n_diff) + 1.6, 1.55 * len(rows)),
                             layout="constrained", squeeze=False, gridspec_kw={"height_ratios": heights})
    for r, (quantity, name) in enumerate(rows):
        for c, (label, volume) in enumerate(volumes):
            plane = extract_plane(volume, quantity, name, centre)
            image = _draw(axes[r, c], plane, CMAPS[quantity], scales[quantity], segments=quantity == "Δn")
            axes[r, c].set_title(f"{label}: {quantity}, {name}", fontsize=7, pad=2)
            _style_axes(axes[r, c], name)
        bar = fig.colorbar(image, ax=axes[r, :n], shrink=0.9, pad=0.01)
        bar.set_label(quantity, fontsize=7)
        bar.ax.tick_params(labelsize=6)
        for k, (label, volume) in enumerate(volumes[1:]):
            ax = axes[r, n + k]
            plane = extract_plane(volume, quantity, name, centre)
            plane.image = plane.image - extract_plane(reference, quantity, name, centre).image
            diff = _draw(ax, plane, "RdBu_r", (-diffs[quantity], diffs[quantity]), segments=False)
            ax.set_title(f"{label} − {volumes[0][0]}", fontsize=7, pad=2)
            _style_axes(ax, name)
        bar = fig.colorbar(diff, ax=axes[r, n:], shrink=0.9, pad=0.01)
        bar.set_label(f"{quantity} difference", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    fig.suptitle(_plane_title(title, reference, centre), fontsize=9)
    return fig


def _check_centre(centre, shape) -> None:
    if len(centre) != 3 or any(not 0 <= c < n for c, n in zip(centre, shape)):
        raise ValueError(f"planes (z, y, x) = {centre} lie outside the volume {shape}")


def _plane_title(title, volume: Volume, centre) -> str:
    z, y, x = centre
    Z, Y, X = volume.shape
    dz, dy, dx = (d * 1e6 for d in volume.voxel_size_m)
    where = f"planes z = {(z - Z / 2) * dz:.2f} µm, y = {(y - Y / 2) * dy:.2f} µm, x = {(x - X / 2) * dx:.2f} µm " \
            f"(voxels {z}, {y}, {x}); director in red"
    return f"{title}\n{where}" if title else where


def save_figure(fig, path, dpi: int = 120) -> Path:
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def slices_figure(volume: Volume, path, title: str | None = None, truth: Volume | None = None,
                  centre: tuple[int, int, int] | None = None) -> Path:
    """Save :func:`volume_figure` of ``volume``, or with ``truth`` :func:`compare_figure` of the
    truth and the volume (planes through the truth's largest droplet)."""
    if truth is None:
        fig = volume_figure(volume, centre, title)
    else:
        fig = compare_figure([("truth", truth), ("result", volume)], centre, title)
    return save_figure(fig, path)
