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
        self._normalise()
        self.validate()

    @classmethod
    def unchecked(cls, **fields) -> "Geometry":
        """A geometry built without :meth:`validate`, so that :func:`geometry_findings` can report
        everything that is wrong with it (``biref geometry check``)."""
        geometry = cls.__new__(cls)
        for name, value in fields.items():
            object.__setattr__(geometry, name, value)
        geometry._normalise()
        return geometry

    def _normalise(self) -> None:
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

    def frames_periodic(self, tolerance_bins: float = 1e-3) -> bool:
        """True when every illumination frequency and both carriers lie on the frame's FFT grid:
        the frames are then periodic and demodulation has no spectral leakage."""
        h, w = self.hologram_shape
        scale = self.medium_index * self.pixel_size_m / self.wavelength_m  # sine -> cycles per pixel
        bins = np.concatenate([self.sines * scale, self.carriers]) * np.array([w, h])
        return bool(np.all(np.abs(bins - np.round(bins)) <= tolerance_bins))

    def hologram_coordinates_m(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel-centre coordinates (y[H], x[W]) in metres, zero at the optical axis."""
        h, w = self.hologram_shape
        return ((np.arange(h) - h / 2) * self.pixel_size_m, (np.arange(w) - w / 2) * self.pixel_size_m)

    def volume_coordinates_m(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Voxel-centre coordinates (z[Z], y[Y], x[X]) in metres; z = 0 is the focal plane."""
        return tuple((np.arange(n) - n / 2) * d for n, d in zip(self.volume_shape, self.voxel_size_m))

    # -- checks --------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError if the parameters cannot describe a working off-axis DTT microscope
        (the first refusal of :func:`geometry_findings`)."""
        for finding in geometry_findings(self):
            if finding.refused:
                raise ValueError(finding.text)

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
    def from_attributes(cls, attrs, hologram_shape, checked: bool = True) -> "Geometry":
        missing = [name for name in GEOMETRY_ATTRIBUTES if name not in attrs]
        if missing:
            raise ValueError(f"geometry attributes missing: {', '.join(missing)}")
        fields = dict(hologram_shape=tuple(int(v) for v in hologram_shape),
                      **{name: np.asarray(attrs[name]) if np.ndim(attrs[name]) else attrs[name]
                         for name in GEOMETRY_ATTRIBUTES})
        return cls(**fields) if checked else cls.unchecked(**fields)

    def replace(self, **changes) -> "Geometry":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Finding:
    """One line of ``biref geometry check``; ``refused``: the service and every tool refuse it."""

    refused: bool
    text: str

    def __str__(self) -> str:
        return f"{'REFUSED' if self.refused else 'ok'}: {self.text}"


def geometry_findings(g: Geometry) -> list[Finding]:
    """Everything ``validate`` checks, one finding each (refused or ok), then what limits resolution."""
    out: list[Finding] = []

    def check(ok: bool, good: str, bad: str) -> None:
        out.append(Finding(not ok, good if ok else bad))

    positive = g.wavelength_m > 0 and g.pixel_size_m > 0 and min(g.voxel_size_m) > 0
    check(positive, "wavelength, pixel and voxel sizes are positive",
          "wavelength_m, pixel_size_m and voxel_size_m must be positive")
    check(0 < g.na_objective < g.medium_index,
          f"objective NA {g.na_objective:.3f} below the medium index {g.medium_index:.3f}",
          f"na_objective {g.na_objective} must lie in (0, medium_index={g.medium_index})")
    check(g.n_views >= 1, f"{g.n_views} illumination views", "at least one illumination view is needed")
    if not positive or g.n_views < 1:
        return out
    s_max = float(np.linalg.norm(g.sines, axis=1).max()) * g.medium_index
    check(s_max <= g.na_objective,
          f"illumination NA {s_max:.3f} inside the objective NA {g.na_objective:.3f}",
          "every illumination direction must lie inside the objective NA, "
          f"max illumination NA {s_max:.3f} > {g.na_objective}")
    h, w = g.hologram_shape
    z, y, x = g.volume_shape
    dz, dy, dx = g.voxel_size_m
    fits = y * dy <= h * g.pixel_size_m * (1 + 1e-9) and x * dx <= w * g.pixel_size_m * (1 + 1e-9)
    check(fits, f"volume {x * dx * 1e6:.2f} x {y * dy * 1e6:.2f} um inside the field of view "
                f"{w * g.pixel_size_m * 1e6:.2f} x {h * g.pixel_size_m * 1e6:.2f} um",
          "the volume must lie inside the camera field of view")
    r = g.pupil_radius_cycles_per_pixel
    c = g.carriers
    margin = 0.5 - float((np.abs(c) + r).max())
    check(margin >= -1e-9, f"sidebands clear of Nyquist (margin {margin:.3f} cycles/pixel)",
          f"a sideband (carrier +- pupil radius {r:.3f}) crosses the Nyquist limit")
    dc = float(np.linalg.norm(c, axis=1).min())
    check(dc >= 3 * r - 1e-9, f"sidebands clear of the DC term (|carrier| {dc:.3f} >= 3 x pupil radius {r:.3f})",
          "a sideband overlaps the DC term: |carrier| must be at least 3 x pupil radius")
    apart = min(float(np.linalg.norm(c[0] - sign * c[1])) for sign in (1.0, -1.0))
    check(apart >= 2 * r - 1e-9, f"the two sidebands apart ({apart:.3f} >= 2 x pupil radius)",
          "the two sidebands overlap: carriers must differ by at least 2 x pupil radius")
    if any(f.refused for f in out):
        return out
    out.append(Finding(False, "illumination and carriers on the FFT grid: periodic frames, no leakage"
                       if g.frames_periodic() else
                       "illumination or carriers off the FFT grid: frames not periodic (the formula divides by "
                       "the unsmoothed background, which cancels the leakage)"))
    # resolution: the Ewald-sphere coverage (objective + illumination NA) against the voxel grid
    lateral_m = g.wavelength_m / (g.na_objective + s_max)
    nm = g.medium_index
    axial_m = g.wavelength_m / (nm - math.sqrt(max(nm**2 - g.na_objective**2, 0.0)))
    limit = "voxel size" if dx > lateral_m / 2 else "NA (objective + illumination)"
    out.append(Finding(False, f"lateral resolution ~{lateral_m * 1e9:.0f} nm (lambda/(NA+NA_ill)), voxel "
                              f"{dx * 1e9:.0f} nm: limited by the {limit}"))
    limit_z = "voxel size" if dz > axial_m / 2 else "missing cone (objective NA)"
    out.append(Finding(False, f"axial resolution ~{axial_m * 1e9:.0f} nm (lambda/(n-sqrt(n^2-NA^2))), voxel "
                              f"{dz * 1e9:.0f} nm: limited by the {limit_z}"))
    return out


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
