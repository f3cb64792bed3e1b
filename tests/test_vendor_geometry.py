"""The vendor workflow of docs/vendor-geometry.md at a tiny size: the geometry from a background
acquisition -> a simulated training set -> one epoch of training -> reconstruct with the model;
the model refuses another geometry with an error that says how to make one."""
from __future__ import annotations

import numpy as np
import pytest

from biref_sdk.cli import main
from biref_sdk.files import Acquisition, Dataset, read_geometry, write_acquisition
from biref_sdk.geometry import Geometry, ring_illumination_sines

pytest.importorskip("torch", reason="training needs torch")

# not a preset: 532 nm, NA 0.9, 60 nm pixels, 64 x 64 frames, 7 views, carriers off the FFT grid,
# a 12 x 32 x 32 volume of 150 x 120 x 120 nm voxels (the network's SSIM needs >= 11 planes)
VENDOR = Geometry(wavelength_m=532e-9, medium_index=1.54, na_objective=0.9, pixel_size_m=60e-9,
                  illumination_sines=ring_illumination_sines(7, 0.6, 1.54),
                  reference_carriers=((0.3317, 0.1183), (-0.1203, 0.3391)), hologram_shape=(64, 64),
                  volume_shape=(12, 32, 32), voxel_size_m=(150e-9, 120e-9, 120e-9))


@pytest.fixture(scope="module")
def background_file(tmp_path_factory):
    # what the vendor's instrument writes: an acquisition per docs/formats.md (here without a sample)
    path = tmp_path_factory.mktemp("vendor") / "background.h5"
    frames = np.full((2, VENDOR.n_views, *VENDOR.hologram_shape), 1000, np.uint16)
    write_acquisition(path, Acquisition(holograms=frames, background=frames, geometry=VENDOR))
    return path


def test_vendor_workflow_end_to_end(background_file, tmp_path, capsys):
    g = str(tmp_path / "geometry.json")
    assert main(["geometry", "write", str(background_file), "--out", g]) == 0
    assert read_geometry(g) == VENDOR
    assert main(["geometry", "check", g]) == 0
    train, val = str(tmp_path / "train.h5"), str(tmp_path / "val.h5")
    assert main(["simulate", "--geometry", g, "--n", "2", "--seed", "1", "--out", train]) == 0
    assert main(["simulate", "--geometry", g, "--n", "1", "--seed", "2", "--out", val]) == 0
    assert Dataset(train).geometry == VENDOR
    model_dir = tmp_path / "model"
    assert main(["train", "--geometry", g, "--data", train, "--val", val, "--out", str(model_dir), "--epochs", "1",
                 "--width", "tiny", "--no-progress", "--threads", "1"]) == 0
    # an acquisition of the vendor's geometry reconstructs with the model
    acquisition = str(tmp_path / "acq.h5")
    assert main(["simulate", "--geometry", g, "--sample", _volume(tmp_path), "--seed", "3", "--out", acquisition]) == 0
    capsys.readouterr()
    assert main(["reconstruct", acquisition, "--method", "model", "--model", str(model_dir / "best.h5"),
                 "--out", str(tmp_path / "v.h5")]) == 0
    # ... and a preset's acquisition is refused, with the way to make a model for it
    preset_acq = str(tmp_path / "preset.h5")
    assert main(["simulate", "--geometry", "small", "--sample", _volume(tmp_path, "small"), "--out", preset_acq]) == 0
    capsys.readouterr()
    assert main(["reconstruct", preset_acq, "--method", "model", "--model", str(model_dir / "best.h5"),
                 "--out", str(tmp_path / "w.h5")]) == 1
    error = capsys.readouterr().err
    assert "differs from the one the model was trained for" in error and "biref simulate --geometry" in error


def test_train_refuses_data_of_another_geometry(background_file, tmp_path, capsys):
    data = str(tmp_path / "small.h5")
    assert main(["simulate", "--geometry", "small", "--n", "1", "--out", data]) == 0
    capsys.readouterr()
    assert main(["train", "--geometry", str(background_file), "--data", data, "--val", data, "--out",
                 str(tmp_path / "m"), "--epochs", "1"]) == 1
    assert "biref simulate --geometry" in capsys.readouterr().err


def _volume(tmp_path, name="vendor") -> str:
    from biref_sdk.files import write_volume
    from biref_sdk.geometry import preset
    from biref_sdk.samples import eps6_to_volume, sphere_sample

    geometry = VENDOR if name == "vendor" else preset(name)
    path = tmp_path / f"{name}_volume.h5"
    sample = sphere_sample(geometry, 0.6e-6, 1.55)
    write_volume(path, eps6_to_volume(sample.eps6, sample.voxel_size_m, sample.medium_index))
    return str(path)
