"""A 3D view as the paper's Fig. 2b: droplet isosurfaces of Δn = n_e − n_o with the director as
red, sign-free glyphs, and a 360-degree rotation video as the paper's supplementary videos.

Rendered off screen by VTK through pyvista (extra ``[viz3d]``): with no X display, VTK falls back
to EGL or OSMesa, so Mesa's ``libEGL``/``libOSMesa`` must be present on a headless machine.
Lengths in the scene are µm, so z voxels are drawn at their true (larger) size.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..files import Volume
from .slices import BIREFRINGENCE_THRESHOLD

log = logging.getLogger(__name__)

WINDOW_SIZE = (640, 480)  # multiples of 16: video encoders need no resizing
GLYPHS_PER_AXIS = 10      # director glyphs across the longest side of the volume


def _pyvista():
    try:
        import pyvista
    except ImportError:
        raise ImportError("the 3D view needs pyvista: pip install 'biref_sdk[viz3d]'") from None
    return pyvista


def director_glyphs(volume: Volume, threshold: float = BIREFRINGENCE_THRESHOLD,
                    per_axis: int = GLYPHS_PER_AXIS) -> tuple[np.ndarray, np.ndarray]:
    """Glyph segments (x, y, z) in µm: ``starts`` and ``ends`` [n, 3], centred on voxels sampled
    on a grid of about ``per_axis`` points along the longest side, where Δn > threshold;
    each runs along the director from −d/2 to +d/2 (sign-free)."""
    dz, dy, dx = (d * 1e6 for d in volume.voxel_size_m)
    Z, Y, X = volume.shape
    spacing = max(Z * dz, Y * dy, X * dx) / per_axis
    steps = [max(1, int(round(spacing / d))) for d in (dz, dy, dx)]
    grid = np.meshgrid(*(np.arange(s // 2, n, s) for s, n in zip(steps, volume.shape)), indexing="ij")
    k, j, i = (g.ravel() for g in grid)
    keep = (volume.ne - volume.no)[k, j, i] > threshold
    k, j, i = k[keep], j[keep], i[keep]
    centres = np.stack([(i - X / 2) * dx, (j - Y / 2) * dy, (k - Z / 2) * dz], -1)
    half = 0.45 * spacing * volume.director[:, k, j, i].T
    return centres - half, centres + half


def _grid(pv, volume: Volume):
    dz, dy, dx = (d * 1e6 for d in volume.voxel_size_m)
    Z, Y, X = volume.shape
    grid = pv.ImageData(dimensions=(X, Y, Z), spacing=(dx, dy, dz), origin=(-X / 2 * dx, -Y / 2 * dy, -Z / 2 * dz))
    grid.point_data["dn"] = (volume.ne - volume.no).ravel(order="C")  # [z, y, x] in C order: x runs fastest, as VTK
    return grid


class VolumeScene:
    """An off-screen pyvista plotter holding one volume's 3D view; :meth:`image` renders the
    current camera, :meth:`rotation_frames` turns it about the vertical axis."""

    def __init__(self, volume: Volume, title: str | None = None, window_size=WINDOW_SIZE,
                 threshold: float = BIREFRINGENCE_THRESHOLD) -> None:
        pv = _pyvista()
        self.plotter = pv.Plotter(off_screen=True, window_size=list(window_size))
        self.plotter.set_background("white")
        grid = _grid(pv, volume)
        dn_max = float((volume.ne - volume.no).max())
        self.isosurface_level = 0.5 * dn_max if dn_max > threshold else None
        if self.isosurface_level is not None:
            surface = grid.contour([self.isosurface_level], scalars="dn")
            if surface.n_points:
                self.plotter.add_mesh(surface, color="#6fa8dc", opacity=0.35, smooth_shading=True,
                                      label="Δn isosurface")
        starts, ends = director_glyphs(volume, threshold)
        self.n_glyphs = len(starts)
        if self.n_glyphs:
            self.plotter.add_mesh(pv.line_segments_from_points(np.stack([starts, ends], 1).reshape(-1, 3)),
                                  color="red", line_width=3)
        self.plotter.add_mesh(grid.outline(), color="black")
        self.plotter.show_bounds(grid="back", location="outer", xtitle="x (um)", ytitle="y (um)", ztitle="z (um)",
                                 font_size=10, color="black")
        level = f", isosurface Δn = {self.isosurface_level:.4f}" if self.isosurface_level is not None else ""
        self.plotter.add_text(f"{title + ': ' if title else ''}director in red{level}", font_size=9, color="black")
        self.plotter.camera_position = "iso"
        self.plotter.camera.up = (0.0, 0.0, 1.0)  # z (the optical axis) stays vertical as the video turns
        self.plotter.reset_camera()

    def image(self) -> np.ndarray:
        """The current view, uint8 [H, W, 3]."""
        self.plotter.render()
        return np.asarray(self.plotter.screenshot(return_img=True))

    def rotation_frames(self, frames: int):
        """``frames`` images, turning the camera by 360/frames degrees about the volume's z axis
        between them (the last frame is one step short of the first, so the video loops)."""
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        for _ in range(frames):
            yield self.image()
            self.plotter.camera.Azimuth(360.0 / frames)  # VTK's: about the view-up (z) through the focal point

    def close(self) -> None:
        self.plotter.close()

    def __enter__(self) -> "VolumeScene":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def render_3d(volume: Volume, path, title: str | None = None) -> Path:
    """Save the 3D view as a PNG."""
    import imageio.v3 as iio

    with VolumeScene(volume, title) as scene:
        image = scene.image()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, image)
    return path


def rotation_video(volume: Volume, path, frames: int = 72, fps: float = 24.0, title: str | None = None) -> Path:
    """Save a 360-degree rotation as ``.mp4`` (ffmpeg, extra ``[viz3d]``) or ``.gif``."""
    import imageio.v2 as imageio

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".mp4", ".gif"):
        raise ValueError(f"video must end in .mp4 or .gif, got {path.name!r}")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".mp4":
        try:
            writer = imageio.get_writer(path, format="FFMPEG", fps=fps, macro_block_size=16, quality=7)
        except (ImportError, ValueError) as error:
            raise ImportError(f"mp4 videos need imageio-ffmpeg: pip install 'biref_sdk[viz3d]' ({error})") from None
    else:
        writer = imageio.get_writer(path, format="GIF", mode="I", duration=1000.0 / fps, loop=0)
    with VolumeScene(volume, title) as scene, writer:
        for frame in scene.rotation_frames(frames):
            writer.append_data(frame)
    log.info("wrote %d frames to %s", frames, path)
    return path
