"""Adversarial files for `biref inspect` and `biref reconstruct`: small files that announce huge or
unreadable arrays, and malformed content, end in one line on stderr and rc 1, before any large
allocation (the checks run on the file's metadata, so these tests stay small and fast)."""
from __future__ import annotations

import resource

import h5py
import numpy as np
import pytest

from biref_sdk.cli import main
from biref_sdk.files import Acquisition, FileFormatError, read_acquisition, write_acquisition
from biref_sdk.geometry import preset


def _acquisition_file(path, **datasets):
    """An acquisition file with preset("small") geometry attributes and the given datasets
    (each a callable(handle, name) or an array)."""
    geometry = preset("small")
    shape = (2, geometry.n_views, *geometry.hologram_shape)
    frames = np.ones(shape, np.uint16)
    write_acquisition(path, Acquisition(frames, frames, geometry))
    with h5py.File(path, "a") as h:
        for name, make in datasets.items():
            if name in h:
                del h[name]
            if make is not None:
                make(h, name) if callable(make) else h.create_dataset(name, data=make)
    return geometry


def _unwritten_chunks(h, name):
    h.create_dataset(name, shape=(2, 37, 2048, 2048), dtype="f4", chunks=(1, 1, 256, 256))


def _virtual(h, name):
    layout = h5py.VirtualLayout(shape=(2, 37, 16384, 16384), dtype="f4")
    layout[0, 0, :16, :16] = h5py.VirtualSource("nonexistent.h5", "x", shape=(16, 16))
    h.create_virtual_dataset(name, layout, fillvalue=0)


def _group(h, name):
    h.create_group(name)


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("make, message", [
    (_unwritten_chunks, "unwritten chunks"),
    (_virtual, "virtual dataset"),
    (_group, "must be a dataset"),
    (None, "is missing"),
])
@pytest.mark.parametrize("name", ["holograms", "background"])
@pytest.mark.parametrize("command", ["inspect", "reconstruct"])
def test_small_files_that_announce_large_or_odd_arrays_are_refused_in_one_line(tmp_path, capsys, command, name,
                                                                                 make, message):
    path = tmp_path / "a.h5"
    _acquisition_file(path, **{name: make})
    assert path.stat().st_size < 2_000_000
    rss_before = _max_rss_mb()
    argv = [command, str(path)] + (["--out", str(tmp_path / "v.h5"), "--method", "formula"] if command == "reconstruct" else [])
    if command == "inspect" and name == "holograms" and make is _group:
        message = "must be a dataset"
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    # nothing near the announced 1.2 GB (or 64 GiB) was allocated
    assert _max_rss_mb() - rss_before < 200


@pytest.mark.parametrize("value, message", [
    (np.full((2, 7, 64, 64), np.nan, np.float32), "NaN"),
    (np.ones((2, 7, 64, 64), np.complex64), "complex"),
])
def test_complex_or_non_finite_holograms_are_refused(tmp_path, capsys, value, message):
    path = tmp_path / "a.h5"
    geometry = _acquisition_file(path)
    value = np.broadcast_to(value[:, :1, :1, :1], (2, geometry.n_views, *geometry.hologram_shape)).copy()
    _acquisition_file(path, holograms=value)
    with pytest.raises(FileFormatError, match=message):
        read_acquisition(path)
    assert main(["reconstruct", str(path), "--out", str(tmp_path / "v.h5"), "--method", "formula"]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "v.h5").exists()


def test_non_string_parameters_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "a.h5"
    _acquisition_file(path)
    with h5py.File(path, "a") as h:
        h.attrs["parameters"] = 7
    assert main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert "parameters" in err and len(err.strip().splitlines()) == 1
