"""The paper's Table 2: last-view latency per engine next to the formula, in one run.

    python benchmarks/bench_engines.py [--acquisitions 5] [--rate 100] [--threads 2] [--paper]
        [--json benchmarks/results/engines_small.json]

Runs ``biref bench`` (biref_sdk/cli/bench.py: the protocol, the breakdown and the table) and
writes its results with the machine and code records (benchmarks/_common.py).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

from _common import save_json  # benchmarks/ is on the path when run as a script

from biref_sdk.cli import main as biref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--acquisitions", type=int, default=5)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engine", action="append", dest="engines")
    parser.add_argument("--paper", action="store_true")
    parser.add_argument("--json", default="benchmarks/results/engines_small.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        raw = os.path.join(folder, "bench.json")
        argv = ["bench", "--acquisitions", str(args.acquisitions), "--rate", str(args.rate),
                "--threads", str(args.threads), "--json", raw]
        for engine in args.engines or []:
            argv += ["--engine", engine]
        if args.paper:
            argv.append("--paper")
        if biref(argv) != 0:
            raise SystemExit(1)
        with open(raw) as handle:
            results = json.load(handle)
    print(f"wrote {save_json(args.json, results, load_before)}")


if __name__ == "__main__":
    main()
