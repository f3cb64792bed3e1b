"""Receive volumes from a running `biref serve` and save each as a volume file and a figure.

    biref serve &
    python examples/subscriber.py --out volumes/            # Ctrl-C to stop
    biref microscope-sim --n 3                             # in another shell
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from biref_sdk.files import write_volume
from biref_sdk.streaming import Subscriber
from biref_sdk.streaming.server import safe_filename
from biref_sdk.viz import slices_figure


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connect", default="tcp://127.0.0.1:5556", help="the service's results endpoint")
    parser.add_argument("--out", type=Path, default=Path("volumes"))
    parser.add_argument("--count", type=int, default=0, help="exit after this many volumes (0: run until Ctrl-C)")
    parser.add_argument("--timeout", type=float, default=0, help="exit with an error after this many seconds "
                        "without a message (0: wait forever)")
    args = parser.parse_args()

    saved = 0
    reported_missed = 0
    with Subscriber(args.connect, topics=("volume", "error", "status")) as subscriber:
        subscriber.wait_ready(timeout_s=args.timeout or 3600 * 24 * 365)
        print(f"ready: subscribed to {args.connect}", flush=True)
        try:
            while not args.count or saved < args.count:
                try:
                    result = subscriber.recv(timeout_s=args.timeout or 3600)
                except TimeoutError:
                    if args.timeout:
                        print(f"no message for {args.timeout:g} s", file=sys.stderr)
                        return 1
                    continue
                header = result.header
                if result.topic == "error":
                    print(f"error {header['reason']} ({header['acquisition_id']}): {header['detail']}", flush=True)
                elif result.topic == "volume":
                    stem = args.out / safe_filename(result.acquisition_id)
                    write_volume(f"{stem}.h5", result.volume)
                    flag = "" if header["complete"] else f", INCOMPLETE: missing {len(header['missing'])} views"
                    slices_figure(result.volume, f"{stem}.png", title=f"{result.acquisition_id} ({header['engine']}{flag})")
                    saved += 1
                    print(f"saved {stem}.h5 and {stem}.png ({header['latency_s'] * 1e3:.1f} ms after the last view"
                          f"{flag})", flush=True)
                if sum(subscriber.missed.values()) > reported_missed:
                    reported_missed = sum(subscriber.missed.values())
                    print(f"missed messages (this subscriber was too slow): {subscriber.missed}", file=sys.stderr)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
