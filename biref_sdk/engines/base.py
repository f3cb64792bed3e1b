"""The staged engine interface and the choice of engine by name."""
from __future__ import annotations

import importlib
import importlib.util
import logging
from abc import ABC, abstractmethod

logger = logging.getLogger(__name__)

ENGINE_NAMES = ("auto", "torch", "onnxruntime", "tensorrt")
# engine name -> (module, class, the pip extra that installs what it needs)
_ENGINES = {
    "torch": ("biref_sdk.engines.torch_engine", "TorchEngine", None),
    "onnxruntime": ("biref_sdk.engines.onnxruntime_engine", "OnnxRuntimeEngine", "onnx"),
    "tensorrt": ("biref_sdk.engines.tensorrt_engine", "TensorRTEngine", "tensorrt"),
}


class MissingExtraError(ValueError):
    """An engine needs an optional dependency that is not installed (one line names the extra)."""

    def __init__(self, engine: str, package: str, extra: str) -> None:
        super().__init__(f"the {engine} engine needs {package}: pip install 'biref_sdk[{extra}]'")


def require(module: str, engine: str, extra: str):
    """Import ``module`` or raise :class:`MissingExtraError` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(engine, module, extra) from None


class Engine(ABC):
    """The network's stages on one backend. Tensors in and out are torch tensors (float32); an
    engine moves them to and from its own device, so callers may keep them on :attr:`device`
    to avoid copies. Every stage has fixed shapes, fixed by the model's configuration:

    - :meth:`initial_hidden` -> ``[1, C_h, 1, h, w]``
    - :meth:`encode` window ``[1, C_in, 1, H, W]`` -> features ``[1, C_e, 1, h, w]``
    - :meth:`gru_step` ``(hidden, features)`` -> next hidden ``[1, C_h, 1, h, w]``
    - :meth:`decode` hidden states ``[B, S, C_h, 1, h, w]`` -> decoder features
      ``[B, C_d, Z', Y', X']``: all of the decoder's work that does not read the prior
    - :meth:`readout` ``(features, prior)`` (the prior ``[B, 7, Z, Y, X]`` where the
      configuration has one) -> ``ne``, ``no`` ``[B, Z, Y, X]``, ``q`` ``[B, 5, Z, Y, X]`` (and the
      uncertainty ``[B, 3, Z, Y, X]`` where the configuration has its head)
    - :meth:`finalize` ``(states, prior)``: the two in order

    Engines of fixed batch-1 graphs run a batch one item at a time.
    """

    name = "engine"

    def __init__(self, model) -> None:
        self.model = model  # a biref_sdk.network.io.LoadedModel
        self.config = model.config

    @property
    def device(self):
        import torch

        return torch.device("cpu")

    def initial_hidden(self):
        import torch

        return torch.zeros(1, self.config.hidden_channels, *self.config.latent_shape, device=self.device)

    @abstractmethod
    def encode(self, window): ...

    @abstractmethod
    def gru_step(self, hidden, features): ...

    @abstractmethod
    def decode(self, states): ...

    @abstractmethod
    def readout(self, features, prior=None): ...

    def finalize(self, states, prior=None):
        return self.readout(self.decode(states), prior)

    def _check_prior(self, prior) -> None:
        if self.config.prior_channels and prior is None:
            raise ValueError(f"this network needs its {self.config.prior!r} prior")
        if not self.config.prior_channels and prior is not None:
            raise ValueError("this network takes no prior (config.prior is 'none')")

    def describe(self) -> str:
        """One line: engine, device and precision (for logs and benchmark tables)."""
        return self.name


def available_engines() -> tuple[str, ...]:
    """The engines whose dependencies are importable here (not whether a GPU is present)."""
    names = ["torch"]
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
        names.append("onnxruntime")
    if importlib.util.find_spec("tensorrt"):
        names.append("tensorrt")
    return tuple(names)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_engine(name: str = "auto", device: str | None = None) -> str:
    """The concrete engine ``name`` stands for: ``auto`` takes TensorRT (installed, with CUDA),
    then torch on CUDA, then on the CPU ONNX Runtime if installed (measured 3-6x faster than
    torch for the decoder's 3D convolutions on 2 cores, docs/performance.md), else torch."""
    if name not in ENGINE_NAMES:
        raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINE_NAMES)}")
    if name != "auto":
        return name
    cuda = _cuda_available() and device != "cpu"
    available = available_engines()
    if cuda and "tensorrt" in available:
        return "tensorrt"
    if cuda:
        return "torch"
    return "onnxruntime" if "onnxruntime" in available else "torch"


def create_engine(name: str, model, device: str | None = None, threads: int | None = None,
                  precision: str = "fp32", **options) -> Engine:
    """An engine ``name`` (``auto``, ``torch``, ``onnxruntime``, ``tensorrt``) for a loaded model.

    ``device``: ``cpu`` or ``cuda`` (None: CUDA where the engine and the machine have it);
    ``threads``: CPU threads of this engine alone (no process-wide setting changes);
    ``precision``: ``fp32``, ``fp16`` or ``bf16`` (what the engine supports; see each engine).
    """
    resolved = resolve_engine(name, device)
    module, class_name, extra = _ENGINES[resolved]
    if extra is not None:
        require({"onnxruntime": "onnxruntime", "tensorrt": "tensorrt"}[resolved], resolved, extra)
    cls = getattr(importlib.import_module(module), class_name)
    engine = cls(model, device=device, threads=threads, precision=precision, **options)
    logger.info("engine %s (asked for %s)", engine.describe(), name)
    return engine
