"""napari reader for the three file kinds of docs/formats.md: volumes as n_e, n_o, Δn and director
layers in µm; acquisitions as hologram stacks (and their truth); data sets as stacks of samples."""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def get_reader(path):
    """napari's reader hook: a reader function for a biref_sdk HDF5 file, else None (napari then
    asks other plugins)."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    if not str(path).lower().endswith((".h5", ".hdf5")):
        return None
    from ..files import FileFormatError, file_kind

    try:
        file_kind(path)
    except (OSError, FileFormatError) as error:
        log.debug("not a biref_sdk file: %s (%s)", path, error)
        return None
    return read_layers


def read_layers(path) -> list[tuple]:
    """Layer data tuples of a biref_sdk file. Acquisition and data set frames stay on disk (dask),
    so the file stays open while their layers exist."""
    import h5py

    from ..files import file_kind, read_volume
    from .layers import acquisition_layers, dataset_layers, volume_layers

    if isinstance(path, (list, tuple)):
        path = path[0]
    path = Path(path)
    kind = file_kind(path)
    prefix = f"{path.stem} "
    if kind == "volume":
        return volume_layers(read_volume(path), prefix)
    handle = h5py.File(path, "r")
    return acquisition_layers(handle, prefix) if kind == "acquisition" else dataset_layers(handle, prefix)
