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
    p.add_argument("--max-droplets", type=int, default=1, help="up to this many droplets per field (default 1)")
    p.add_argument("--configurations", help="comma-separated director configurations to draw from "
                                            "(bipolar,radial,twisted_bipolar,preradial,uniform)")
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
    from ..samples import DropletDistribution
    from ..simulate import SimulationConfig, Simulator, simulate_dataset

    geometry = read_geometry(args.geometry)
    distribution = DropletDistribution(max_droplets=args.max_droplets)
    if args.configurations:
        distribution = dataclasses.replace(distribution, configurations=tuple(args.configurations.split(",")))
    config = SimulationConfig(supersample=args.supersample, substeps=args.substeps,
                              camera=CameraConfig(noise=not args.no_noise), droplets=distribution)
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
