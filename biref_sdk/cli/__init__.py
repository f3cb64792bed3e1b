"""The ``biref`` command-line program. Each subcommand lives in its own module of this package,
exposing ``register(subparsers)``; the module is imported only when the program starts."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand modules, in the order ``biref --help`` lists them
COMMANDS = (
    "simulate",
    "geometry",
    "inspect",
    "train", "distill", "blend",
    "serve",
    "microscope_sim",
    "demo",
    "reconstruct", "evaluate",
    "render", "report",
    "export", "bench",
)


def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__

    parser = argparse.ArgumentParser(prog="biref", description="3D birefringence from DTT holograms")
    parser.add_argument("--version", action="version", version=f"biref_sdk {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, OSError) as error:
        # user errors (bad file, bad option) end with one clear line, not a traceback
        print(f"biref {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
