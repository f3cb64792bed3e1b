"""Model files: weights, network configuration, the acquisition geometry and a SHA-256 checksum.

A model file is HDF5 (no pickle, so loading a file runs no code from it):

| item | meaning |
|---|---|
| attr `kind` | `"model"` |
| attr `format_version` | 5 (this SDK reads 1 to 5) |
| attr `sdk_version` | the biref_sdk version that wrote it |
| attr `config` | JSON of :class:`~biref_sdk.network.config.NetworkConfig` |
| attr `geometry` | JSON of the geometry attributes of docs/formats.md plus `hologram_shape` |
| attr `metadata` | JSON: training recipe, metrics, anything else (readers accept any content) |
| attr `sha256` | hex digest over config, geometry and every weight (name, dtype, shape, bytes) |
| `weights/<name>` | one data set per entry of the PyTorch state dict |

Format 2 adds the configuration keys `prior` and `prior_options` (the formula prior, see
:class:`~biref_sdk.network.config.NetworkConfig`); a format 1 file has neither and reads as
`prior = "none"`. Readers of format 1 refuse format 2 files by their version, with a clear error.
Format 3 adds the key `quarter_turns` (whether the model reconstructs by default as the mean over
four quarter turns, or in one pass: a distilled model); format 1 and 2 files read as `true`.
Format 4 adds the `prior_options` keys `late_views` and `late_iterations` (the formula's streaming
warm start, :class:`~biref_sdk.reconstruction.formula.FormulaOptions`); files without them read
as `late_views = 0` (every constraint iteration after the last view).
Format 5 adds the configuration key `isotropy_gate` (a gate that scales n_e − n_o by the
network's own order parameter, with its weights `isotropy.*`); files without it read as `false`.

Loading recomputes the digest and refuses a file whose digest differs (a corrupt or edited
file), and refuses an acquisition geometry other than the one the model was trained for.
Nothing is ever downloaded.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from .._version import __version__
from ..files import atomic_h5
from ..geometry import Geometry
from .config import NetworkConfig
from .model import BirefNet

MODEL_FORMAT_VERSION = 5
READABLE_FORMAT_VERSIONS = (1, 2, 3, 4, 5)


# trained_models/ of the source tree (a checkout or an editable install; wheels do not carry it)
SHIPPED_MODELS_DIR = Path(__file__).resolve().parents[2] / "trained_models"


def shipped_model_path(name: str = "biref_small") -> Path:
    """The model file ``trained_models/<name>.h5`` shipped with the SDK's source tree."""
    path = SHIPPED_MODELS_DIR / f"{name}.h5"
    if not path.is_file():
        raise FileNotFoundError(f"no shipped model {name!r} at {path} (installed without trained_models/?): "
                                "give a model file (--model PATH)")
    return path


class ModelFileError(ValueError):
    """A model file is missing pieces, corrupt (checksum mismatch) or of an unknown version."""


class GeometryMismatchError(ValueError):
    """An acquisition's geometry differs from the one a model was trained for."""


@dataclass
class LoadedModel:
    network: BirefNet
    config: NetworkConfig
    geometry: Geometry
    metadata: dict = field(default_factory=dict)
    path: str | None = None
    sha256: str = ""


def _geometry_dict(geometry: Geometry) -> dict:
    values = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in geometry.to_attributes().items()}
    values["hologram_shape"] = list(geometry.hologram_shape)
    return values


def _geometry_from_dict(values: dict) -> Geometry:
    values = dict(values)
    return Geometry.from_attributes(values, values.pop("hologram_shape"))


def geometry_differences(expected: Geometry, actual: Geometry, rtol: float = 1e-9) -> list[str]:
    """Names (with values) of the geometry parameters that differ; empty if they agree."""
    differences = []
    for name in ("hologram_shape", "volume_shape", "n_views"):
        a, b = getattr(expected, name), getattr(actual, name)
        if a != b:
            differences.append(f"{name} {b} (model: {a})")
    if not differences:
        for name in ("wavelength_m", "medium_index", "na_objective", "pixel_size_m", "illumination_sines",
                     "reference_carriers", "voxel_size_m"):
            a, b = np.asarray(getattr(expected, name), float), np.asarray(getattr(actual, name), float)
            if not np.allclose(a, b, rtol=rtol, atol=1e-12):
                differences.append(f"{name} {b.tolist()} (model: {a.tolist()})"[:200])
    return differences


