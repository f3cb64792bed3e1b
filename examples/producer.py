"""A microscope-side sender of the biref/2 protocol (docs/protocol.md), to copy into vendor code.

It depends only on pyzmq, msgpack and numpy (and h5py to read the example data); it does not
import biref_sdk. Replace ``read_acquisition`` with your camera: the three ``*_message`` functions
are the whole protocol.

    biref serve &                                   # the SDK, listening on tcp://127.0.0.1:5555
    biref simulate --sample volume.h5 --out acquisition.h5
    python examples/producer.py acquisition.h5 --id sample-1 --rate 200
"""
from __future__ import annotations

import argparse
import sys
import time

import h5py
import msgpack
import numpy as np
import zmq

PROTOCOL = "biref/2"
GEOMETRY_KEYS = ("wavelength_m", "medium_index", "na_objective", "pixel_size_m", "illumination_sines",
                 "reference_carriers", "volume_shape", "voxel_size_m")


def wire(array: np.ndarray) -> np.ndarray:
    """C order, little-endian: the only byte layout on the wire."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))


def start_message(acquisition_id: str, geometry: dict, shape, dtype: str, background=None) -> list:
    """``geometry``: the attributes of docs/formats.md; ``background`` [2, V, H, W] or None (then
    send ``background`` messages)."""
    header = {"protocol": PROTOCOL, "type": "start", "acquisition_id": acquisition_id,
              "geometry": {k: np.asarray(geometry[k]).tolist() for k in GEOMETRY_KEYS},
              "shape": [int(s) for s in shape], "dtype": dtype, "n_views": len(geometry["illumination_sines"])}
    frames = [msgpack.packb(header)]
    if background is not None:
        frames.append(wire(np.asarray(background, dtype=dtype)))
    return frames


def frame_message(kind: str, acquisition_id: str, polarization: int, view: int, frame: np.ndarray) -> list:
    """``kind`` "view" (a sample hologram) or "background"; ``frame`` [H, W]."""
    header = {"protocol": PROTOCOL, "type": kind, "acquisition_id": acquisition_id, "polarization": int(polarization),
              "view": int(view), "shape": list(frame.shape), "dtype": frame.dtype.name}
    return [msgpack.packb(header), wire(frame)]


def stop_message(acquisition_id: str) -> list:
    return [msgpack.packb({"protocol": PROTOCOL, "type": "stop", "acquisition_id": acquisition_id})]


def read_acquisition(path):
    """An acquisition file of docs/formats.md: (geometry dict, holograms [2, V, H, W], background)."""
    with h5py.File(path, "r") as f:
        geometry = {k: f.attrs[k] for k in GEOMETRY_KEYS}
        return geometry, f["holograms"][()], f["background"][()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("acquisition", help="acquisition HDF5 file (docs/formats.md)")
    parser.add_argument("--connect", default="tcp://127.0.0.1:5555")
    parser.add_argument("--id", default=f"acquisition-{int(time.time())}", help="acquisition_id")
    parser.add_argument("--rate", type=float, default=None, help="views per second (default: as fast as accepted)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a send may wait for the SDK")
    args = parser.parse_args()

    geometry, holograms, background = read_acquisition(args.acquisition)
    dtype = holograms.dtype.name
    context = zmq.Context()
    socket = context.socket(zmq.PUSH)
    socket.sndhwm = 64
    socket.sndtimeo = int(args.timeout * 1000)   # the SDK applies back-pressure: a send may wait
    socket.connect(args.connect)
    try:
        socket.send_multipart(start_message(args.id, geometry, holograms.shape[2:], dtype, background), copy=False)
        begin = time.perf_counter()
        for i, (p, v) in enumerate(np.ndindex(holograms.shape[:2])):
            if args.rate:
                time.sleep(max(0.0, begin + i / args.rate - time.perf_counter()))
            socket.send_multipart(frame_message("view", args.id, p, v, holograms[p, v]), copy=False)
        socket.send_multipart(stop_message(args.id))
    except zmq.Again:
        print(f"the SDK at {args.connect} took nothing for {args.timeout:g} s; is `biref serve` running?",
              file=sys.stderr)
        return 1
    finally:
        socket.close(linger=int(args.timeout * 1000))   # deliver what is queued before exiting
        context.term()
    print(f"sent {args.id}: {holograms.shape[0] * holograms.shape[1]} views")
    return 0


if __name__ == "__main__":
    sys.exit(main())
