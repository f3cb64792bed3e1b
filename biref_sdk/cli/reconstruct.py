"""biref reconstruct: one acquisition file -> one volume file (n_e, n_o, director)."""
from __future__ import annotations

import argparse


def parse_options(items: list[str] | None, methods: list[str]) -> dict[str, dict]:
    """``METHOD.KEY=VALUE`` (or ``KEY=VALUE`` when one method is given) -> {method: {key: value}}.
    Values are Python literals (numbers, tuples, None, True) or else plain strings."""
    import ast

    options: dict[str, dict] = {m: {} for m in methods}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {item!r}: expected KEY=VALUE or METHOD.KEY=VALUE")
        method, dot, name = key.rpartition(".")
        if not dot:
            if len(methods) != 1:
                raise ValueError(f"--option {item!r}: name the method (METHOD.{key}=...) when several are given")
            method, name = methods[0], key
        if method not in options:
            raise ValueError(f"--option {item!r}: method {method!r} is not among --method {', '.join(methods)}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        options[method][name] = value
    return options


def add_engine_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", default="auto", choices=("auto", "torch", "onnxruntime", "tensorrt"),
                   help="inference engine of --method model: auto (TensorRT, then torch on CUDA, then the "
                        "fastest CPU engine), torch, onnxruntime (extra onnx) or tensorrt (extra tensorrt)")


def consistency_views(text: str):
    """``--consistency-views``: a number of views (0: off) or ``all``."""
    if text == "all":
        return text
    try:
        views = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of views or 'all', got {text!r}") from None
    if views < 0:
        raise argparse.ArgumentTypeError("the number of views must be >= 0")
    return views