def check_geometry(model_geometry: Geometry, geometry: Geometry) -> None:
    differences = geometry_differences(model_geometry, geometry)
    if differences:
        raise GeometryMismatchError("the acquisition geometry differs from the one the model was trained for: "
                                    + "; ".join(differences))


def _digest(config_json: str, geometry_json: str, weights: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    h.update(config_json.encode())
    h.update(b"\0")
    h.update(geometry_json.encode())
    for name in sorted(weights):
        array = np.ascontiguousarray(weights[name])
        h.update(f"\0{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def save_model(path, network: BirefNet, geometry: Geometry, metadata: dict | None = None) -> str:
    """Write ``network`` (its weights and configuration) for ``geometry``; returns the checksum."""
    config = network.config
    if config.n_views != geometry.n_views or config.hologram_shape != geometry.hologram_shape \
            or config.volume_shape != geometry.volume_shape:
        raise GeometryMismatchError("the network's configuration does not match the geometry it is saved with")
    module = network.module if hasattr(network, "module") else network  # unwrap DDP
    weights = {name: value.detach().cpu().numpy() for name, value in module.state_dict().items()}
    config_json = json.dumps(config.to_dict(), sort_keys=True)
    geometry_json = json.dumps(_geometry_dict(geometry), sort_keys=True)
    digest = _digest(config_json, geometry_json, weights)
    with atomic_h5(path) as handle:
        handle.attrs["kind"] = "model"
        handle.attrs["format_version"] = MODEL_FORMAT_VERSION
        handle.attrs["sdk_version"] = __version__
        handle.attrs["config"] = config_json
        handle.attrs["geometry"] = geometry_json
        handle.attrs["metadata"] = json.dumps(metadata or {}, sort_keys=True, default=str)
        handle.attrs["sha256"] = digest
        group = handle.create_group("weights")
        for name, array in weights.items():
            group.create_dataset(name, data=array)
    return digest


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def load_model(path, geometry: Geometry | None = None, device="cpu") -> LoadedModel:
    """Read a model file, verify its checksum (and, if given, that ``geometry`` is the one it was
    trained for) and return the network in evaluation mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {str(path)!r} does not exist")
    try:
        with h5py.File(path, "r") as handle:
            if _text(handle.attrs.get("kind", "")) != "model":
                raise ModelFileError(f"{path}: not a biref_sdk model file (attribute 'kind' is not 'model')")
            version = int(handle.attrs.get("format_version", -1))
            if version not in READABLE_FORMAT_VERSIONS:
                raise ModelFileError(f"{path}: model format_version {version}, this SDK reads "
                                     f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}")
            for name in ("config", "geometry", "sha256"):
                if name not in handle.attrs:
                    raise ModelFileError(f"{path}: attribute {name!r} is missing")
            config_json, geometry_json = _text(handle.attrs["config"]), _text(handle.attrs["geometry"])
            stored = _text(handle.attrs["sha256"])
            metadata = json.loads(_text(handle.attrs.get("metadata", "{}")))
            if "weights" not in handle:
                raise ModelFileError(f"{path}: the weights group is missing")
            weights = {name: handle["weights"][name][()] for name in handle["weights"]}
    except ModelFileError:
        raise
    except (OSError, KeyError, ValueError) as error:
        raise ModelFileError(f"{path}: unreadable or corrupt model file ({error})") from error
    digest = _digest(config_json, geometry_json, weights)
    if digest != stored:
        raise ModelFileError(f"{path}: checksum mismatch (stored {stored[:12]}..., computed {digest[:12]}...): "
                             "the file is corrupt or was modified")
    config = NetworkConfig.from_dict(json.loads(config_json))
    model_geometry = _geometry_from_dict(json.loads(geometry_json))
    if geometry is not None:
        check_geometry(model_geometry, geometry)
    network = BirefNet(config)
    state = {name: torch.from_numpy(np.array(array)) for name, array in weights.items()}
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ModelFileError(f"{path}: weights do not fit the configuration ({error})"[:500]) from error
    network.to(device).eval()
    return LoadedModel(network=network, config=config, geometry=model_geometry, metadata=metadata,
                       path=os.fspath(path), sha256=digest)
