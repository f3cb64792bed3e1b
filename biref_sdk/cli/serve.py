"""biref serve: the streaming service (docs/protocol.md) on ZeroMQ sockets."""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    from .reconstruct import add_method_arguments

    # the network is the product's main job: the shipped model unless --method formula; the
    # consistency check is opt-in here, as it adds its time to every volume's latency
    add_method_arguments(p, multiple=False, default="model", consistency_default=0, refine=False)


def make_reconstructor(args: argparse.Namespace):
    from .reconstruct import build_reconstructors

    return build_reconstructors([args.method], args)[args.method]


def add_curve_server_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--curve-secret-key", type=Path, help="CURVE: this server's .key_secret file "
                   "(enables authentication and encryption on both sockets)")
    p.add_argument("--curve-authorized-keys", type=Path, help="CURVE: folder of client public .key files "
                   "allowed in (default: any CURVE client)")


def curve_server(args):
    from ..streaming.security import CurveServer

    if args.curve_secret_key is None:
        if args.curve_authorized_keys is not None:
            raise ValueError("--curve-authorized-keys needs --curve-secret-key")
        return None
    return CurveServer(args.curve_secret_key, args.curve_authorized_keys)


def register(subparsers) -> None:
    from ..streaming import DEFAULT_INGEST, DEFAULT_RESULTS

    p = subparsers.add_parser("serve", help="reconstruct acquisitions streamed over ZeroMQ",
                              description="Receive views on a PULL socket, reconstruct each acquisition as its views "
                                          "arrive, publish volumes, errors and status on a PUB socket "
                                          "(docs/protocol.md). Stops on Ctrl-C / SIGTERM.")
    add_engine_arguments(p)
    p.add_argument("--ingest", default=DEFAULT_INGEST, help=f"PULL endpoint to bind (default {DEFAULT_INGEST}; "
                   "port 0 picks a free one)")
    p.add_argument("--results", default=DEFAULT_RESULTS, help=f"PUB endpoint to bind (default {DEFAULT_RESULTS})")
    p.add_argument("--save-dir", type=Path, help="also write each volume to DIR/<acquisition_id>.h5")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds without a message before an acquisition "
                   "is dropped (default 30)")
    p.add_argument("--partial-on-timeout", action="store_true",
                   help="on timeout publish a volume from the views present, flagged incomplete, instead of an error")
    p.add_argument("--max-in-flight", type=int, default=8, help="acquisitions reconstructed at once (default 8)")
    p.add_argument("--queue-mb", type=float, default=256, help="memory for received, unprocessed frames (default 256)")
    p.add_argument("--memory-mb", type=float, default=2048,
                   help="memory budget of the service, queue included (default 2048): an acquisition starts only if "
                        "its footprint fits in what the others leave (docs/protocol.md, Admission)")
    p.add_argument("--workers", type=int, help="reconstruction threads: acquisitions reconstructed side by side "
                                            "(default: the CPU cores, at most --max-in-flight; docs/protocol.md)")
    p.add_argument("--status-interval", type=float, default=1.0, help="seconds between status heartbeats")
    p.add_argument("--preview-every", type=int, default=0, help="publish a preview volume every N views (0: off)")
    add_curve_server_arguments(p)
    p.add_argument("--quiet", action="store_true", help="do not print a line per volume and error")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging

    from . import _logging
    from ..streaming.protocol import Limits
    from ..streaming.server import StreamingServer
    from ..streaming.service import ServiceConfig

    limits = Limits()
    queue_bytes = int(args.queue_mb * 1024 * 1024)
    if queue_bytes < limits.max_frame_bytes:
        limits = Limits(max_frame_bytes=queue_bytes)
    config = ServiceConfig(acquisition_timeout_s=args.timeout, partial_on_timeout=args.partial_on_timeout,
                           max_in_flight=args.max_in_flight, queue_bytes=queue_bytes,
                           status_interval_s=args.status_interval, preview_every=args.preview_every, limits=limits,
                           memory_bytes=int(args.memory_mb * 1024 * 1024), workers=args.workers)
    curve = curve_server(args)
    reconstructor = make_reconstructor(args)
    # per-volume and per-error lines go through non-blocking handlers: an unread pipe drops lines,
    # it never stalls the publisher thread that calls on_volume/on_error
    handlers = _logging.configure(sys.stderr, sys.stdout)
    output = logging.getLogger("biref.serve")

    def on_volume(result):
        if not args.quiet:
            flag = "" if result.complete else f" INCOMPLETE ({result.incomplete_reason})"
            output.info(f"volume {result.acquisition_id}: {'x'.join(map(str, result.volume.shape))}, "
                        f"{result.views_used}/{result.views_expected} views, {result.latency_s * 1e3:.1f} ms after the "
                        f"last view{flag}")

    def on_error(error):
        if not args.quiet:
            output.info(f"error {error.reason} ({error.acquisition_id}): {error.detail.splitlines()[0]}")

    server = StreamingServer(reconstructor, args.ingest, args.results, config, save_dir=args.save_dir,
                             curve=curve, on_volume=on_volume, on_error=on_error)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # these two lines are the machine-readable handshake: scripts read the bound endpoints from them
    print(f"ingest {server.ingest_address}", flush=True)
    print(f"results {server.results_address}", flush=True)
    print(f"engine {server.service.engine}; Ctrl-C to stop", file=sys.stderr, flush=True)
    server.serve_forever(stop)
    for handler in handlers:
        handler.flush_and_stop()
    status = server.status()
    print(f"stopped: {status['volumes']} volumes, {status['rejected_messages']} rejected messages, "
          f"errors {status['errors']}", file=sys.stderr, flush=True)
    return 0
