"""biref bench: what a streaming user feels, per engine and preset (the paper's Table 2).

Per engine (and the formula in the same run, for ratios): simulated acquisitions are fed to a
reconstruction session view by view at ``--rate`` views/s, as a camera streams them; measured
are the last-view latency (from the last view's scheduled arrival: any backlog of the views before
it, the last view's own work and ``finalize``), its breakdown (model: backlog, the last view's
work, the decoding left, formula prior, readout, turning back, director, uncertainty), the per-view work while views arrive, the throughput with
views back to back (1 / (all per-view work + finalize)) and the process's peak resident memory
at the end of the run (all engines of the process together). ``--paper`` also times the stages of an
untrained network of the ``paper`` preset's size (no trained weights exist for it: timing only).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="last-view latency, per-view work, throughput, memory per engine",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("--preset", default="small", help="microscope preset of the trained model (default small)")
    p.add_argument("--model", help="model file (default: the shipped trained_models/biref_small.h5)")
    p.add_argument("--engine", action="append", dest="engines", metavar="ENGINE",
                   help="torch, onnxruntime or tensorrt; repeatable (default: every engine installed here)")
    p.add_argument("--acquisitions", type=int, default=5, help="acquisitions per engine (default 5)")
    p.add_argument("--rate", type=float, default=100.0, help="views per second (default 100; 0: back to back)")
    p.add_argument("--threads", type=int, help="CPU threads (torch's are process-wide; default: the library's)")
    p.add_argument("--quarter-turns", default="default", choices=("default", "on", "off"),
                   help="the model's quarter-turn averaging (default: the model's default)")
    p.add_argument("--paper", action="store_true", help="also time the stages of an untrained paper-size network")
    p.add_argument("--json", help="also write the results as JSON to this file")
    p.set_defaults(func=run)


def _percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _stream_one(reconstructor, acquisition, rate: float) -> dict:
    """One acquisition streamed view by view at ``rate`` (0: back to back) -> its measurements.

    Views arrive on the camera's schedule (view k at ``k / rate``), whatever the work before:
    a view whose predecessor's work ran late is late too, and the latency counts from the last
    view's scheduled arrival, so work that falls behind is not hidden."""
    session = reconstructor.start(acquisition.geometry, acquisition.background)
    order = [(p, v) for v in range(acquisition.geometry.n_views) for p in range(2)]
    work = []
    start = time.perf_counter()
    for index, (p, v) in enumerate(order):
        arrival = start + index / rate if rate else time.perf_counter()
        time.sleep(max(0.0, arrival - time.perf_counter()))
        begun = time.perf_counter()
        session.add_view(p, v, acquisition.holograms[p, v])
        done = time.perf_counter()
        work.append(done - begun)
    session.finalize()
    finished = time.perf_counter()
    return {"latency": finished - arrival, "per_view": work[:-1], "throughput": 1.0 / (sum(work) + finished - done),
            "breakdown": {"behind": max(0.0, begun - arrival), "last_view": work[-1], **getattr(session, "finalize_timings_s", {}),
                          "finalize": finished - done}}


def _summary(runs: list[dict]) -> dict:
    latencies = [r["latency"] for r in runs]
    per_view = [t for r in runs for t in r["per_view"]]
    throughputs = [r["throughput"] for r in runs]
    breakdowns = [r["breakdown"] for r in runs]
    breakdown = {k: 1e3 * statistics.median(b[k] for b in breakdowns) for k in breakdowns[0]}
    return {"latency_p50_ms": 1e3 * statistics.median(latencies), "latency_p99_ms": 1e3 * _percentile(latencies, 99),
            "per_view_p50_ms": 1e3 * statistics.median(per_view),
            "throughput_acq_per_s": statistics.median(throughputs), "peak_rss_mb": _peak_mb(),
            "breakdown_p50_ms": breakdown, "n": len(latencies)}


