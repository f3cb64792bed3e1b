"""The network in PyTorch: the CPU (fp32), or CUDA with fp16/bf16 autocast and CUDA graphs.

On CUDA the per-window stages (encode, GRU step) are tiny kernels whose launch overhead
dominates; each is captured once as a CUDA graph on static buffers and replayed per window.
``decode`` and ``readout`` run eagerly (their batch follows the caller's number of turns). Attention and the
output sigmoids stay fp32 under autocast (softmax and sigmoid are on autocast's fp32 list).
"""
from __future__ import annotations

import contextlib
import logging

import torch

from .base import Engine

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class _CapturedStage:
    """One fixed-shape stage captured as a CUDA graph: copy inputs in, replay, read the output."""

    def __init__(self, function, *examples: torch.Tensor) -> None:
        self.inputs = [e.clone() for e in examples]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up on a side stream, as torch.cuda.graphs requires
                function(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = function(*self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for buffer, value in zip(self.inputs, inputs):
            buffer.copy_(value)
        self.graph.replay()
        return self.output.clone()  # the static output is overwritten by the next replay


class TorchEngine(Engine):
    """``device``: ``cpu`` or ``cuda`` (None: CUDA if available). ``precision``: ``fp32`` anywhere,
    ``fp16``/``bf16`` on CUDA (autocast). ``cuda_graphs``: capture encode and GRU step on CUDA.
    ``threads`` is not applied here: torch's thread count is process-wide, the caller's to set."""

    name = "torch"

    def __init__(self, model, device: str | None = None, threads: int | None = None, precision: str = "fp32",
                 cuda_graphs: bool = True) -> None:
        super().__init__(model)
        if precision not in _DTYPES:
            raise ValueError(f"precision must be one of {', '.join(_DTYPES)}, got {precision!r}")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda requested but CUDA is not available")
        if device.type != "cuda" and precision != "fp32":
            raise ValueError(f"the torch engine runs {precision} on CUDA only; use fp32 on the CPU")
        self._device = device
        self.precision = precision
        self.network = model.network.to(device).eval()
        self._graphs: dict[str, _CapturedStage] = {}
        if device.type == "cuda" and cuda_graphs:
            with torch.no_grad():
                c = self.config
                window = torch.zeros(1, c.input_channels, 1, *c.input_shape, device=device)
                self._graphs["encode"] = _CapturedStage(self._encode, window)
                hidden = super().initial_hidden()
                features = torch.zeros(1, c.encoder_channels[-1], *c.latent_shape, device=device)
                self._graphs["gru_step"] = _CapturedStage(self._gru_step, hidden, features)

    @property
    def device(self) -> torch.device:
        return self._device

    def describe(self) -> str:
        graphs = " + CUDA graphs" if self._graphs else ""
        return f"torch {self._device.type} {self.precision}{graphs}"

    def _autocast(self):
        dtype = _DTYPES[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self._device.type, dtype=dtype)

    def _encode(self, window: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.network.encode(window).float()

    def _gru_step(self, hidden: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.network.gru_step(hidden, features).float()

    @torch.no_grad()
    def encode(self, window: torch.Tensor) -> torch.Tensor:
        window = window.to(self._device, torch.float32)
        return self._graphs["encode"](window) if "encode" in self._graphs else self._encode(window)

    @torch.no_grad()
    def gru_step(self, hidden: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        hidden, features = hidden.to(self._device), features.to(self._device)
        if "gru_step" in self._graphs:
            return self._graphs["gru_step"](hidden, features)
        return self._gru_step(hidden, features)

    @torch.no_grad()
    def decode(self, states: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.network.decode(states.to(self._device)).float()

    @torch.no_grad()
    def readout(self, features: torch.Tensor, prior: torch.Tensor | None = None):
        features = features.to(self._device)
        prior = None if prior is None else prior.to(self._device)
        with self._autocast():
            return tuple(output.float() for output in self.network.readout(features, prior))
