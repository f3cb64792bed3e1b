"""The paper's network (Encoder -> 3D ConvGRU -> attention -> Decoder), its inputs and model files.

Importing this package loads torch; ``import biref_sdk`` alone does not.
"""
from __future__ import annotations

from .config import NetworkConfig, config_for_geometry, window_layout
from .io import GeometryMismatchError, LoadedModel, ModelFileError, check_geometry, load_model, save_model
from .model import BirefNet, q_from_director
from .preprocess import InputPreprocessor, fourier_downsample

__all__ = [
    "BirefNet",
    "GeometryMismatchError",
    "InputPreprocessor",
    "LoadedModel",
    "ModelFileError",
    "NetworkConfig",
    "check_geometry",
    "config_for_geometry",
    "fourier_downsample",
    "load_model",
    "q_from_director",
    "save_model",
    "window_layout",
]
