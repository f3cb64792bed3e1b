"""biref render: slice figures (the paper's Fig. 2a), comparisons, a 3D view and a rotation video."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("render", help="draw a volume: slices, comparisons, 3D view, rotation video",
                              description="Draw xy, zy and xz slices of n_e, n_o and Δn with the director as red "
                                          "segments through the largest droplet (or --planes), axes in µm; "
                                          "--compare puts volumes side by side with difference panels; --view3d and "
                                          "--video draw droplet isosurfaces with director glyphs. A file may be a "
                                          "volume, or an acquisition with a simulated truth (its truth is drawn).")
    p.add_argument("volume", nargs="?", type=Path, help="volume HDF5 file (docs/formats.md)")
    p.add_argument("--compare", nargs="+", type=Path, metavar="FILE",
                   help="volumes side by side on one colour scale, the first (e.g. the truth) the reference of the "
                        "difference panels")
    p.add_argument("--labels", nargs="+", help="names of the --compare volumes (default: file names)")
    p.add_argument("--out", type=Path, help="slice figure (PNG, PDF or SVG)")
    p.add_argument("--planes", help="Z,Y,X voxel indices of the planes (default: the largest droplet's centre)")
    p.add_argument("--title", help="figure title")
    p.add_argument("--view3d", type=Path, metavar="PNG", help="3D view: Δn isosurfaces with director glyphs (of VOLUME, "
                   "or of the first --compare file)")
    p.add_argument("--video", type=Path, metavar="MP4|GIF", help="360-degree rotation of the 3D view")
    p.add_argument("--frames", type=int, default=72, help="video frames (default 72: 5 degrees apart)")
    p.add_argument("--fps", type=float, default=24.0, help="video frames per second (default 24)")
    p.set_defaults(func=missing_extra_is_one_line("render", run))


def load_volume(path: Path):
    """A volume file's volume, or an acquisition file's simulated truth."""
    from ..files import file_kind, read_acquisition, read_volume

    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    kind = file_kind(path)
    if kind == "volume":
        return read_volume(path)
    if kind == "acquisition":
        truth = read_acquisition(path).truth
        if truth is None:
            raise ValueError(f"{path} is an acquisition without a truth: reconstruct it first (biref reconstruct)")
        return truth
    raise ValueError(f"{path} is a {kind} file; render takes volume files (or acquisitions with a truth)")


def parse_planes(text: str | None):
    if text is None:
        return None
    try:
        planes = tuple(int(v) for v in text.split(","))
    except ValueError:
        planes = ()
    if len(planes) != 3:
        raise ValueError(f"--planes {text!r}: expected three voxel indices Z,Y,X")
    return planes


def missing_extra_is_one_line(command: str, func):
    """A missing optional extra ends the command with the install hint, not a traceback."""
    def run_with_hint(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except ImportError as error:
            print(f"biref {command}: error: {error}", file=sys.stderr)
            return 1
    return run_with_hint


def run(args: argparse.Namespace) -> int:
    from ..viz.slices import compare_figure, save_figure, volume_figure

    if (args.volume is None) == (args.compare is None):
        raise ValueError("give one VOLUME, or --compare FILE FILE ...")
    if not (args.out or args.view3d or args.video):
        raise ValueError("nothing to draw: give --out, --view3d or --video")
    centre = parse_planes(args.planes)
    if args.compare:
        if len(args.compare) < 2:
            raise ValueError("--compare needs at least two files")
        labels = args.labels or [path.stem for path in args.compare]
        if len(labels) != len(args.compare):
            raise ValueError(f"--labels: {len(labels)} names for {len(args.compare)} files")
        volumes = [(label, load_volume(path)) for label, path in zip(labels, args.compare)]
        if args.out:
            print(f"figure: {save_figure(compare_figure(volumes, centre, args.title), args.out)}")
        shown = volumes[0][1]
    else:
        shown = load_volume(args.volume)
        if args.out:
            print(f"figure: {save_figure(volume_figure(shown, centre, args.title), args.out)}")
    if args.view3d or args.video:
        from ..viz.view3d import render_3d, rotation_video

        if args.view3d:
            print(f"3D view: {render_3d(shown, args.view3d, args.title)}")
        if args.video:
            print(f"video: {rotation_video(shown, args.video, args.frames, args.fps, args.title)} ({args.frames} frames)")
    return 0
