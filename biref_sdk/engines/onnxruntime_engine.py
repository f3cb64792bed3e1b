"""The exported stage graphs (:mod:`.export`) on ONNX Runtime: the CPU, or the CUDA execution
provider where onnxruntime-gpu has it. Needs the ``onnx`` extra."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .base import Engine, require
from .export import STAGES, read_manifest, stage_graph

logger = logging.getLogger(__name__)


class OnnxRuntimeEngine(Engine):
    """``graphs``: an export folder of this model (``biref export``); None exports in memory.
    ``device``: ``cpu`` or ``cuda`` (None: the CUDA execution provider where present).
    ``threads``: this engine's intra-op threads (None: ONNX Runtime's default). fp32 only: ONNX
    Runtime's CPU kernels have no fp16 3D convolution."""

    name = "onnxruntime"

    def __init__(self, model, device: str | None = None, threads: int | None = None, precision: str = "fp32",
                 graphs=None) -> None:
        super().__init__(model)
        ort = require("onnxruntime", self.name, "onnx")
        if precision != "fp32":
            raise ValueError(f"the onnxruntime engine runs fp32 only, not {precision!r}")
        self.precision = precision
        available = ort.get_available_providers()
        cuda = "CUDAExecutionProvider" in available and device != "cpu"
        if device == "cuda" and not cuda:
            raise ValueError("device cuda requested but ONNX Runtime has no CUDA execution provider here")
        self.providers = (["CUDAExecutionProvider"] if cuda else []) + ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # idle worker threads sleep instead of spinning: between stages the formula prior and the
        # preprocessing (torch) need the same cores (spinning made the prior 1.5x slower, measured)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if graphs is not None:
            read_manifest(graphs, model)
            sources = {stage: str(Path(graphs) / f"{stage}.onnx") for stage in STAGES}
        else:
            network = model.network.to("cpu").eval()
            sources = {stage: stage_graph(network, stage) for stage in STAGES}
        self._sessions = {stage: ort.InferenceSession(source, options, providers=self.providers)
                          for stage, source in sources.items()}

    def describe(self) -> str:
        return f"onnxruntime {self.providers[0].replace('ExecutionProvider', '')} {self.precision}"

    def _run(self, stage: str, **inputs: torch.Tensor) -> list[np.ndarray]:
        feed = {name: np.ascontiguousarray(value.detach().cpu().numpy(), dtype=np.float32)
                for name, value in inputs.items()}
        return self._sessions[stage].run(None, feed)

    def encode(self, window: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._run("encode", window=window)[0])

    def gru_step(self, hidden: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._run("gru_step", features=features, hidden=hidden)[0])

    def decode(self, states: torch.Tensor) -> torch.Tensor:
        # fixed-shape graphs of batch 1: one turn at a time
        return torch.cat([torch.from_numpy(self._run("decode", states=states[i:i + 1])[0])
                          for i in range(states.shape[0])])

    def readout(self, features: torch.Tensor, prior: torch.Tensor | None = None):
        self._check_prior(prior)
        outputs = []
        for item in range(features.shape[0]):
            inputs = {"features": features[item:item + 1]}
            if prior is not None:
                inputs["prior"] = prior[item:item + 1]
            outputs.append(self._run("readout", **inputs))
        return tuple(torch.from_numpy(np.concatenate(parts)) for parts in zip(*outputs))
