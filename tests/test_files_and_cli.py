"""docs/formats.md round trips, atomic writes, clear errors, and the simulate/inspect commands."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from biref_sdk.cli import main
from biref_sdk.files import (Acquisition, Dataset, FileFormatError, Volume, atomic_h5, file_kind, read_acquisition,
                             read_volume, write_acquisition, write_volume)
from biref_sdk.geometry import GEOMETRY_ATTRIBUTES, Geometry, preset


def random_volume(rng, shape=(4, 6, 8)) -> Volume:
    director = rng.normal(size=(3, *shape))
    director /= np.linalg.norm(director, axis=0)
    no = 1.54 + 0.01 * rng.random(shape)
    return Volume(ne=no + 0.01, no=no, director=director, voxel_size_m=(1e-7, 5e-8, 5e-8), medium_index=1.54,
                  parameters={"made_by": "test"})


def test_volume_round_trip(tmp_path):
    volume = random_volume(np.random.default_rng(0))
    write_volume(tmp_path / "v.h5", volume)
    back = read_volume(tmp_path / "v.h5")
    for name in ("ne", "no", "director"):
        np.testing.assert_array_equal(getattr(back, name), getattr(volume, name))
    assert back.voxel_size_m == volume.voxel_size_m and back.parameters == {"made_by": "test"}
    with h5py.File(tmp_path / "v.h5") as h:
        assert h.attrs["kind"] == "volume" and h.attrs["format_version"] == 1 and "sdk_version" in h.attrs


def test_acquisition_round_trip_keeps_geometry_and_truth(tmp_path):
    geometry = preset("small")
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 4096, size=(2, geometry.n_views, *geometry.hologram_shape), dtype=np.uint16)
    truth = random_volume(rng, geometry.volume_shape)
    write_acquisition(tmp_path / "a.h5", Acquisition(frames, frames[::-1].copy(), geometry, truth, {"seed": 3}))
    back = read_acquisition(tmp_path / "a.h5")
    assert back.geometry == geometry
    np.testing.assert_array_equal(back.holograms, frames)
    np.testing.assert_array_equal(back.truth.director, truth.director)
    with h5py.File(tmp_path / "a.h5") as h:
        assert set(GEOMETRY_ATTRIBUTES) <= set(h.attrs)
        assert h.attrs["illumination_sines"].shape == (37, 2) and h.attrs["reference_carriers"].shape == (2, 2)


def test_wrong_shapes_and_kinds_give_clear_errors(tmp_path):
    geometry = preset("small")
    with pytest.raises(FileFormatError, match="holograms has shape"):
        Acquisition(np.zeros((2, 3, 8, 8)), np.zeros((2, 3, 8, 8)), geometry)
    write_volume(tmp_path / "v.h5", random_volume(np.random.default_rng(0)))
    with pytest.raises(FileFormatError, match="is a volume file, expected a acquisition"):
        read_acquisition(tmp_path / "v.h5")
    with h5py.File(tmp_path / "other.h5", "w") as h:
        h["x"] = 1
    with pytest.raises(FileFormatError, match="not a biref_sdk file"):
        file_kind(tmp_path / "other.h5")
    with h5py.File(tmp_path / "v.h5", "a") as h:
        h.attrs["format_version"] = 99
    with pytest.raises(FileFormatError, match="newer"):
        read_volume(tmp_path / "v.h5")


def test_a_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_h5(tmp_path / "x.h5") as h:
            h["a"] = np.zeros(10)
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_geometry_rejects_inconsistent_optics():
    small = preset("small")
    with pytest.raises(ValueError, match="DC term"):
        small.replace(reference_carriers=((0.2, 0.0), (0.0, 0.3)))
    with pytest.raises(ValueError, match="sidebands overlap"):
        small.replace(reference_carriers=((0.35, 0.12), (0.35, 0.14)))
    with pytest.raises(ValueError, match="inside the objective NA"):
        small.replace(illumination_sines=((0.9, 0.0),))
    with pytest.raises(ValueError, match="field of view"):
        small.replace(volume_shape=(32, 200, 64))
    assert Geometry.from_attributes(small.to_attributes(), small.hologram_shape) == small


def test_simulate_data_set_and_inspect(tmp_path, capsys):
    out = tmp_path / "data.h5"
    assert main(["simulate", "--preset", "small", "--n", "2", "--seed", "0", "--out", str(out)]) == 0
    data = Dataset(out)
    geometry = preset("small")
    assert len(data) == 2 and data.geometry == geometry
    frames = data.holograms(1)
    assert frames.shape == (2, 37, 128, 128) and frames.dtype == np.uint16
    truth = data.truth(1)
    assert truth.shape == geometry.volume_shape
    assert truth.ne.max() > truth.no.max() > 1.54 - 1e-6 and truth.ne.max() <= 1.57 + 1e-6
    np.testing.assert_allclose(np.linalg.norm(truth.director, axis=0), 1.0, atol=1e-5)
    with h5py.File(out) as h:
        assert h["holograms"].chunks == (1, 2, 37, 128, 128) and h["holograms"].compression == "gzip"
        assert json.loads(h.attrs["parameters"])["seed"] == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "dataset" and summary["n_samples"] == 2

    # the same seed regenerates the same samples
    again = tmp_path / "again.h5"
    main(["simulate", "--preset", "small", "--n", "1", "--seed", "0", "--out", str(again)])
    np.testing.assert_array_equal(Dataset(again).truth(0).ne, data.truth(0).ne)
    np.testing.assert_array_equal(Dataset(again).holograms(0), data.holograms(0))


def test_simulate_a_user_volume(tmp_path, capsys):
    geometry = preset("small")
    volume = random_volume(np.random.default_rng(2), (8, 40, 40))
    write_volume(tmp_path / "vol.h5", volume)
    assert main(["simulate", "--sample", str(tmp_path / "vol.h5"), "--preset", "small",
                 "--out", str(tmp_path / "acq.h5")]) == 0
    acquisition = read_acquisition(tmp_path / "acq.h5")
    assert acquisition.geometry.volume_shape == (8, 40, 40)
    assert acquisition.holograms.shape == (2, 37, *geometry.hologram_shape)
    np.testing.assert_allclose(acquisition.truth.ne, volume.ne, atol=1e-5)
    assert not np.array_equal(acquisition.holograms, acquisition.background)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "acq.h5")]) == 0
    assert "kind: acquisition" in capsys.readouterr().out


def test_cli_reports_a_missing_file_in_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.h5")]) == 1
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err
