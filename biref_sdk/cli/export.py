"""biref export: a model file -> fixed-shape ONNX graphs per stage, or TensorRT engines."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a model to ONNX graphs or TensorRT engines",
                              description="Write the network's stages (encode, gru_step, decode, readout) as fixed-shape "
                                          "ONNX graphs (opset >= 17) with a manifest, and with --format tensorrt "
                                          "also TensorRT engines built from them for this GPU.")
    p.add_argument("--model", help="model file (default: the shipped trained_models/biref_small.h5)")
    p.add_argument("--format", default="onnx", choices=("onnx", "tensorrt"), help="onnx (default) or tensorrt")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17, default 17)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16"),
                   help="graph precision: fp32 (default) or fp16 (attention and normalisation fp32; for TensorRT)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..engines.base import require
    from ..network.io import load_model, shipped_model_path

    require("onnx", "export", "onnx")
    if args.format == "tensorrt":  # before anything is written
        require("tensorrt", "tensorrt", "tensorrt")
    from ..engines.export import STAGES, export_onnx

    model = load_model(args.model or shipped_model_path())
    out = export_onnx(model, args.out, opset=args.opset, precision=args.precision)
    for stage in STAGES:
        print(f"{out / (stage + '.onnx')}: {(out / (stage + '.onnx')).stat().st_size / 1e6:.2f} MB")
    if args.format == "tensorrt":
        from ..engines.tensorrt_engine import build_engines

        for path in build_engines(model, out, precision=args.precision):
            print(f"{path}: TensorRT engine")
    print(f"model {model.sha256[:12]} exported to {out}")
    return 0
