"""Reading and writing the three HDF5 file kinds of docs/formats.md: volume, acquisition, data set.

Every file carries ``kind``, ``format_version``, ``sdk_version`` and ``parameters`` (a JSON string
with whatever made it). Writes go to a temporary file in the same folder that is renamed into
place, so a crash never leaves a half-written file under the final name.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from ._version import __version__
from .geometry import Geometry

FORMAT_VERSION = 1
KINDS = ("volume", "acquisition", "dataset")

# The most bytes one array may announce before it is read: a few-KB file can declare chunked or
# virtual datasets of any logical size, so sizes are checked against this before any allocation.
MAX_ARRAY_BYTES = 4 * 1024**3


class FileFormatError(ValueError):
    """A file is not a biref_sdk file of the expected kind, or breaks docs/formats.md."""


@dataclass
class Consistency:
    """How well a reconstructed volume explains the measurement (``reconstruction.consistency``):
    ``residual`` float[2, V], each view's relative residual (NaN for views not checked);
    ``noise_floor`` the median residual camera noise alone would leave; ``score`` the median of the
    residuals with the noise taken out (0: the volume explains the data); ``time_s`` the check's
    cost."""

    residual: np.ndarray
    score: float
    noise_floor: float
    time_s: float

    def __post_init__(self) -> None:
        self.residual = np.asarray(self.residual, dtype=np.float64)
        if self.residual.ndim != 2 or self.residual.shape[0] != 2:
            raise FileFormatError(f"consistency residual must be [2, V], got {self.residual.shape}")

    @property
    def views_checked(self) -> int:
        return int(np.isfinite(self.residual).sum())

    def to_dict(self) -> dict:
        """The wire form (docs/protocol.md): NaN becomes None."""
        return {"score": self.score, "noise_floor": self.noise_floor, "views_checked": self.views_checked,
                "time_s": self.time_s,
                "residual": [[float(r) if math.isfinite(r) else None for r in row] for row in self.residual]}

    @classmethod
    def from_dict(cls, data: dict) -> "Consistency":
        """From the wire form; a field of the wrong type raises ValueError."""
        def number(value, name: str) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"consistency {name} must be a number, got {type(value).__name__}")
            return float(value)

        if not isinstance(data, dict) or not isinstance(data.get("residual"), list):
            raise ValueError("consistency must be a map with a residual list")
        views = data.get("views_checked", 0)
        if isinstance(views, bool) or not isinstance(views, int) or views < 0:
            raise ValueError("consistency views_checked must be a non-negative integer")
        residual = [[np.nan if r is None else number(r, "residual") for r in row] for row in data["residual"]]
        return cls(residual=np.array(residual, dtype=np.float64), score=number(data.get("score"), "score"),
                   noise_floor=number(data.get("noise_floor", np.nan), "noise_floor"),
                   time_s=number(data.get("time_s", 0.0), "time_s"))


@dataclass
class Volume:
    """A birefringence volume: principal indices and optic axis on a regular grid.

    ``ne``, ``no`` float32[Z, Y, X]; ``director`` float32[3, Z, Y, X] (unit vectors, components
    (x, y, z); the sign is arbitrary); ``voxel_size_m`` (dz, dy, dx). A reconstruction may add
    ``uncertainty`` float32[3, Z, Y, X] (the spread of n_e and n_o in refractive-index units and of
    the director in radians) and ``consistency`` (:class:`Consistency`).
    """

    ne: np.ndarray
    no: np.ndarray
    director: np.ndarray
    voxel_size_m: tuple[float, float, float]
    medium_index: float
    parameters: dict = field(default_factory=dict)
    uncertainty: np.ndarray | None = None
    consistency: Consistency | None = None

    def __post_init__(self) -> None:
        self.ne = np.asarray(self.ne, dtype=np.float32)
        self.no = np.asarray(self.no, dtype=np.float32)
        self.director = np.asarray(self.director, dtype=np.float32)
        if self.ne.ndim != 3 or self.no.shape != self.ne.shape or self.director.shape != (3, *self.ne.shape):
            raise FileFormatError(f"volume shapes disagree: ne {self.ne.shape}, no {self.no.shape}, "
                                  f"director {self.director.shape} (expected [Z,Y,X], [Z,Y,X], [3,Z,Y,X])")
        if self.uncertainty is not None:
            self.uncertainty = np.asarray(self.uncertainty, dtype=np.float32)
            if self.uncertainty.shape != (3, *self.ne.shape):
                raise FileFormatError(f"uncertainty has shape {self.uncertainty.shape}, expected {(3, *self.ne.shape)}")
        self.voxel_size_m = tuple(float(v) for v in np.asarray(self.voxel_size_m).reshape(3))
        self.medium_index = float(self.medium_index)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.ne.shape


@dataclass
class Acquisition:
    """One sample's recording: ``holograms`` and ``background`` [2, V, H, W] (polarization, view,
    row, column) with the geometry that explains them, and optionally the simulated truth."""

    holograms: np.ndarray
    background: np.ndarray
    geometry: Geometry
    truth: Volume | None = None
    parameters: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        expected = (2, self.geometry.n_views, *self.geometry.hologram_shape)
        for name in ("holograms", "background"):
            if tuple(getattr(self, name).shape) != expected:
                raise FileFormatError(f"{name} has shape {tuple(getattr(self, name).shape)}, expected {expected}")


def _stamp(handle: h5py.File, kind: str, parameters: dict) -> None:
    handle.attrs["kind"] = kind
    handle.attrs["format_version"] = FORMAT_VERSION
    handle.attrs["sdk_version"] = __version__
    handle.attrs["parameters"] = json.dumps(parameters, sort_keys=True, default=_json_default)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)


@contextlib.contextmanager
def atomic_h5(path: str | os.PathLike) -> Iterator[h5py.File]:
    """Open an HDF5 file for writing that appears under ``path`` only once it is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_parts(folder) -> list[Path]:
    """Delete the temporary ``.NAME.*.part`` files that :func:`atomic_h5` leaves behind when its
    process is killed mid-write; call it when a program that owns ``folder`` starts."""
    removed = []
    for part in Path(folder).glob(".*.part"):
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
            removed.append(part)
    return removed


