"""biref inspect: a summary of any biref_sdk file (volume, acquisition, data set)."""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="summarise a volume, acquisition or data set file")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def _stats(array) -> dict:
    import numpy as np

    a = np.asarray(array, dtype=np.float64)
    return {"shape": list(a.shape), "min": float(a.min()), "max": float(a.max()), "mean": float(a.mean())}


def summarize(path) -> dict:
    import h5py
    import numpy as np

    from ..files import _parameters, checked_dataset, file_kind
    from ..geometry import GEOMETRY_ATTRIBUTES

    kind = file_kind(path)
    summary: dict = {"path": str(path), "kind": kind}
    with h5py.File(path, "r") as h:
        for key in ("format_version", "sdk_version"):
            value = h.attrs.get(key)
            summary[key] = value.item() if hasattr(value, "item") else value
        summary["parameters"] = _parameters(h)
        if kind in ("acquisition", "dataset"):
            summary["geometry"] = {k: np.asarray(h.attrs[k]).tolist() for k in GEOMETRY_ATTRIBUTES if k in h.attrs}
            holograms = checked_dataset(h, "holograms", max_bytes=np.iinfo(np.int64).max)
            summary["holograms"] = {"shape": list(holograms.shape), "dtype": str(holograms.dtype)}
            summary["background"] = _stats(checked_dataset(h, "background"))
        if kind == "dataset":
            n = h["holograms"].shape[0]
            summary["n_samples"] = n
            first = min(n, 8)
            summary["ne (first samples)"] = _stats(h["ne"][:first])
            summary["no (first samples)"] = _stats(h["no"][:first])
        volume = h if kind == "volume" else h.get("truth")
        if volume is not None:
            prefix = "" if kind == "volume" else "truth "
            ne, no = checked_dataset(volume, "ne"), checked_dataset(volume, "no")
            summary[prefix + "ne"] = _stats(ne)
            summary[prefix + "no"] = _stats(no)
            birefringent = np.asarray(ne) - np.asarray(no) > 1e-4
            summary[prefix + "birefringent voxels"] = int(birefringent.sum())
        if kind == "volume":
            summary["voxel_size_m"] = np.asarray(h.attrs["voxel_size_m"]).tolist()
            summary["medium_index"] = float(h.attrs["medium_index"])
    return summary


def run(args: argparse.Namespace) -> int:
    summary = summarize(args.path)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    params = summary.pop("parameters")
    for key, value in summary.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"    {k}: {v}")
        else:
            print(f"{key}: {value}")
    print(f"parameters: {json.dumps(params, default=str)[:400]}")
    return 0
