"""biref demo: the whole streaming path on one machine, over loopback TCP.

A service (threads in this process) binds free loopback ports; a simulated microscope streams one
acquisition to it; a subscriber receives the volume and saves it as a volume file and a figure.
"""
from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

from .geometry import add_geometry_argument
from .serve import add_engine_arguments, make_reconstructor


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="stream a simulated acquisition through the SDK to a volume and a figure",
                              description="Start the streaming service, stream one simulated acquisition through it "
                                          "over loopback TCP, save the volume it publishes and a figure.")
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default demo-output)")
    add_geometry_argument(p)
    p.add_argument("--seed", type=int, default=0, help="which simulated sample")
    p.add_argument("--rate", type=float, default=100.0,
                   help="views per second, as a camera streams them (default 100; 0: as fast as possible, so the "
                        "latency includes the backlog of views not yet processed)")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    add_engine_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..files import write_volume
    from ..metrics import compare_volumes
    from ..streaming.client import Producer, ResultError, Subscriber
    from ..files import read_geometry
    from ..streaming.microscope import SimulatedMicroscope
    from ..streaming.server import StreamingServer, safe_filename
    from ..streaming.service import ServiceConfig
    from ..viz import slices_figure

    reconstructor = make_reconstructor(args)
    microscope = SimulatedMicroscope(read_geometry(args.geometry), seed=args.seed, id_prefix="demo")
    acquisition_id = microscope.acquisition_id(0)
    print(f"simulating {acquisition_id} ({args.geometry}: 2 x {microscope.geometry.n_views} holograms of "
          f"{'x'.join(map(str, microscope.geometry.hologram_shape))})", flush=True)
    acquisition = microscope.acquisition(0)

    config = ServiceConfig(status_interval_s=0.2, acquisition_timeout_s=args.timeout)
    with StreamingServer(reconstructor, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", config) as server, \
            Subscriber(server.results_address, topics=("volume", "error")) as subscriber:
        print(f"service ({server.service.engine}): ingest {server.ingest_address}, results {server.results_address}",
              flush=True)
        subscriber.wait_ready(timeout_s=30)
        sent = {}
        failure = []

        def microscope_thread():
            try:
                with Producer(server.ingest_address, timeout_s=args.timeout) as producer:
                    sent.update(producer.send_acquisition(acquisition, acquisition_id, rate_views_per_s=args.rate or None))
            except Exception as error:  # reported by the main thread
                failure.append(error)

        thread = threading.Thread(target=microscope_thread, name="simulated-microscope", daemon=True)
        began = time.perf_counter()
        thread.start()
        try:
            result = subscriber.wait_volume(acquisition_id, timeout_s=args.timeout)
        except ResultError as error:
            raise ValueError(f"the service reported: {error}") from None
        except TimeoutError:
            raise OSError(f"no volume within {args.timeout:g} s"
                          + (f" (microscope: {failure[0]})" if failure else "")) from None
        thread.join(args.timeout)
        if failure:
            raise OSError(f"simulated microscope failed: {failure[0]}")

    header = result.header
    volume = result.volume
    args.out.mkdir(parents=True, exist_ok=True)
    stem = safe_filename(acquisition_id)
    volume_path = args.out / f"{stem}_volume.h5"
    figure_path = args.out / f"{stem}_slices.png"
    write_volume(volume_path, volume)
    metrics = compare_volumes(acquisition.truth, volume)
    slices_figure(volume, figure_path, title=f"{acquisition_id}: streamed, {header['engine']}", truth=acquisition.truth)
    received_after_s = result.received_s - sent.get("last_view_sent_s", result.received_s)
    print(f"streamed {header['views_used']}/{header['views_expected']} views in "
          f"{sent['last_view_sent_s'] - sent['first_view_sent_s']:.2f} s; volume "
          f"{'x'.join(map(str, volume.shape))} ready {header['latency_s'] * 1e3:.1f} ms after the last view arrived "
          f"(received {received_after_s * 1e3:.1f} ms after it was sent; whole run {time.perf_counter() - began:.1f} s)")
    print(f"against the simulated truth: PSNR n_e {metrics['psnr_ne']:.1f} dB, n_o {metrics['psnr_no']:.1f} dB, "
          f"director error {metrics['director_error_deg']:.1f} deg")
    if volume.uncertainty is not None:
        sample = (volume.ne - volume.no > 2e-3) | (abs(volume.ne - volume.medium_index) > 2e-3)
        spread = volume.uncertainty[0][sample] if sample.any() else volume.uncertainty[0].ravel()
        print(f"uncertainty: median spread of n_e {float(np.median(spread)):.4f} in the sample "
              f"(largest {float(volume.uncertainty[0].max()):.4f})")
    if volume.consistency is not None:
        c = volume.consistency
        print(f"consistency: score {c.score:.3f} (noise floor {c.noise_floor:.3f}, {c.views_checked} views, "
              f"{c.time_s * 1e3:.0f} ms)")
    print(f"volume file: {volume_path}")
    print(f"figure:      {figure_path}")
    return 0
