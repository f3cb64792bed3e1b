"""The network's stages as fixed-shape ONNX graphs (opset >= 17), one graph per stage.

- ``encode.onnx``: ``window [1, C_in, 1, H, W] -> features [1, C_e, 1, h, w]``
- ``gru_step.onnx``: ``(features x_t, hidden h_{t-1}) -> hidden_next h_t``, one step, no ONNX
  Loop: each step is one engine call (and can be one CUDA graph)
- ``decode.onnx``: ``states [1, S, C_h, 1, h, w]`` -> ``features [1, C_d, Z', Y', X']``: attention
  and the decoder, all its work that does not read the formula prior (it runs as soon as the
  last window's GRU step is done, before the prior exists)
- ``readout.onnx``: ``features`` (and ``prior [1, 7, Z, Y, X]``) -> ``ne, no [1, Z, Y, X]``,
  ``q [1, 5, Z, Y, X]`` (and ``uncertainty [1, 3, Z, Y, X]`` for a model with the uncertainty
  head): the prior's term of the decoder's last convolution and the head; a batch
  of turns is run one item at a time

Shapes come from the model's configuration, so any model file (another size or geometry) exports
the same way. ``manifest.json`` records the model's SHA-256, the shapes, the opset and precision:
the ONNX Runtime and TensorRT engines refuse graphs of another model.
"""
from __future__ import annotations

import io
import json
import logging
import warnings
from copy import deepcopy
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

OPSET = 17
STAGES = ("encode", "gru_step", "decode", "readout")
MANIFEST = "manifest.json"


class _Stage(nn.Module):
    """One stage with fp32 inputs and outputs around a network of ``dtype``: the casts are part
    of the graph, so a strongly typed TensorRT network keeps exactly these precisions."""

    def __init__(self, network, stage: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.network, self.stage, self.dtype = network, stage, dtype

    def forward(self, *inputs):
        if self.stage == "encode":
            return self.network.encode(inputs[0].to(self.dtype)).float()
        if self.stage == "gru_step":  # graph inputs (x_t, h_{t-1}); the network's (hidden, features)
            features, hidden = inputs
            return self.network.gru_step(hidden.to(self.dtype), features.to(self.dtype)).float()
        if self.stage == "decode":
            return self.network.decode(inputs[0].to(self.dtype)).float()
        features, *prior = inputs  # the prior stays fp32: readout casts it to the decoder's dtype
        return tuple(output.float() for output in self.network.readout(features.to(self.dtype), *prior))


PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}


def reduced_precision(network, precision: str):
    """A copy of ``network`` in ``precision`` with attention and normalisation kept fp32 (their
    softmax and statistics lose too much in fp16); the output sigmoids run fp32 (BirefNet.finalize)."""
    from ..network.model import Float32BatchNorm3d

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    copy = deepcopy(network).to(PRECISIONS[precision])
    copy.attention.float()
    for module in copy.modules():
        if isinstance(module, Float32BatchNorm3d):
            module.float()
    return copy.eval()


def stage_signatures(config) -> dict[str, dict]:
    """Per stage: input names -> shapes, output names -> shapes (all float32, batch 1)."""
    c = config
    hidden = (1, c.hidden_channels, *c.latent_shape)
    features = (1, c.decoder_channels[-1], *c.decoded_shape)
    readout_outputs = {"ne": (1, *c.volume_shape), "no": (1, *c.volume_shape), "q": (1, 5, *c.volume_shape)}
    if c.uncertainty_head:
        readout_outputs["uncertainty"] = (1, 3, *c.volume_shape)
    readout_inputs = {"features": features}
    if c.prior_channels:
        readout_inputs["prior"] = (1, c.prior_channels, *c.volume_shape)
    return {
        "encode": {"inputs": {"window": (1, c.input_channels, 1, *c.input_shape)},
                   "outputs": {"features": (1, c.encoder_channels[-1], *c.latent_shape)}},
        "gru_step": {"inputs": {"features": (1, c.encoder_channels[-1], *c.latent_shape), "hidden": hidden},
                     "outputs": {"hidden_next": hidden}},
        "decode": {"inputs": {"states": (1, c.sequence_length, *hidden[1:])}, "outputs": {"features": features}},
        "readout": {"inputs": readout_inputs, "outputs": readout_outputs},
    }


def stage_graph(network, stage: str, opset: int = OPSET, precision: str = "fp32") -> bytes:
    """One stage of ``network`` (a BirefNet on the CPU) as a serialized ONNX model, its inputs and
    outputs fp32 whatever the ``precision`` inside."""
    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    signature = stage_signatures(network.config)[stage]
    examples = tuple(torch.zeros(shape) for shape in signature["inputs"].values())
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # shape checks in the stages are constants for a fixed configuration: tracing them is exact
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        with torch.no_grad():
            module = _Stage(reduced_precision(network, precision), stage, PRECISIONS[precision])
            torch.onnx.export(module, examples, buffer, opset_version=opset, dynamo=False,
                              input_names=list(signature["inputs"]), output_names=list(signature["outputs"]),
                              do_constant_folding=True)
    return buffer.getvalue()


def manifest(model, opset: int = OPSET, precision: str = "fp32") -> dict:
    return {"model_sha256": model.sha256, "opset": opset, "precision": precision,
            "config": model.config.to_dict(),
            "stages": {name: {"file": f"{name}.onnx",
                              **{k: {n: list(s) for n, s in v.items()} for k, v in sig.items()}}
                       for name, sig in stage_signatures(model.config).items()}}


def export_onnx(model, out_dir, opset: int = OPSET, precision: str = "fp32") -> Path:
    """Write the three stage graphs of a loaded model and ``manifest.json`` to ``out_dir``.
    ``precision``: ``fp32`` or ``fp16`` (fp16 weights and activations, attention and
    normalisation fp32: what a strongly typed TensorRT network builds)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    network = model.network.to("cpu").eval()
    for stage in STAGES:
        (out / f"{stage}.onnx").write_bytes(stage_graph(network, stage, opset, precision))
    (out / MANIFEST).write_text(json.dumps(manifest(model, opset, precision), indent=2))
    logger.info("exported %s to %s", ", ".join(STAGES), out)
    return out


def read_manifest(folder, model) -> dict:
    """The manifest of an export folder, checked against ``model`` (never another model's graphs)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not an export folder (no {MANIFEST}); run biref export")
    values = json.loads(path.read_text())
    if values.get("model_sha256") != model.sha256:
        raise ValueError(f"{folder} holds graphs of model {str(values.get('model_sha256'))[:12]}, "
                         f"not of {model.sha256[:12]}: export this model again")
    return values
