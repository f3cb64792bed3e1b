"""Volumes and acquisitions as napari layer data tuples ``(data, kwargs, layer_type)``, in µm.

World coordinates follow docs/formats.md: voxel ``k`` of an axis with N voxels of size d is
centred at ``(k - N/2) * d``; the layers' ``scale`` and ``translate`` say so, so that volumes of
different grids overlay where they are in the sample.
"""
from __future__ import annotations

import numpy as np

from ..files import Volume

BIREFRINGENCE_THRESHOLD = 1e-3  # Δn below this: no director drawn
DIRECTOR_STEP_UM = 0.3          # spacing of the director segments


def volume_scale_translate(volume: Volume) -> tuple[tuple[float, ...], tuple[float, ...]]:
    scale = tuple(d * 1e6 for d in volume.voxel_size_m)
    return scale, tuple(-n / 2 * s for n, s in zip(volume.shape, scale))


def director_vectors(volume: Volume, step_um: float = DIRECTOR_STEP_UM,
                     threshold: float = BIREFRINGENCE_THRESHOLD) -> np.ndarray:
    """napari Vectors data [n, 2, 3] in voxel coordinates (z, y, x): start and projection of
    sign-free segments (centred on the voxel) along the director where Δn > threshold, on every z
    plane; lengths are physical (``step_um`` * 0.9) once the layer's scale applies."""
    scale = np.asarray(volume_scale_translate(volume)[0])
    # every z plane (napari browses z slices), ``step_um`` apart within a plane
    steps = [1] + [max(1, int(round(step_um / s))) for s in scale[1:]]
    grid = np.meshgrid(*(np.arange(s // 2, n, s) for s, n in zip(steps, volume.shape)), indexing="ij")
    k, j, i = (g.ravel() for g in grid)
    keep = (volume.ne - volume.no)[k, j, i] > threshold
    k, j, i = k[keep], j[keep], i[keep]
    d = volume.director[:, k, j, i]                   # (x, y, z) components
    projection = np.stack([d[2], d[1], d[0]], -1) * (0.9 * step_um) / scale  # (z, y, x), in voxels
    position = np.stack([k, j, i], -1) - projection / 2
    return np.stack([position, projection], 1).astype(np.float32)


def volume_layers(volume: Volume, prefix: str = "") -> list[tuple]:
    """n_e, n_o (one contrast range), Δn and the director (red segments) of a volume."""
    scale, translate = volume_scale_translate(volume)
    common = {"scale": scale, "translate": translate, "units": "µm"}
    lo = float(min(volume.ne.min(), volume.no.min()))
    hi = float(max(volume.ne.max(), volume.no.max()))
    if hi - lo < 1e-6:
        lo, hi = lo - 5e-4, hi + 5e-4
    dn = volume.ne - volume.no
    layers = [
        (volume.ne, {**common, "name": f"{prefix}n_e", "colormap": "viridis", "contrast_limits": (lo, hi),
                     "visible": False}, "image"),
        (volume.no, {**common, "name": f"{prefix}n_o", "colormap": "viridis", "contrast_limits": (lo, hi),
                     "visible": False}, "image"),
        (dn, {**common, "name": f"{prefix}Δn", "colormap": "gray",
              "contrast_limits": (min(0.0, float(dn.min())), max(float(dn.max()), 1e-4))}, "image"),
        (director_vectors(volume), {"scale": scale, "translate": translate, "units": "µm",
                                    "name": f"{prefix}director", "edge_color": "red", "edge_width": 0.1,
                                    "length": 1.0, "vector_style": "line",   # sign-free: no arrow heads
                                    # segments centred on their voxel start off its plane: show those crossing it
                                    "projection_mode": "all"}, "vectors"),
    ]
    if volume.uncertainty is not None:  # where the network doubts itself (its quarter turns disagree)
        layers.append((volume.uncertainty[0], {**common, "name": f"{prefix}σ n_e", "colormap": "magma",
                                               "visible": False, "metadata": _consistency(volume)}, "image"))
    return layers


def _consistency(volume: Volume) -> dict:
    c = volume.consistency
    return {} if c is None else {"consistency_score": c.score, "consistency_noise_floor": c.noise_floor}


def acquisition_layers(handle, prefix: str = "") -> list[tuple]:
    """Holograms and background [2, V, H, W] (polarization, view, row, column) of an open
    acquisition file, lazily (dask) so large files stay on disk; its truth as volume layers."""
    import dask.array as da

    from ..files import Volume

    pixel = float(handle.attrs["pixel_size_m"]) * 1e6
    scale = (1.0, 1.0, pixel, pixel)
    layers = [
        (da.from_array(handle["holograms"], chunks=(1, 1, *handle["holograms"].shape[2:])),
         {"name": f"{prefix}holograms", "scale": scale, "axis_labels": ("polarization", "view", "y", "x")}, "image"),
        (da.from_array(handle["background"], chunks=(1, 1, *handle["background"].shape[2:])),
         {"name": f"{prefix}background", "scale": scale, "visible": False,
          "axis_labels": ("polarization", "view", "y", "x")}, "image"),
    ]
    if "truth" in handle:
        truth = handle["truth"]
        volume = Volume(truth["ne"][()], truth["no"][()], truth["director"][()], truth.attrs["voxel_size_m"],
                        float(truth.attrs["medium_index"]))
        layers += volume_layers(volume, prefix=f"{prefix}truth ")
    return layers


def dataset_layers(handle, prefix: str = "") -> list[tuple]:
    """A data set's holograms [N, 2, V, H, W] and truth n_e, n_o [N, Z, Y, X], lazily (dask)."""
    import dask.array as da

    pixel = float(handle.attrs["pixel_size_m"]) * 1e6
    voxel = tuple(float(v) * 1e6 for v in handle.attrs["voxel_size_m"])
    holograms = handle["holograms"]
    layers = [(da.from_array(holograms, chunks=(1, 1, 1, *holograms.shape[3:])),
               {"name": f"{prefix}holograms", "scale": (1.0, 1.0, 1.0, pixel, pixel),
                "axis_labels": ("sample", "polarization", "view", "y", "x")}, "image")]
    for name in ("ne", "no"):
        data = handle[name]
        layers.append((da.from_array(data, chunks=(1, *data.shape[1:])),
                       {"name": f"{prefix}truth n_{name[1]}", "scale": (1.0, *voxel), "colormap": "viridis",
                        "visible": name == "ne", "axis_labels": ("sample", "z", "y", "x")}, "image"))
    return layers
