"""biref simulate: simulated DTT acquisitions of random droplets or of a user's volume."""
from __future__ import annotations

import argparse

from .geometry import add_geometry_argument


def register(subparsers) -> None:
    p = subparsers.add_parser("simulate", help="simulate holograms of droplets (a data set) or of a volume file",
                              description="Simulate the DTT microscope. Without --sample: a data set file of --n "
                                          "random liquid-crystal droplet samples. With --sample VOL.h5: one "
                                          "acquisition file of that volume.")
    add_geometry_argument(p)
    p.add_argument("--n", type=int, default=1, help="number of random samples (data set mode)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample", help="volume file to image instead of random droplets")
    p.add_argument("--distribution", default="single",
                   help="random samples: single (one LC droplet, the default), broad (the training mixture "
                        "of docs/simulator.md), or one of its categories: single-any-size, multi, isotropic, "
                        "small, large, edge, elongated")
    p.add_argument("--max-droplets", type=int, help="up to this many droplets per field (not with broad)")
    p.add_argument("--configurations", help="comma-separated director configurations to draw from "
                                            "(bipolar,radial,twisted_bipolar,preradial,uniform; not with broad)")
    p.add_argument("--reference-amplitude", type=float, help="reference wave amplitude (illumination = 1)")
    p.add_argument("--electrons-per-unit-intensity", type=float, help="camera photo-electrons per unit intensity")
    p.add_argument("--read-noise-e", type=float, help="camera read noise, electrons RMS")
    p.add_argument("--supersample", type=int, default=3, help="partial-volume sub-samples per voxel edge")
    p.add_argument("--substeps", type=int, default=1, help="thin screens per voxel slice")
    p.add_argument("--no-noise", action="store_true", help="noise-free camera (still quantised)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", required=True, help="output HDF5 file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from ..files import read_geometry, read_volume, write_acquisition
    from ..holography import CameraConfig
    from ..samples import DISTRIBUTIONS, DropletDistribution, distribution_names
    from ..simulate import SimulationConfig, Simulator, simulate_dataset

    geometry = read_geometry(args.geometry)
    if args.distribution not in distribution_names():
        raise SystemExit(f"error: unknown --distribution {args.distribution!r}; one of {', '.join(distribution_names())}")
    distribution = args.distribution
    changes = {}
    if args.max_droplets is not None:
        changes["max_droplets"] = args.max_droplets
    if args.configurations:
        changes["configurations"] = tuple(args.configurations.split(","))
    if changes:
        if distribution == "broad":
            raise SystemExit("error: --max-droplets and --configurations change one category, not the broad mixture")
        distribution = dataclasses.replace(DISTRIBUTIONS[distribution], **changes)
    elif distribution == "single":
        distribution = DropletDistribution()  # the original distribution, recorded field by field
    camera = {name: getattr(args, name) for name in ("reference_amplitude", "electrons_per_unit_intensity",
                                                     "read_noise_e") if getattr(args, name) is not None}
    config = SimulationConfig(supersample=args.supersample, substeps=args.substeps,
                              camera=CameraConfig(noise=not args.no_noise, **camera), droplets=distribution)
    if args.sample:
        simulator = Simulator(geometry, config, args.device)
        acquisition = simulator.acquire(read_volume(args.sample), seed=args.seed)
        acquisition.parameters["sample_file"] = str(args.sample)
        acquisition.parameters["geometry"] = str(args.geometry)
        write_acquisition(args.out, acquisition)
        print(f"wrote acquisition {args.out}: holograms {acquisition.holograms.shape}")
    else:
        simulate_dataset(args.out, geometry, args.n, args.seed, config, args.device)
        print(f"wrote data set {args.out}: {args.n} samples, geometry {args.geometry}")
    return 0
