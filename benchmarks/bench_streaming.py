"""Streaming service under load, over loopback TCP, with the service in its own process.

    OMP_NUM_THREADS=1 python benchmarks/bench_streaming.py [--acquisitions 20] [--latency-acquisitions 10]
        [--rate 100] [--threads 0] [--json benchmarks/results/streaming.json]

Goals (issue 5, a 2-core CPU machine): >= 1000 views/s of 512 x 512 uint16 ingested with zero loss;
a `small` volume published <= 100 ms after its last view (formula engine). The producer, the
service and the subscriber share the machine, so every number depends on its load: the JSON
records the load average before and after.

1. Ingest: acquisitions of 2 x 37 frames of 512 x 512 uint16 (the paper's camera) streamed back
   to back as fast as the service takes them (PUSH blocks under back-pressure), each with its
   2 x 37 background frames, sent (a) inline in the start message (one 39 MB frame) and (b) as
   `background` messages (one frame each). The engine is a null engine that only checks each
   frame's identity tag, so this measures the SDK's own path: socket -> header validation ->
   recv_into a pooled buffer -> queue -> worker -> session. Reported: sustained views/s (view
   messages), frames/s (views + background frames), MB/s of all bytes; zero loss is checked (every
   acquisition complete, no rejection, no frame mixed up or lost, no result missed).
2. Latency of the `small` preset with the formula engine: acquisitions streamed back to back,
   (a) paced at --rate views/s, a camera rate the engine keeps up with, so the latency is the work
   left after the last view; (b) as fast as possible: the engine saturated, views queue up and the
   latency includes that backlog. Per volume: the service's latency (last view arrived -> volume
   ready, header `latency_s`), the engine's finalize time (part of it; the rest is the last view's
   own processing, any queued views and publishing), the client's latency (last view sent ->
   volume received, same clock) and the engine's time per view. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import threading
import time

import numpy as np

from biref_sdk.files import Acquisition, Volume
from biref_sdk.geometry import preset
from biref_sdk.reconstruction.base import ReconstructionSession, Reconstructor

from _common import save_json  # benchmarks/ is on the path when run as a script

MB = 1e6


class TagSession(ReconstructionSession):
    """Checks that frame (p, v), sample or background, carries its tag in pixel [0, 0];
    reconstructs nothing."""

    def __init__(self, geometry, background) -> None:
        super().__init__(geometry)
        tags = np.arange(2 * geometry.n_views).reshape(2, geometry.n_views)
        self.bad_frames = int(np.count_nonzero(background[:, :, 0, 0] != tags))

    def _add_view(self, polarization, view, hologram) -> None:
        if int(hologram[0, 0]) != polarization * self.geometry.n_views + view:
            self.bad_frames += 1

    def finalize(self, allow_missing: bool = False) -> Volume:
        shape = self.geometry.volume_shape
        return Volume(np.zeros(shape), np.zeros(shape), np.zeros((3, *shape)), self.geometry.voxel_size_m,
                      self.geometry.medium_index, {"bad_frames": self.bad_frames})


class NullReconstructor(Reconstructor):
    name = "null"

    def start(self, geometry, background) -> TagSession:
        return TagSession(geometry, background)


def _service_process(engine: str, threads: int, options: dict, connection) -> None:
    """The SDK side: a StreamingServer until told to stop; reports its status, CPU time and torch
    threads."""
    from biref_sdk.streaming.server import StreamingServer
    from biref_sdk.streaming.service import ServiceConfig

    torch_threads = None
    if engine == "null":
        reconstructor = NullReconstructor()
    else:
        import torch

        from biref_sdk.reconstruction import get_reconstructor

        if threads:
            torch.set_num_threads(threads)
        torch_threads = torch.get_num_threads()
        reconstructor = get_reconstructor(engine, **options)
    config = ServiceConfig(status_interval_s=0.2, acquisition_timeout_s=120)
    with StreamingServer(reconstructor, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", config) as server:
        ready_cpu_s = time.process_time()   # CPU from here on: serving, not process start-up and imports
        connection.send((server.ingest_address, server.results_address))
        connection.recv()   # "stop"
        connection.send({"status": server.status(), "cpu_s": time.process_time() - ready_cpu_s,
                         "torch_threads": torch_threads})


class Service:
    def __init__(self, engine: str, threads: int = 0, options: dict | None = None) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_service_process, args=(engine, threads, options or {}, child), daemon=True)
        self.process.start()
        if not self.connection.poll(300):
            raise RuntimeError("the service process did not start")
        self.ingest, self.results = self.connection.recv()

    def stop(self) -> dict:
        self.connection.send("stop")
        if not self.connection.poll(120):
            raise RuntimeError("the service process did not stop")
        report = self.connection.recv()
        self.process.join(30)
        return report


class Receiver(threading.Thread):
    """Receives volumes (and errors) continuously, stamping each on arrival."""

    def __init__(self, address: str, expected: int) -> None:
        super().__init__(daemon=True)
        from biref_sdk.streaming.client import Subscriber

        self.subscriber = Subscriber(address, topics=("volume", "error", "status"), rcvhwm=1000)
        self.subscriber.wait_ready(60)
        self.expected = expected
        self.volumes: list = []
        self.errors: list = []
        self.done = threading.Event()

    def run(self) -> None:
        try:
            while len(self.volumes) < self.expected:
                result = self.subscriber.recv(300)
                if result.topic == "volume":
                    self.volumes.append(result)
                elif result.topic == "error":
                    self.errors.append(result.header)
        finally:
            self.done.set()


def bench_ingest(n_acquisitions: int, background: str) -> dict:
    from biref_sdk.streaming.client import Producer

    geometry = preset("paper").replace(volume_shape=(8, 32, 32))   # paper camera, tiny null output
    V, (H, W) = geometry.n_views, geometry.hologram_shape
    rng = np.random.default_rng(0)
    holograms = rng.integers(0, 4096, (2, V, H, W), dtype=np.uint16)
    holograms[:, :, 0, 0] = np.arange(2 * V).reshape(2, V)           # identity tags
    backgrounds = rng.integers(0, 64, (2, V, H, W), dtype=np.uint16)
    backgrounds[:, :, 0, 0] = holograms[:, :, 0, 0]
    acquisition = Acquisition(holograms, backgrounds, geometry)
    service = Service("null")
    try:
        receiver = Receiver(service.results, n_acquisitions + 1)
        receiver.start()
        with Producer(service.ingest, timeout_s=120) as producer:
            producer.send_acquisition(acquisition, "warm-up", background=background)
            while not receiver.volumes and not receiver.done.is_set():
                receiver.done.wait(0.01)
            begin, begin_cpu_s = time.perf_counter(), time.process_time()
            for i in range(n_acquisitions):
                producer.send_acquisition(acquisition, f"acq-{i}", background=background)
            sent_s = time.perf_counter() - begin
        if not receiver.done.wait(600):
            raise RuntimeError("volumes did not all arrive")
        elapsed = receiver.volumes[-1].received_s - begin
        client_cpu_s = time.process_time() - begin_cpu_s   # producer (with its ZeroMQ I/O thread) and receiver
    finally:
        report = service.stop()
    status = report["status"]
    views = n_acquisitions * 2 * V
    frames = 2 * views                                  # views + background frames
    bytes_total = frames * H * W * 2
    timed = receiver.volumes[1:]
    bad = sum(json.loads(r.header["parameters"])["bad_frames"] for r in receiver.volumes)
    zero_loss = (len(timed) == n_acquisitions and all(r.header["complete"] for r in timed) and bad == 0
                 and status["rejected_messages"] == 0 and not receiver.errors
                 and status["views_accepted"] == views + 2 * V and sum(receiver.subscriber.missed.values()) == 0
                 and status["background_frames_accepted"] == (views + 2 * V if background == "messages" else 0))
    return {"background": background, "frame": [H, W], "dtype": "uint16", "acquisitions": n_acquisitions,
            "views": views, "frames_including_background": frames, "bytes": bytes_total, "seconds": elapsed,
            "send_seconds": sent_s, "views_per_s": views / elapsed, "frames_per_s": frames / elapsed,
            "mb_per_s": bytes_total / elapsed / MB, "zero_loss": zero_loss, "bad_frames": bad,
            "rejected_messages": status["rejected_messages"], "ingest_waits": status["ingest_waits"],
            "service_cpu_s": report["cpu_s"], "client_cpu_s": client_cpu_s}


def bench_latency(n_acquisitions: int, rate: float | None, threads: int, acquisitions, options: dict) -> dict:
    from biref_sdk.streaming.client import Producer

    service = Service("formula", threads, options)
    sent: dict[str, float] = {}
    try:
        receiver = Receiver(service.results, n_acquisitions + 1)
        receiver.start()
        with Producer(service.ingest, timeout_s=120) as producer:
            producer.send_acquisition(acquisitions[0], "warm-up")        # plans, caches
            while not receiver.volumes and not receiver.done.is_set():
                receiver.done.wait(0.01)
            begin = time.perf_counter()
            for i in range(n_acquisitions):
                timing = producer.send_acquisition(acquisitions[i % len(acquisitions)], f"acq-{i}",
                                                   rate_views_per_s=rate)
                sent[timing["acquisition_id"]] = timing["last_view_sent_s"]
        if not receiver.done.wait(600):
            raise RuntimeError("volumes did not all arrive")
        elapsed = receiver.volumes[-1].received_s - begin
    finally:
        report = service.stop()
    timed = [r for r in receiver.volumes if r.acquisition_id != "warm-up"]
    service_ms = [r.header["latency_s"] * 1e3 for r in timed]
    client_ms = [(r.received_s - sent[r.acquisition_id]) * 1e3 for r in timed]
    parameters = [json.loads(r.header["parameters"]) for r in timed]
    finalize_ms = [p["seconds_finalize"] * 1e3 for p in parameters]
    view_ms = [p["seconds_views"] * 1e3 / p["views_used"] / 2 for p in parameters]   # views_used counts view pairs

    def summary(values):
        values = sorted(values)
        return {"p50": statistics.median(values), "p95": values[min(len(values) - 1, int(0.95 * len(values)))],
                "max": values[-1]}

    views = n_acquisitions * 2 * acquisitions[0].geometry.n_views
    return {"rate_views_per_s": rate, "acquisitions": n_acquisitions, "views_per_s": views / elapsed,
            "service_latency_ms": summary(service_ms), "client_latency_ms": summary(client_ms),
            "engine_finalize_ms": summary(finalize_ms),
            "latency_outside_finalize_ms": summary([s - f for s, f in zip(service_ms, finalize_ms)]),
            "engine_ms_per_view": summary(view_ms), "all_complete": all(r.header["complete"] for r in timed),
            "rejected_messages": report["status"]["rejected_messages"], "service_cpu_s": report["cpu_s"],
            "service_torch_threads": report["torch_threads"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--acquisitions", type=int, default=20, help="512x512 acquisitions in the ingest run")
    parser.add_argument("--latency-acquisitions", type=int, default=10, help="small acquisitions per latency run")
    parser.add_argument("--rate", type=float, default=100.0,
                        help="views/s of the paced latency run (below what the engine sustains)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of the service (0: torch's default, which follows OMP_NUM_THREADS)")
    parser.add_argument("--option", action="append", metavar="KEY=VALUE",
                        help="a formula option of the latency runs, e.g. constraint_iterations=0 (docs/reconstruction.md)")
    parser.add_argument("--json", default="benchmarks/results/streaming.json")
    args = parser.parse_args()

    from biref_sdk.cli.reconstruct import parse_options
    from biref_sdk.streaming.microscope import SimulatedMicroscope

    load_before = os.getloadavg()
    ingest = [bench_ingest(args.acquisitions, background) for background in ("inline", "messages")]
    microscope = SimulatedMicroscope("small", seed=0)
    small = [microscope.acquisition(i) for i in range(2)]
    options = parse_options(args.option, ["formula"])["formula"]
    latency = [bench_latency(args.latency_acquisitions, args.rate, args.threads, small, options),
               bench_latency(args.latency_acquisitions, None, args.threads, small, options)]

    first = ingest[0]
    print(f"ingest, {first['frame'][0]}x{first['frame'][1]} uint16, null engine, {first['acquisitions']} acquisitions "
          f"of {first['views'] // first['acquisitions']} views back to back (service in its own process, loopback TCP)")
    print(f"  {'background':>10} {'views/s':>8} {'frames/s':>9} {'MB/s':>6} {'zero loss':>10} "
          f"{'back-pressure waits':>20}")
    for run in ingest:
        print(f"  {run['background']:>10} {run['views_per_s']:8.0f} {run['frames_per_s']:9.0f} {run['mb_per_s']:6.0f} "
              f"{str(run['zero_loss']):>10} {run['ingest_waits']:20d}")
    print(f"latency, small preset, formula engine, options {options or 'defaults'} "
          f"({latency[0]['service_torch_threads']} torch thread(s)), "
          f"{args.latency_acquisitions} acquisitions back to back; ms")
    print(f"  {'pacing':>19} {'views/s':>8} {'service p50/p95/max':>21} {'finalize p50/p95':>17} "
          f"{'rest p50':>9} {'client p50/p95':>15} {'ms/view':>8}")
    for run in latency:
        pacing = f"{run['rate_views_per_s']:.0f} views/s" if run["rate_views_per_s"] else "as fast as possible"
        s, c, f = run["service_latency_ms"], run["client_latency_ms"], run["engine_finalize_ms"]
        print(f"  {pacing:>19} {run['views_per_s']:8.0f} {s['p50']:7.1f}/{s['p95']:6.1f}/{s['max']:6.1f} "
              f"{f['p50']:10.1f}/{f['p95']:6.1f} {run['latency_outside_finalize_ms']['p50']:9.1f} "
              f"{c['p50']:8.1f}/{c['p95']:6.1f} {run['engine_ms_per_view']['p50']:8.2f}")
    goals = {f"ingest_views_per_s_background_{run['background']}": {
        "goal": 1000, "measured": run["views_per_s"], "met": run["views_per_s"] >= 1000 and run["zero_loss"]}
        for run in ingest}
    goals["paced_latency_p50_ms"] = {"goal": 100, "measured": latency[0]["service_latency_ms"]["p50"],
                                     "met": latency[0]["service_latency_ms"]["p50"] <= 100}
    print("goals: " + "; ".join(f"{name} {g['measured']:.0f} (goal {g['goal']}): {'met' if g['met'] else 'MISSED'}"
                                for name, g in goals.items()))
    path = save_json(args.json, {"arguments": vars(args), "goals": goals, "ingest": ingest, "latency": latency},
                     load_before)
    print(f"load average before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f}; wrote {path}")


if __name__ == "__main__":
    main()