def _write_volume_datasets(group: h5py.Group, volume: Volume, compression: str | None = "gzip") -> None:
    for name in ("ne", "no", "director"):
        group.create_dataset(name, data=getattr(volume, name), compression=compression)
    if volume.uncertainty is not None:
        group.create_dataset("uncertainty", data=volume.uncertainty, compression=compression)
    if volume.consistency is not None:
        c = volume.consistency
        consistency = group.create_group("consistency")
        consistency.create_dataset("residual", data=c.residual.astype(np.float32))
        for name in ("score", "noise_floor", "time_s"):
            consistency.attrs[name] = float(getattr(c, name))


def write_volume(path, volume: Volume) -> None:
    with atomic_h5(path) as handle:
        _stamp(handle, "volume", volume.parameters)
        handle.attrs["voxel_size_m"] = np.asarray(volume.voxel_size_m)
        handle.attrs["medium_index"] = volume.medium_index
        _write_volume_datasets(handle, volume)


def write_acquisition(path, acquisition: Acquisition) -> None:
    with atomic_h5(path) as handle:
        _stamp(handle, "acquisition", acquisition.parameters)
        for key, value in acquisition.geometry.to_attributes().items():
            handle.attrs[key] = value
        handle.create_dataset("holograms", data=acquisition.holograms, chunks=(1, 1, *acquisition.holograms.shape[2:]),
                              compression="gzip")
        handle.create_dataset("background", data=acquisition.background, chunks=(1, 1, *acquisition.background.shape[2:]),
                              compression="gzip")
        if acquisition.truth is not None:
            truth = handle.create_group("truth")
            truth.attrs["voxel_size_m"] = np.asarray(acquisition.truth.voxel_size_m)
            truth.attrs["medium_index"] = acquisition.truth.medium_index
            _write_volume_datasets(truth, acquisition.truth)


def file_kind(path) -> str:
    with h5py.File(path, "r") as handle:
        return _kind(handle, path)


def _kind(handle: h5py.File, path) -> str:
    kind = handle.attrs.get("kind")
    if isinstance(kind, bytes):
        kind = kind.decode()
    if kind not in KINDS:
        raise FileFormatError(f"{path}: not a biref_sdk file (attribute 'kind' is {kind!r})")
    version = int(handle.attrs.get("format_version", -1))
    if version > FORMAT_VERSION:
        raise FileFormatError(f"{path}: format_version {version} is newer than this SDK reads ({FORMAT_VERSION})")
    return kind


def _open(path, expected: str) -> h5py.File:
    handle = h5py.File(path, "r")
    try:
        kind = _kind(handle, path)
    except BaseException:
        handle.close()
        raise
    if kind != expected:
        handle.close()
        raise FileFormatError(f"{path}: is a {kind} file, expected a {expected} file")
    return handle


def _parameters(handle) -> dict:
    raw = handle.attrs.get("parameters", "{}")
    raw = raw.decode() if isinstance(raw, bytes) else raw
    if not isinstance(raw, str):
        raise FileFormatError(f"{handle.file.filename}: attribute 'parameters' must be a JSON string, "
                              f"got {type(raw).__name__}")
    try:
        parameters = json.loads(raw)
    except ValueError as error:
        raise FileFormatError(f"{handle.file.filename}: attribute 'parameters' is not JSON ({error})") from None
    # readers accept any JSON content (docs/formats.md); a non-object is kept under one key
    return parameters if isinstance(parameters, dict) else {"parameters": parameters}


