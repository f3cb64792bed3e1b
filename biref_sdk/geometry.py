"""Acquisition geometry of a DTT microscope, shared by the simulator and every reconstruction.

Conventions (docs/formats.md): SI units; volumes indexed ``[z, y, x]``; vectors stored with
components ``(x, y, z)``; hologram pixel ``[i, j]`` is row ``i`` (y), column ``j`` (x); the centre of
column ``j`` sits at ``x = (j - W/2) * pixel_size_m`` (likewise rows, and volume slices with
``voxel_size_m``); the volume centre is the focal plane ``z = 0``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

# Attribute names of docs/formats.md, in the order they are written.
GEOMETRY_ATTRIBUTES = (
    "wavelength_m",
    "medium_index",
    "na_objective",
    "pixel_size_m",
    "illumination_sines",
    "reference_carriers",
    "volume_shape",
    "voxel_size_m",
)


def ring_illumination_sines(n_views: int, na_illumination: float, medium_index: float) -> np.ndarray:
    """Illumination direction sines (s_x, s_y) float[V, 2]: one view on axis, the rest on a ring.

    DTT scans the illumination on a circle near the condenser NA; ``na_illumination`` is that NA,
    so the ring's sine in the medium is ``na_illumination / medium_index``.
    """
    if n_views < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}")
    sine = na_illumination / medium_index
    if not 0.0 <= sine < 1.0:
        raise ValueError(f"illumination NA {na_illumination} must be below the medium index {medium_index}")
    azimuth = 2.0 * np.pi * np.arange(n_views - 1) / max(n_views - 1, 1)
    ring = sine * np.stack([np.cos(azimuth), np.sin(azimuth)], axis=1)
    return np.concatenate([np.zeros((1, 2)), ring], axis=0)


def snap_to_grid(sines: np.ndarray, wavelength_m: float, medium_index: float, pixel_size_m: float,
                 grid_px: int) -> np.ndarray:
    """Move illumination sines to the nearest spatial frequency of a ``grid_px`` FFT grid.

    A tilted plane wave whose frequency is on the grid is periodic over the frame, so the
    simulated and demodulated fields carry no spectral leakage (scanning-mirror DTT setups choose
    their angles the same way). The shift is at most half a bin.
    """
    scale = medium_index * pixel_size_m / wavelength_m  # sine -> cycles per pixel
    return np.round(np.asarray(sines) * scale * grid_px) / grid_px / scale


@dataclass(frozen=True)
class Geometry:
    """Everything about the instrument that a hologram needs to be understood.

    ``illumination_sines`` float[V, 2] are (s_x, s_y) in the medium, so that
    ``k_in = 2*pi*medium_index/wavelength_m * (s_x, s_y, sqrt(1 - s_x**2 - s_y**2))``.
    ``reference_carriers`` float[2, 2] is the carrier (f_x, f_y), in cycles per pixel, of the
    reference that interferes with the x- (row 0) and the y-component (row 1) of the field.
    """

    wavelength_m: float
    medium_index: float
    na_objective: float
    pixel_size_m: float
    illumination_sines: tuple[tuple[float, float], ...]
    reference_carriers: tuple[tuple[float, float], tuple[float, float]]
    hologram_shape: tuple[int, int]
    volume_shape: tuple[int, int, int]
    voxel_size_m: tuple[float, float, float]

    def __post_init__(self) -> None:
        # Normalise array-likes into nested tuples so that the dataclass stays hashable and frozen.
        def tup(value, cast):
            return tuple(tup(v, cast) for v in value) if np.ndim(value) > 0 else cast(value)

        object.__setattr__(self, "illumination_sines", tup(np.asarray(self.illumination_sines, float).reshape(-1, 2), float))
        object.__setattr__(self, "reference_carriers", tup(np.asarray(self.reference_carriers, float).reshape(2, 2), float))
        object.__setattr__(self, "hologram_shape", tup(np.asarray(self.hologram_shape, int).reshape(2), int))
        object.__setattr__(self, "volume_shape", tup(np.asarray(self.volume_shape, int).reshape(3), int))
        object.__setattr__(self, "voxel_size_m", tup(np.asarray(self.voxel_size_m, float).reshape(3), float))
        for name in ("wavelength_m", "medium_index", "na_objective", "pixel_size_m"):
            object.__setattr__(self, name, float(getattr(self, name)))
        self.validate()

    # -- derived quantities -------------------------------------------------------------------
    @property
    def n_views(self) -> int:
        return len(self.illumination_sines)

    @property
    def sines(self) -> np.ndarray:
        return np.asarray(self.illumination_sines, dtype=float)

    @property
    def carriers(self) -> np.ndarray:
        return np.asarray(self.reference_carriers, dtype=float)

    @property
    def k0_per_m(self) -> float:
        """Vacuum wavenumber 2*pi/wavelength (rad/m)."""
        return 2.0 * math.pi / self.wavelength_m

    @property
    def k_medium_per_m(self) -> float:
        return self.k0_per_m * self.medium_index

    @property
    def pupil_radius_cycles_per_pixel(self) -> float:
        """Radius of the objective pupil, NA/wavelength, in cycles per camera pixel."""
        return self.na_objective * self.pixel_size_m / self.wavelength_m

    def illumination_directions(self) -> np.ndarray:
        """Unit propagation vectors k_in/|k_in| float[V, 3] in (x, y, z) order."""
        s = self.sines
        sz = np.sqrt(1.0 - np.sum(s**2, axis=1))
        return np.concatenate([s, sz[:, None]], axis=1)

    def input_polarizations(self) -> np.ndarray:
        """Input polarization unit vectors float[2, V, 3]: x^ (p=0) and y^ (p=1) projected
        perpendicular to each illumination direction and normalised."""
        k_hat = self.illumination_directions()
        out = np.empty((2, self.n_views, 3))
        for p, axis in enumerate(np.eye(3)[:2]):
            vec = axis[None, :] - (k_hat @ axis)[:, None] * k_hat
            out[p] = vec / np.linalg.norm(vec, axis=1, keepdims=True)
        return out

    def hologram_coordinates_m(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel-centre coordinates (y[H], x[W]) in metres, zero at the optical axis."""
        h, w = self.hologram_shape
        return ((np.arange(h) - h / 2) * self.pixel_size_m, (np.arange(w) - w / 2) * self.pixel_size_m)

    def volume_coordinates_m(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Voxel-centre coordinates (z[Z], y[Y], x[X]) in metres; z = 0 is the focal plane."""
        return tuple((np.arange(n) - n / 2) * d for n, d in zip(self.volume_shape, self.voxel_size_m))

    # -- checks --------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError if the parameters cannot describe a working off-axis DTT microscope."""
        if self.wavelength_m <= 0 or self.pixel_size_m <= 0 or min(self.voxel_size_m) <= 0:
            raise ValueError("wavelength_m, pixel_size_m and voxel_size_m must be positive")
        if not 0 < self.na_objective < self.medium_index:
            raise ValueError(f"na_objective {self.na_objective} must lie in (0, medium_index={self.medium_index})")
        if self.n_views < 1:
            raise ValueError("at least one illumination view is needed")
        s = np.linalg.norm(self.sines, axis=1)
        if np.any(s * self.medium_index > self.na_objective):
            raise ValueError("every illumination direction must lie inside the objective NA, "
                             f"max illumination NA {s.max() * self.medium_index:.3f} > {self.na_objective}")
        h, w = self.hologram_shape
        z, y, x = self.volume_shape
        dz, dy, dx = self.voxel_size_m
        if y * dy > h * self.pixel_size_m * (1 + 1e-9) or x * dx > w * self.pixel_size_m * (1 + 1e-9):
            raise ValueError("the volume must lie inside the camera field of view")
        r = self.pupil_radius_cycles_per_pixel
        c = self.carriers
        if np.any(np.abs(c) + r > 0.5 + 1e-9):
            raise ValueError(f"a sideband (carrier +- pupil radius {r:.3f}) crosses the Nyquist limit")
        if np.any(np.linalg.norm(c, axis=1) < 3 * r - 1e-9):
            raise ValueError("a sideband overlaps the DC term: |carrier| must be at least 3 x pupil radius")
        for sign in (1.0, -1.0):
            if np.linalg.norm(c[0] - sign * c[1]) < 2 * r - 1e-9:
                raise ValueError("the two sidebands overlap: carriers must differ by at least 2 x pupil radius")

    def to_attributes(self) -> dict:
        """The geometry as HDF5 attributes (names of docs/formats.md)."""
        return {
            "wavelength_m": self.wavelength_m,
            "medium_index": self.medium_index,
            "na_objective": self.na_objective,
            "pixel_size_m": self.pixel_size_m,
            "illumination_sines": self.sines,
            "reference_carriers": self.carriers,
            "volume_shape": np.asarray(self.volume_shape, dtype=np.int64),
            "voxel_size_m": np.asarray(self.voxel_size_m, dtype=float),
        }

    @classmethod
    def from_attributes(cls, attrs, hologram_shape) -> "Geometry":
        missing = [name for name in GEOMETRY_ATTRIBUTES if name not in attrs]
        if missing:
            raise ValueError(f"geometry attributes missing: {', '.join(missing)}")
        return cls(hologram_shape=tuple(int(v) for v in hologram_shape),
                   **{name: np.asarray(attrs[name]) if np.ndim(attrs[name]) else attrs[name]
                      for name in GEOMETRY_ATTRIBUTES})

    def replace(self, **changes) -> "Geometry":
        return dataclasses.replace(self, **changes)


def _preset(hologram_px: int, volume_shape, voxel_size_m) -> Geometry:
    # 532 nm, an oil objective of NA 1.2 and 50 nm pixels (6.5 um camera pixels at 130x) give a
    # pupil radius of 0.113 cycles/pixel, so both sidebands (|carrier| = 0.37 >= 3 x 0.113) stay
    # clear of the DC term, of each other and of Nyquist; the ring at NA 1.0 lies inside NA 1.2.
    medium_index = 1.54
    return Geometry(
        wavelength_m=532e-9,
        medium_index=medium_index,
        na_objective=1.2,
        pixel_size_m=50e-9,
        illumination_sines=snap_to_grid(
            ring_illumination_sines(37, na_illumination=1.0, medium_index=medium_index),
            wavelength_m=532e-9, medium_index=medium_index, pixel_size_m=50e-9, grid_px=128),
        # on the 1/128-cycle grid shared by both presets, so frames stay periodic and demodulation
        # has no leakage: (45, 15)/128 and (-15, 45)/128 cycles per pixel
        reference_carriers=((45 / 128, 15 / 128), (-15 / 128, 45 / 128)),
        hologram_shape=(hologram_px, hologram_px),
        volume_shape=volume_shape,
        voxel_size_m=voxel_size_m,
    )


PRESETS = {
    # The paper's sizes: 2 x 37 holograms of 512 x 512, volumes 80 x 332 x 332.
    "paper": _preset(512, (80, 332, 332), (200e-9, 50e-9, 50e-9)),
    # CPU-sized: 2 x 37 holograms of 128 x 128, volumes 32 x 64 x 64 (a 3.2 um cube).
    "small": _preset(128, (32, 64, 64), (100e-9, 50e-9, 50e-9)),
}


def preset(name: str) -> Geometry:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
