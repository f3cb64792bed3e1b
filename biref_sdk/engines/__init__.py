"""Inference engines for the paper's network, behind one staged interface (:class:`Engine`).

The streaming session (:mod:`biref_sdk.reconstruction.model`) drives the network stage by stage:
an initial hidden state, one encoder pass per window, one ConvGRU step per window, ``decode``
(attention and the decoder, as soon as the last window's step is done) and after the last view
``readout`` (the formula prior's term and the head). Each engine runs those
stages its own way, one module each:

- ``"torch"`` (:mod:`.torch_engine`): PyTorch on the CPU or CUDA (fp16/bf16 and CUDA graphs there);
- ``"onnxruntime"`` (:mod:`.onnxruntime_engine`): the exported ONNX graphs (:mod:`.export`) on
  ONNX Runtime's CPU or CUDA execution provider (extra ``onnx``);
- ``"tensorrt"`` (:mod:`.tensorrt_engine`): TensorRT engines built from the same graphs, cached
  (:mod:`.cache`) per model, GPU and TensorRT version (extra ``tensorrt``).

:func:`create_engine` picks one by name; ``"auto"`` takes TensorRT, then torch on CUDA, then the
fastest CPU engine. Importing this package loads nothing heavy.
"""
from __future__ import annotations

from .base import ENGINE_NAMES, Engine, MissingExtraError, available_engines, create_engine

__all__ = ["ENGINE_NAMES", "Engine", "MissingExtraError", "available_engines", "create_engine"]