def checked_dataset(group, name: str, max_bytes: int | None = None) -> h5py.Dataset:
    """``group[name]`` as a real numeric array whose whole content can be read within ``max_bytes``
    (default MAX_ARRAY_BYTES): refuses groups, virtual datasets, complex or non-numeric types and
    chunked datasets with unwritten chunks (a small file that would read as gigabytes of fill)."""
    where = f"{group.file.filename}: {name!r}"
    if name not in group:
        raise FileFormatError(f"{where} is missing")
    dataset = group[name]
    if not isinstance(dataset, h5py.Dataset):
        raise FileFormatError(f"{where} must be a dataset, got a {type(dataset).__name__.lower()}")
    if dataset.is_virtual:
        raise FileFormatError(f"{where} is a virtual dataset; store the data in the file itself")
    if dataset.dtype.kind not in "uif":
        raise FileFormatError(f"{where} has type {dataset.dtype}; expected real integers or floats"
                              + (" (complex holograms are not recorded by a camera)" if dataset.dtype.kind == "c" else ""))
    nbytes = int(np.prod(dataset.shape, dtype=np.int64)) * dataset.dtype.itemsize
    limit = MAX_ARRAY_BYTES if max_bytes is None else max_bytes
    if nbytes > limit:
        raise FileFormatError(f"{where} is {nbytes} bytes, more than the limit of {limit}")
    if dataset.chunks is not None and nbytes:
        expected = int(np.prod([-(-n // c) for n, c in zip(dataset.shape, dataset.chunks)], dtype=np.int64))
        if dataset.id.get_num_chunks() < expected:
            raise FileFormatError(f"{where} has unwritten chunks ({dataset.id.get_num_chunks()} of {expected}); "
                                  "the file is incomplete")
    elif nbytes and dataset.id.get_storage_size() == 0 and dataset.compression is None:
        raise FileFormatError(f"{where} was never written; the file is incomplete")
    return dataset


def read_array(group, name: str, finite: bool = False) -> np.ndarray:
    """Read a :func:`checked_dataset`; ``finite``: refuse NaN or infinite values."""
    array = checked_dataset(group, name)[()]
    if finite and array.dtype.kind == "f" and not np.isfinite(array).all():
        raise FileFormatError(f"{group.file.filename}: {name!r} holds NaN or infinite values")
    return array


def _read_volume_group(group, voxel_size_m, medium_index, parameters=None) -> Volume:
    uncertainty = read_array(group, "uncertainty") if "uncertainty" in group else None
    consistency = None
    if "consistency" in group:
        if not isinstance(group["consistency"], h5py.Group):
            raise FileFormatError(f"{group.file.filename}: 'consistency' must be a group")
        attrs = group["consistency"].attrs
        try:
            consistency = Consistency(residual=read_array(group["consistency"], "residual"),
                                      score=float(attrs["score"]), noise_floor=float(attrs.get("noise_floor", np.nan)),
                                      time_s=float(attrs.get("time_s", 0.0)))
        except (KeyError, TypeError, ValueError) as error:
            raise FileFormatError(f"{group.file.filename}: 'consistency' is malformed ({error})") from None
    return Volume(ne=read_array(group, "ne"), no=read_array(group, "no"), director=read_array(group, "director"),
                  voxel_size_m=voxel_size_m, medium_index=medium_index, parameters=parameters or {},
                  uncertainty=uncertainty, consistency=consistency)


def read_volume(path) -> Volume:
    with _open(path, "volume") as handle:
        return _read_volume_group(handle, handle.attrs["voxel_size_m"], handle.attrs["medium_index"], _parameters(handle))


def read_acquisition(path) -> Acquisition:
    with _open(path, "acquisition") as handle:
        holograms = read_array(handle, "holograms", finite=True)
        if holograms.ndim != 4:
            raise FileFormatError(f"{path}: holograms must be [2, V, H, W], got shape {holograms.shape}")
        geometry = Geometry.from_attributes(handle.attrs, holograms.shape[2:])
        truth = None
        if "truth" in handle:
            truth = _read_volume_group(handle["truth"], geometry.voxel_size_m, geometry.medium_index)
        return Acquisition(holograms=holograms, background=read_array(handle, "background", finite=True),
                           geometry=geometry,
                           truth=truth, parameters=_parameters(handle))


class DatasetWriter:
    """Writes a data set file sample by sample (chunked per sample, compressed), atomically."""

    def __init__(self, path, geometry: Geometry, n_samples: int, background: np.ndarray, parameters: dict,
                 hologram_dtype=np.uint16) -> None:
        self._context = atomic_h5(path)
        self._handle = self._context.__enter__()
        self.n_samples = n_samples
        self._written = np.zeros(n_samples, dtype=bool)
        h = self._handle
        _stamp(h, "dataset", parameters)
        for key, value in geometry.to_attributes().items():
            h.attrs[key] = value
        V, (H, W), (Z, Y, X) = geometry.n_views, geometry.hologram_shape, geometry.volume_shape
        h.create_dataset("background", data=background, compression="gzip")
        h.create_dataset("holograms", shape=(n_samples, 2, V, H, W), dtype=hologram_dtype,
                         chunks=(1, 2, V, H, W), compression="gzip")
        for name in ("ne", "no"):
            h.create_dataset(name, shape=(n_samples, Z, Y, X), dtype=np.float32, chunks=(1, Z, Y, X), compression="gzip")
        h.create_dataset("director", shape=(n_samples, 3, Z, Y, X), dtype=np.float32,
                         chunks=(1, 3, Z, Y, X), compression="gzip")

    def write(self, index: int, holograms: np.ndarray, truth: Volume) -> None:
        h = self._handle
        h["holograms"][index] = holograms
        h["ne"][index] = truth.ne
        h["no"][index] = truth.no
        h["director"][index] = truth.director
        self._written[index] = True

    def close(self) -> None:
        if not self._written.all():
            missing = np.flatnonzero(~self._written)
            self._context.__exit__(RuntimeError, RuntimeError("incomplete"), None)
            raise RuntimeError(f"data set incomplete: samples {missing.tolist()[:10]} were never written")
        self._context.__exit__(None, None, None)

    def abort(self) -> None:
        self._context.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class Dataset:
    """Random access to a data set file; opened lazily so it can cross process boundaries
    (DataLoader workers) without sharing an HDF5 handle."""

    def __init__(self, path) -> None:
        self.path = str(path)
        with _open(self.path, "dataset") as handle:
            self.n_samples = int(checked_dataset(handle, "holograms", max_bytes=np.iinfo(np.int64).max).shape[0])
            self.geometry = Geometry.from_attributes(handle.attrs, handle["holograms"].shape[3:])
            self.background = read_array(handle, "background", finite=True)
            self.parameters = _parameters(handle)
        self._handle: h5py.File | None = None

    def __len__(self) -> int:
        return self.n_samples

    def _h(self) -> h5py.File:
        if self._handle is None:
            self._handle = h5py.File(self.path, "r")
        return self._handle

    def holograms(self, index: int) -> np.ndarray:
        return self._h()["holograms"][index]

    def truth(self, index: int) -> Volume:
        h = self._h()
        return Volume(ne=h["ne"][index], no=h["no"][index], director=h["director"][index],
                      voxel_size_m=self.geometry.voxel_size_m, medium_index=self.geometry.medium_index)

    def acquisition(self, index: int) -> Acquisition:
        return Acquisition(holograms=self.holograms(index), background=self.background, geometry=self.geometry,
                           truth=self.truth(index), parameters={"dataset": self.path, "index": index})

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handle"] = None
        return state

    def __enter__(self) -> "Dataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_geometry(spec, checked: bool = True) -> Geometry:
    """A microscope geometry from a preset name, a JSON geometry file (the attribute names of
    docs/formats.md plus ``hologram_shape`` [H, W]) or any acquisition / data set file (its
    attributes and frame shape). ``checked=False`` skips validation (``biref geometry check``)."""
    from .geometry import PRESETS

    if str(spec) in PRESETS:
        return PRESETS[str(spec)]
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"{spec}: no such geometry file, and not a preset ({', '.join(PRESETS)})")
    if h5py.is_hdf5(path):
        with h5py.File(path, "r") as handle:
            kind = _kind(handle, path)
            if kind == "volume":
                raise FileFormatError(f"{path}: a volume file has no microscope geometry; "
                                      "give an acquisition, a data set or a JSON geometry")
            frames = handle["background"].shape
            return Geometry.from_attributes(handle.attrs, frames[-2:], checked=checked)
    try:
        attrs = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FileFormatError(f"{path}: neither an HDF5 file nor a JSON geometry ({error})") from None
    if not isinstance(attrs, dict) or "hologram_shape" not in attrs:
        raise FileFormatError(f"{path}: a JSON geometry is an object with the attributes of docs/formats.md "
                              "and hologram_shape [H, W]")
    return Geometry.from_attributes(attrs, attrs["hologram_shape"], checked=checked)


def write_geometry(path, geometry: Geometry) -> None:
    """The JSON geometry file that :func:`read_geometry` reads."""
    attrs = {name: np.asarray(value).tolist() if np.ndim(value) else value
             for name, value in geometry.to_attributes().items()}
    attrs["hologram_shape"] = list(geometry.hologram_shape)
    Path(path).write_text(json.dumps(attrs, indent=1) + "\n")