def _paper_stages(engine_name: str, threads, repeats: int = 2) -> dict:
    import torch

    from ..engines import create_engine
    from ..geometry import preset
    from ..network.config import config_for_geometry
    from ..network.io import LoadedModel
    from ..network.model import BirefNet

    geometry = preset("paper")
    torch.manual_seed(0)
    network = BirefNet(config_for_geometry(geometry, "paper", input_mode="hologram", normalization="none")).eval()
    model = LoadedModel(network=network, config=network.config, geometry=geometry, metadata={},
                        sha256="untrained-paper-size", path=None)
    engine = create_engine(engine_name, model, threads=threads)
    c = network.config
    window = torch.randn(1, c.input_channels, 1, *c.input_shape)
    hidden = engine.initial_hidden()
    times = {"encode": [], "gru_step": [], "decode": [], "readout": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        features = engine.encode(window)
        t1 = time.perf_counter()
        hidden = engine.gru_step(hidden, features)
        t2 = time.perf_counter()
        decoded = engine.decode(hidden[:, None].expand(1, c.sequence_length, *hidden.shape[1:]).contiguous())
        t3 = time.perf_counter()
        engine.readout(decoded)
        t4 = time.perf_counter()
        for name, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[name].append(value)
    result = {f"{k}_ms": 1e3 * min(v) for k, v in times.items()}
    # the last window's encode and GRU step, then the whole decoder (as if the last view were in
    # the last window)
    result["last_view_estimate_ms"] = sum(result[f"{k}_ms"] for k in times)
    result["peak_rss_mb"] = _peak_mb()
    return result


def run(args: argparse.Namespace) -> int:
    import os

    from ..engines import available_engines
    from ..reconstruction.formula import FormulaReconstructor
    from ..reconstruction.model import ModelReconstructor
    from ..streaming.microscope import SimulatedMicroscope

    engines = args.engines or [e for e in available_engines() if e != "tensorrt" or _cuda()]
    turns = {"default": None, "on": True, "off": False}[args.quarter_turns]
    microscope = SimulatedMicroscope(args.preset, seed=0, id_prefix="bench")
    acquisitions = [microscope.acquisition(i) for i in range(args.acquisitions)]
    load_before = os.getloadavg()
    methods = {f"model/{name}": ModelReconstructor(args.model, engine=name, threads=args.threads, quarter_turns=turns)
               for name in engines}
    methods["formula"] = FormulaReconstructor()
    runs = {name: [] for name in methods}
    for name, reconstructor in methods.items():  # warm-up: caches, thread pools, graph optimisation
        _stream_one(reconstructor, acquisitions[0], 0)
    # round robin, one acquisition per method in turn: the machine's load changes alike for all
    for acquisition in acquisitions:
        for name, reconstructor in methods.items():
            runs[name].append(_stream_one(reconstructor, acquisition, args.rate))
    rows = {name: {"engine": r.engine.describe() if name != "formula" else "formula (torch cpu)",
                   **_summary(runs[name])} for name, r in methods.items()}
    paper = {f"model/{name}": _paper_stages(name, args.threads) for name in engines} if args.paper else {}
    results = {"preset": args.preset, "rate_views_per_s": args.rate, "acquisitions": args.acquisitions,
               "threads": args.threads, "load_average_before": load_before, "load_average_after": os.getloadavg(),
               "cpus": os.cpu_count(), "rows": rows, "paper_untrained_stages": paper}
    _print_table(results)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
        print(f"wrote {args.json}")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _print_table(results: dict) -> None:
    formula = results["rows"]["formula"]["latency_p50_ms"]
    print(f"preset {results['preset']}, views at {results['rate_views_per_s']:g}/s, {results['acquisitions']} "
          f"acquisitions, load average {results['load_average_before'][0]:.1f} -> {results['load_average_after'][0]:.1f}")
    print(f"{'method/engine':22} {'p50 ms':>8} {'p99 ms':>8} {'x formula':>9} {'view ms':>8} {'acq/s':>6} "
          f"{'peak MB':>8}  breakdown p50 ms")
    for name, row in results["rows"].items():
        parts = ", ".join(f"{k} {v:.0f}" for k, v in row["breakdown_p50_ms"].items())
        print(f"{name:22} {row['latency_p50_ms']:8.0f} {row['latency_p99_ms']:8.0f} "
              f"{row['latency_p50_ms'] / formula:9.2f} {row['per_view_p50_ms']:8.1f} "
              f"{row['throughput_acq_per_s']:6.2f} {row['peak_rss_mb']:8.0f}  {parts}")
    for name, row in results["paper_untrained_stages"].items():
        print(f"paper size, untrained {name}: encode {row['encode_ms']:.0f} ms, GRU step {row['gru_step_ms']:.0f} ms, "
              f"decode {row['decode_ms']:.0f} ms, readout {row['readout_ms']:.0f} ms per turn "
              "(timing only: no trained weights)")
