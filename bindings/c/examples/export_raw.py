"""Write an acquisition file (docs/formats.md) as the raw files that stream_acquisition.c reads.

    python export_raw.py acquisition.h5 DIR

DIR/acquisition.txt: the geometry attributes and the frame format, one "name value ..." line each
(numbers in shortest round-trip form, so C's strtod reads back the same doubles);
DIR/holograms.raw, DIR/background.raw: the [2, V, H, W] frames, C order, little-endian.
Needs h5py and numpy only (not biref_sdk).
"""
from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np

GEOMETRY = ("wavelength_m", "medium_index", "na_objective", "pixel_size_m", "illumination_sines",
            "reference_carriers", "volume_shape", "voxel_size_m")


def export(acquisition: str, out: str) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with h5py.File(acquisition, "r") as f:
        holograms, background = f["holograms"][()], f["background"][()]
        attrs = {name: np.asarray(f.attrs[name]) for name in GEOMETRY}
    if holograms.dtype.name not in ("uint8", "uint16", "float32"):
        raise SystemExit(f"frames of dtype {holograms.dtype} cannot travel in the biref protocol")
    _, n_views, height, width = holograms.shape
    lines = ["# biref acquisition for bindings/c/examples/stream_acquisition.c", f"dtype {holograms.dtype.name}",
             f"hologram_shape {height} {width}", f"n_views {n_views}"]
    for name in GEOMETRY:
        values = attrs[name].ravel().tolist()
        lines.append(" ".join([name, *(repr(v) for v in values)]))
    (out_dir / "acquisition.txt").write_text("\n".join(lines) + "\n")
    wire = holograms.dtype.newbyteorder("<")
    holograms.astype(wire).tofile(out_dir / "holograms.raw")
    background.astype(wire).tofile(out_dir / "background.raw")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    export(sys.argv[1], sys.argv[2])
