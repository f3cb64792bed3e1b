"""biref_sdk: 3D birefringence (n_e, n_o, director) from multiplexed DTT holograms.

The top-level import is light (numpy, h5py); torch-heavy parts load on first use.
"""
from __future__ import annotations

import importlib

from ._version import __version__

# public name -> module that defines it; resolved on first attribute access
_LAZY = {
    "Geometry": "biref_sdk.geometry",
    "preset": "biref_sdk.geometry",
    "PRESETS": "biref_sdk.geometry",
    "Volume": "biref_sdk.files",
    "Acquisition": "biref_sdk.files",
    "Dataset": "biref_sdk.files",
    "read_volume": "biref_sdk.files",
    "write_volume": "biref_sdk.files",
    "read_acquisition": "biref_sdk.files",
    "write_acquisition": "biref_sdk.files",
    "Simulator": "biref_sdk.simulate",
    "SimulationConfig": "biref_sdk.simulate",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'biref_sdk' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
