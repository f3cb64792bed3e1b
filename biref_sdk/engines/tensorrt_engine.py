"""The stage graphs as TensorRT engines (TensorRT 10/11 Python API). Needs the ``tensorrt`` extra
and a CUDA GPU with torch's CUDA build (device buffers are torch CUDA tensors).

Build: each ``<stage>.onnx`` of an export folder is parsed into a strongly typed network
(``NetworkDefinitionCreationFlag.STRONGLY_TYPED``: the graph's own types decide the precision;
TensorRT 11 has no ``BuilderFlag.FP16``), built with a timing cache shared by all stages, and
serialized under an :class:`~.cache.EngineKey` (model SHA-256, GPU, compute capability, SM count,
TensorRT version, precision). A key that differs in anything is another file: rebuilt, never
misused. ``precision="fp16"`` builds from the fp16 graphs (``export.export_onnx(precision=
"fp16")``), whose attention and normalisation are fp32.

Run: named I/O tensors; each stage's inputs and outputs are preallocated torch CUDA tensors
bound once with ``set_tensor_address``; a call copies the inputs in, ``execute_async_v3`` on the
engine's CUDA stream, and returns the outputs (still on the GPU).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .base import Engine, require
from .cache import EngineKey, current_gpu
from .export import STAGES, export_onnx, read_manifest

logger = logging.getLogger(__name__)

WORKSPACE_BYTES = 1 << 30
TIMING_CACHE = "timing.cache"


def _trt():
    return require("tensorrt", "tensorrt", "tensorrt")


def _key(model, stage: str, precision: str) -> EngineKey:
    return EngineKey(model_sha256=model.sha256, tensorrt_version=_trt().__version__, precision=precision,
                     stage=stage, **current_gpu())


def _build(onnx_path: Path, timing_cache_path: Path) -> bytes:
    trt = _trt()
    logger_ = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger_)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger_)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    cache = config.create_timing_cache(timing_cache_path.read_bytes() if timing_cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ValueError(f"TensorRT failed to build an engine from {onnx_path}")
    timing_cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(memoryview(serialized))


def build_engines(model, folder, precision: str = "fp32") -> list[Path]:
    """Engines of every stage of ``model`` in ``folder`` (an export folder; the graphs are
    exported there first if missing), built only where no engine of the same key exists."""
    folder = Path(folder)
    if not (folder / "manifest.json").is_file():
        export_onnx(model, folder, precision=precision)
    manifest = read_manifest(folder, model)
    if manifest.get("precision", "fp32") != precision:
        raise ValueError(f"{folder} holds {manifest.get('precision')} graphs; export {precision} graphs for a "
                         f"{precision} engine")
    paths = []
    for stage in STAGES:
        key = _key(model, stage, precision)
        engine_path, key_path = key.paths(folder)
        if not (engine_path.is_file() and key.matches(key_path)):
            logger.info("building TensorRT engine %s", engine_path.name)
            engine_path.write_bytes(_build(folder / f"{stage}.onnx", folder / TIMING_CACHE))
            key.write(key_path)
        paths.append(engine_path)
    return paths


class _Stage:
    """One deserialized engine with its I/O tensors preallocated on the GPU and bound by name."""

    def __init__(self, runtime, engine_bytes: bytes, device: torch.device) -> None:
        trt = _trt()
        self.engine = runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise ValueError("TensorRT could not deserialize an engine (built by another version?)")
        self.context = self.engine.create_execution_context()
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            shape = tuple(self.engine.get_tensor_shape(name))
            dtype = {trt.float32: torch.float32, trt.float16: torch.float16}[self.engine.get_tensor_dtype(name)]
            tensor = torch.empty(shape, dtype=dtype, device=device)
            mode = self.engine.get_tensor_mode(name)
            (self.inputs if mode == trt.TensorIOMode.INPUT else self.outputs)[name] = tensor
            self.context.set_tensor_address(name, tensor.data_ptr())

    def __call__(self, stream: torch.cuda.Stream, **values: torch.Tensor) -> list[torch.Tensor]:
        stream.wait_stream(torch.cuda.current_stream())  # the inputs were made on the caller's stream
        with torch.cuda.stream(stream):
            for name, value in values.items():
                self.inputs[name].copy_(value, non_blocking=True)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            outputs = [tensor.clone() for tensor in self.outputs.values()]
        stream.synchronize()
        return outputs


class TensorRTEngine(Engine):
    """``engines``: the folder holding this model's graphs and engines (built there when missing
    or stale; default: a per-user cache folder ``~/.cache/biref_sdk/tensorrt/<model sha>``)."""

    name = "tensorrt"

    def __init__(self, model, device: str | None = None, threads: int | None = None, precision: str = "fp32",
                 engines=None) -> None:
        super().__init__(model)
        trt = _trt()
        if device == "cpu" or not torch.cuda.is_available():
            raise ValueError("the tensorrt engine needs a CUDA GPU (and torch's CUDA build)")
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"the tensorrt engine builds fp32 or fp16, not {precision!r}")
        self.precision = precision
        self._device = torch.device("cuda")
        folder = Path(engines) if engines else Path.home() / ".cache" / "biref_sdk" / "tensorrt" / model.sha256[:16]
        paths = build_engines(model, folder / precision, precision)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._stages = {stage: _Stage(runtime, path.read_bytes(), self._device) for stage, path in zip(STAGES, paths)}
        self._stream = torch.cuda.Stream()
        self._gpu = current_gpu()["gpu_name"]

    @property
    def device(self) -> torch.device:
        return self._device

    def describe(self) -> str:
        return f"tensorrt {trt_version()} {self._gpu} {self.precision}"

    def encode(self, window):
        return self._stages["encode"](self._stream, window=window)[0]

    def gru_step(self, hidden, features):
        return self._stages["gru_step"](self._stream, features=features, hidden=hidden)[0]

    def decode(self, states):
        # fixed-shape engines of batch 1: one turn at a time
        return torch.cat([self._stages["decode"](self._stream, states=states[i:i + 1])[0]
                          for i in range(states.shape[0])])

    def readout(self, features, prior=None):
        self._check_prior(prior)
        outputs = []
        for item in range(features.shape[0]):
            values = {"features": features[item:item + 1]}
            if prior is not None:
                values["prior"] = prior[item:item + 1]
            outputs.append(self._stages["readout"](self._stream, **values))
        return tuple(torch.cat(parts).float() for parts in zip(*outputs))


def trt_version() -> str:
    return _trt().__version__
