"""biref train: train the paper's network on a data set file (offline; resumable; torchrun for DDP)."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train the network on a data set file",
        description="Train the paper's network (Encoder -> 3D ConvGRU -> attention -> Decoder) on a data set "
                    "file, validating each epoch. Writes OUT/checkpoint.pt, OUT/best.h5, OUT/last.h5, "
                    "OUT/history.json and OUT/loss_curve.png. Several GPUs or processes: "
                    "torchrun --nproc_per_node N -m biref_sdk train ...")
    p.add_argument("--data", required=True, action="append",
                   help="training data set file (HDF5, biref simulate); repeat it for several files of one geometry")
    p.add_argument("--val", required=True, help="validation data set file, same geometry")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--geometry", metavar="PRESET|FILE",
                   help="the microscope the model is for (preset, JSON geometry or acquisition file): refuse data "
                        "of any other geometry (the model records the data's geometry and serves only it)")
    p.add_argument("--epochs", type=int, default=50, help="total epochs (default 50, the paper's)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    p.add_argument("--schedule", default="constant", choices=("constant", "cosine"),
                   help="learning-rate schedule: constant (the paper) or cosine decay to 1%% over --epochs")
    p.add_argument("--batch-size", type=int, default=2, help="samples per step and process (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--init", metavar="MODEL.h5", help="start a new run from this model file's weights and network "
                                                      "configuration (fine-tune; continue a shipped model)")
    p.add_argument("--width", default="small", choices=("tiny", "small", "paper"), help="channel widths")
    p.add_argument("--normalization", default="batch", choices=("batch", "none"),
                   help="batch: BatchNorm3d in every block (the paper); none: no normalisation layers")
    p.add_argument("--window-length", type=int, default=3, help="views averaged into one sequence step")
    p.add_argument("--input-mode", default="field", choices=("field", "hologram"),
                   help="field: demodulated, background-normalised fields; hologram: frames / background mean")
    p.add_argument("--prior", choices=("none", "formula"),
                   help="none: the paper's network; formula: the formula reconstruction of the same views "
                        "is a second input of the decoder's last block (with --init from a network without "
                        "it, its new weights start at zero). Default: the --init model's, else none")
    p.add_argument("--cache-dir", "--prior-cache", dest="cache_dir", metavar="DIR",
                   help="keep the preprocessed inputs and formula priors on disk in DIR instead of memory (shared "
                        "by torchrun processes and later runs; memory stays bounded). --prior-cache: the old name")
    p.add_argument("--augment", default="none", choices=("none", "quarter-turns"),
                   help="quarter-turns: turn each training sample by a random number of quarter turns about the "
                        "optical axis (inputs, truth and prior; an exact symmetry of the ring illumination)")
    p.add_argument("--q-weight", type=float, default=0.1, help="weight of the Q-tensor (director) loss")
    p.add_argument("--q-loss", default="volume", choices=("volume", "birefringent"),
                   help="average the Q-tensor MSE over every voxel or only over birefringent ones")
    p.add_argument("--isotropy-weight", type=float, default=0.0,
                   help="weight of the birefringence (n_e - n_o) reported where the truth is isotropic, its mean "
                        "square next to the index MSEs (default 0)")
    p.add_argument("--limit", type=int, help="use only the first N samples of each training file")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--threads", type=int, help="torch CPU threads per process")
    p.add_argument("--no-cache", action="store_true", help="do not keep preprocessed inputs in memory")
    p.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..files import Dataset, read_geometry
    from ..training import TrainConfig, train

    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0:
        raise ValueError("--lr must be positive")
    if args.geometry:
        wanted = read_geometry(args.geometry)
        for path in (*args.data, args.val):
            if Dataset(path).geometry != wanted:
                raise ValueError(f"{path} was simulated for another geometry than {args.geometry}; make the data "
                                 f"with: biref simulate --geometry {args.geometry} --n N --out FILE")
    config = TrainConfig(epochs=args.epochs, learning_rate=args.lr, schedule=args.schedule, batch_size=args.batch_size, seed=args.seed,
                         q_weight=args.q_weight, q_loss=args.q_loss,
                         isotropy_weight=args.isotropy_weight, width=args.width, normalization=args.normalization,
                         window_length=args.window_length,
                         input_mode=args.input_mode, prior=args.prior, cache_dir=args.cache_dir, augment=args.augment,
                         num_workers=args.workers, cache=not args.no_cache,
                         amp=not args.no_amp, limit=args.limit, threads=args.threads)
    history = train(args.data, args.val, args.out, config, resume=args.resume, device=args.device,
                    progress=not args.no_progress, init=args.init)
    if history:
        last = history[-1]["val"]
        print(f"done: epoch {history[-1]['epoch']}, val PSNR ne {last['psnr_ne']:.2f} dB / no "
              f"{last['psnr_no']:.2f} dB; model files in {args.out}")
    return 0