def add_method_arguments(p: argparse.ArgumentParser, multiple: bool, default: str = "formula",
                         consistency_default: int = 5, refine: bool = True) -> None:
    if multiple:
        p.add_argument("--method", action="append", dest="methods", metavar="METHOD",
                       help="reconstruction method, repeatable to compare several side by side: formula, model "
                            "(default formula)")
    else:
        p.add_argument("--method", default=default, help=f"reconstruction method: formula or model (default {default})")
    p.add_argument("--model", help="model file for --method model (default: the shipped trained_models/biref_small.h5)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    add_engine_argument(p)
    p.add_argument("--consistency-views", type=consistency_views, default=consistency_default, metavar="N|all",
                   help="re-simulate each volume at N views (the axial one and N-1 around the ring) or all, and "
                        "report how well it explains the measured fields (docs/reconstruction.md, Trust); 0: off "
                        f"(default {consistency_default})")
    if refine:
        p.add_argument("--refine-iterations", type=int, default=0, metavar="N",
                       help="refine each volume against the measured fields with the forward model, at most N "
                            "L-BFGS steps, stopping at the camera noise (docs/reconstruction.md, Physics "
                            "refinement; about a minute on two CPU cores); 0: off (default)")
        p.add_argument("--refine-model", choices=("voxels", "particles"), default="voxels",
                       help="what the refinement moves: every voxel's indices and director (voxels, default), or "
                            "particles of one material each, their levels and the director (particles)")
        p.add_argument("--refine-shapes", action="store_true",
                       help="with --refine-model particles: fit each spheroid's centre and size (and axis "
                            "and aspect) to the fields too, and the other particles' occupancy (smoothed)")
        p.add_argument("--refine-configurations", action="store_true",
                       help="with --refine-shapes: set each spheroid droplet's director to the closed-form "
                            "nematic configuration (bipolar, radial, ...) that fits it, where one does, then "
                            "refit the levels and shapes to it (docs/reconstruction.md, Director configurations)")
        p.add_argument("--refine-restarts", action="store_true",
                       help="with --refine-configurations: first restart the droplets' spheroids as spheres and "
                            "as prolate along their closed form's axis; the fields choose (docs/reconstruction.md)")
    p.add_argument("--uniform-particles", action="store_true",
                   help="rebuild each volume as particles of one material each: one (n_e, n_o) per particle, "
                        "its shape from the volume (docs/reconstruction.md, Uniform particles); for droplets "
                        "and beads of one material, not for cells")
    p.add_argument("--particle-shape", choices=("spheroid", "voxels"), default="spheroid",
                   help="the shapes of --uniform-particles and --refine-model particles: each particle the "
                        "spheroid of its moments where that fits it (spheroid, default), or its occupancy as "
                        "read off the volume (voxels)")
    p.add_argument("--option", action="append", metavar="[METHOD.]KEY=VALUE",
                   help="a method option, e.g. formula.constraint_iterations=10 or "
                        "formula.index_bounds=(1.54,1.57); repeatable (docs/reconstruction.md)")


def build_reconstructors(methods: list[str], args: argparse.Namespace) -> dict:
    from ..reconstruction import get_reconstructor

    options = parse_options(args.option, methods)
    if args.model and "model" not in methods:
        raise ValueError("--model applies only to --method model")
    refine_iterations = getattr(args, "refine_iterations", 0)   # serve does not offer it
    if refine_iterations < 0:
        raise ValueError("--refine-iterations must be >= 0")
    built = {}
    for method in methods:
        kwargs = dict(options[method])
        threads = kwargs.pop("threads", None)
        if threads:   # process-wide: the program sets it, the library never does
            import torch

            torch.set_num_threads(int(threads))
            if method == "model":
                kwargs["threads"] = threads   # an ONNX Runtime engine's own threads too
        kwargs.setdefault("device", args.device)
        if method == "model" and args.model:
            kwargs.setdefault("model", args.model)
        if method == "model":
            kwargs.setdefault("engine", args.engine)
        built[method] = get_reconstructor(method, **kwargs)
        if refine_iterations:  # inside the check, which then scores the refined volume
            from ..reconstruction.refine import PhysicsRefined, RefineOptions

            built[method] = PhysicsRefined(built[method], RefineOptions(max_iterations=refine_iterations,
                                                                        model=args.refine_model,
                                                                        particle_shape=args.particle_shape,
                                                                        fit_shapes=args.refine_shapes,
                                                                        fit_configurations=args.refine_configurations,
                                                                        restart_shapes=args.refine_restarts),
                                           device=args.device)
        if args.uniform_particles:  # after the refinement, before the check that scores what is published
            from ..reconstruction.particles import UniformParticles

            built[method] = UniformParticles(built[method], shape=args.particle_shape)
        if args.consistency_views:
            from ..reconstruction.consistency import ConsistencyChecked

            built[method] = ConsistencyChecked(built[method], args.consistency_views, device=args.device)
    return built


def register(subparsers) -> None:
    p = subparsers.add_parser("reconstruct", help="reconstruct an acquisition file into a volume file",
                              description="Reconstruct n_e, n_o and the director from an acquisition file "
                                          "(docs/formats.md), using the file's own geometry. Prints the paper's "
                                          "metrics when the file carries a simulated truth.")
    p.add_argument("acquisition", help="acquisition HDF5 file")
    add_method_arguments(p, multiple=False)
    p.add_argument("--out", required=True, help="output volume HDF5 file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import time

    from ..files import read_acquisition, write_volume
    from ..metrics import compare_volumes

    reconstructor = build_reconstructors([args.method], args)[args.method]
    acquisition = read_acquisition(args.acquisition)
    start = time.perf_counter()
    volume = reconstructor.reconstruct(acquisition)
    seconds = time.perf_counter() - start
    volume.parameters = {**volume.parameters, "method": args.method, "source": str(args.acquisition),
                         "seconds": round(seconds, 4)}
    write_volume(args.out, volume)
    summary = {"out": str(args.out), "method": args.method, "shape": list(volume.shape), "seconds": seconds}
    if volume.consistency is not None:
        summary["consistency"] = {k: v for k, v in volume.consistency.to_dict().items() if k != "residual"}
    if "refinement" in volume.parameters:
        summary["refinement"] = {k: v for k, v in volume.parameters["refinement"].items() if k != "options"}
    if acquisition.truth is not None:
        summary["metrics"] = compare_volumes(acquisition.truth, volume)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(f"wrote volume {args.out}: {volume.shape} in {seconds:.2f} s ({args.method})")
        for key, value in summary.get("metrics", {}).items():
            print(f"  {key:20s} {value:.4f}")
        if volume.consistency is not None:
            c = volume.consistency
            print(f"  consistency          {c.score:.4f} (noise floor {c.noise_floor:.4f}, {c.views_checked} views)")
        if "refinement" in summary:
            r = summary["refinement"]
            print(f"  refinement           residual^2 {r['residual_squared'][0]:.4f} -> {r['residual_squared'][-1]:.4f} "
                  f"(noise {r['noise_squared']:.4f}) in {r['steps']} steps, {r['seconds']:.1f} s, stopped: {r['stopped']}")
    return 0
