"""What every benchmark records next to its numbers: the machine, its load, the code measured.

These machines are shared and noisy, so a number without the load average it was taken under,
or without the commit (and the SDK files that differed from it), cannot be compared later.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def code_version() -> dict | None:
    """The commit measured and the SDK files that differed from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        changed = subprocess.run(["git", "status", "--porcelain", "--", "biref_sdk"], cwd=ROOT, capture_output=True,
                                 text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit.stdout.strip(), "modified_sdk_files": [line[3:] for line in changed.stdout.splitlines()]}


def machine(load_before=None) -> dict:
    """Platform, CPUs, thread settings, torch build and CUDA device, load average."""
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_after": os.getloadavg()}
    if load_before is not None:
        info["load_average_before"] = load_before
    return info


def save_json(path, results: dict, load_before=None) -> Path:
    """Write ``results`` with the machine and code records; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(load_before), "code": code_version(), **results}, indent=2))
    return path


def add_refine_arguments(parser) -> None:
    """The physics refinement's options, as every benchmark that compares it names them."""
    parser.add_argument("--refine-iterations", type=int, default=0, metavar="N",
                        help="also each model refined against the measured fields (at most N steps; 0: off)")
    parser.add_argument("--refine-model", action="append", choices=("voxels", "particles"), metavar="MODEL",
                        help="what the refinement moves: voxels, particles (repeatable; default voxels)")
    parser.add_argument("--refine-shapes", action="store_true",
                        help="the particles model also fits each spheroid's centre, size, axis and aspect")
    parser.add_argument("--refine-configurations", action="store_true",
                        help="with --refine-shapes: spheroid droplets' director as its closed-form configuration")
    parser.add_argument("--refine-restarts", action="store_true",
                        help="with --refine-configurations: droplets' shapes restarted as spheres or prolate "
                             "along their closed form's axis, the fields choosing")
    parser.add_argument("--particle-shape", choices=("spheroid", "voxels"), default="spheroid",
                        help="the particles' shapes (uniform particles, particle refinement; default spheroid)")


def refined_variants(name: str, reconstructor, args) -> dict:
    """``{row name: reconstructor}``: ``reconstructor`` refined with each ``--refine-model``
    (``NAME+refined`` for voxels, ``NAME+refined-MODEL`` otherwise, ``-shapes`` added when the
    particles' shapes are fitted too, ``-configurations`` when the directors' closed forms, ``-restarts`` when
    the droplets' shapes are restarted); empty without
    ``--refine-iterations``."""
    from biref_sdk.reconstruction.refine import PhysicsRefined, RefineOptions

    if not args.refine_iterations:
        return {}
    variants = {}
    for model in args.refine_model or ["voxels"]:
        shapes = args.refine_shapes and model == "particles"
        configurations = shapes and args.refine_configurations
        restarts = configurations and args.refine_restarts
        row = (f"{name}+refined" + ("" if model == "voxels" else f"-{model}") + ("-shapes" if shapes else "")
               + ("-configurations" if configurations else "") + ("-restarts" if restarts else ""))
        variants[row] = PhysicsRefined(reconstructor, RefineOptions(
            max_iterations=args.refine_iterations, model=model, particle_shape=args.particle_shape,
            fit_shapes=shapes, fit_configurations=configurations, restart_shapes=restarts))
    return variants
