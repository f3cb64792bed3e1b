"""biref microscope-sim: a simulated microscope streaming acquisitions to `biref serve`."""
from __future__ import annotations

import argparse
from pathlib import Path

from .geometry import add_geometry_argument


def register(subparsers) -> None:
    from ..streaming import DEFAULT_INGEST

    p = subparsers.add_parser("microscope-sim", help="stream simulated acquisitions to a biref service",
                              description="Simulate random droplet samples and stream each acquisition (start with "
                                          "background, 2 x V views, stop) to a service's ingest socket.")
    add_geometry_argument(p)
    p.add_argument("--n", type=int, default=1, help="number of acquisitions (default 1)")
    p.add_argument("--rate", type=float, default=None, help="views per second (default: as fast as the service takes them)")
    p.add_argument("--connect", default=DEFAULT_INGEST, help=f"the service's ingest endpoint (default {DEFAULT_INGEST})")
    p.add_argument("--seed", type=int, default=0, help="acquisition i depends only on (seed, i)")
    p.add_argument("--background", choices=("inline", "messages"), default="inline",
                   help="send the background inside start (default) or as per-view background messages")
    p.add_argument("--timeout", type=float, default=60.0, help="give up when the service takes no message for this long")
    p.add_argument("--curve-secret-key", type=Path, help="CURVE: this client's .key_secret file")
    p.add_argument("--curve-server-key", type=Path, help="CURVE: the server's public .key file")
    p.set_defaults(func=run)


def curve_client(args):
    from ..streaming.security import CurveClient

    if (args.curve_secret_key is None) != (args.curve_server_key is None):
        raise ValueError("CURVE needs both --curve-secret-key and --curve-server-key")
    return None if args.curve_secret_key is None else CurveClient(args.curve_secret_key, args.curve_server_key)


def run(args: argparse.Namespace) -> int:
    from ..streaming.client import Producer
    from ..files import read_geometry
    from ..streaming.microscope import SimulatedMicroscope

    if args.n < 1:
        raise ValueError("--n must be >= 1")
    if args.rate is not None and args.rate <= 0:
        raise ValueError("--rate must be positive")
    microscope = SimulatedMicroscope(read_geometry(args.geometry), seed=args.seed)

    def report(timing):
        seconds = timing["last_view_sent_s"] - timing["first_view_sent_s"]
        print(f"sent {timing['acquisition_id']}: {timing['views']} views in {seconds:.2f} s", flush=True)

    with Producer(args.connect, timeout_s=args.timeout, curve=curve_client(args)) as producer:
        try:
            microscope.stream(producer, args.n, args.rate, args.background, on_sent=report)
        except TimeoutError as error:
            raise OSError(str(error)) from None
    return 0
