"""biref geometry: check a microscope geometry, or write one as a JSON geometry file; and the
``--geometry`` option shared by simulate, microscope-sim, demo and train."""
from __future__ import annotations

import argparse


def add_geometry_argument(parser, help_suffix: str = "") -> None:
    """``--geometry`` (``--preset`` is its old name): a preset, a JSON geometry or an acquisition file."""
    parser.add_argument("--geometry", "--preset", dest="geometry", default="small", metavar="PRESET|FILE",
                        help="microscope geometry: a preset (small, paper), a JSON geometry file (docs/formats.md "
                             "attributes + hologram_shape) or any acquisition / data set file (default small)"
                             + help_suffix)


def register(subparsers) -> None:
    p = subparsers.add_parser("geometry", help="check a microscope geometry or write it as JSON",
                              description="check: one line per finding (sidebands against the DC term, each other "
                                          "and Nyquist; illumination NA, objective NA and volume; what limits the "
                                          "resolution); exit status 1 when the service would refuse it. "
                                          "write: the geometry of a preset or an acquisition as a JSON geometry file.")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = sub.add_parser("check", help="check a geometry (preset, JSON or acquisition file)")
    check.add_argument("source", metavar="PRESET|FILE")
    check.set_defaults(func=run_check)
    write = sub.add_parser("write", help="write a geometry (preset, JSON or acquisition file) as a JSON geometry")
    write.add_argument("source", metavar="PRESET|FILE")
    write.add_argument("--out", required=True, help="output JSON file")
    write.set_defaults(func=run_write)


def run_check(args: argparse.Namespace) -> int:
    from ..files import read_geometry
    from ..geometry import geometry_findings

    findings = geometry_findings(read_geometry(args.source, checked=False))
    for finding in findings:
        print(finding)
    return 1 if any(f.refused for f in findings) else 0


def run_write(args: argparse.Namespace) -> int:
    from ..files import read_geometry, write_geometry

    geometry = read_geometry(args.source)
    write_geometry(args.out, geometry)
    print(f"wrote {args.out}: {geometry.n_views} views, frames {'x'.join(map(str, geometry.hologram_shape))}, "
          f"volume {'x'.join(map(str, geometry.volume_shape))}")
    return 0
