"""Model files: round trip, checksum, corrupt and missing files, geometry checks; the model
reconstructor's incremental session against the whole forward pass."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from biref_sdk.files import Acquisition
from biref_sdk.network import (GeometryMismatchError, InputPreprocessor, ModelFileError, load_model, save_model)
from biref_sdk.reconstruction.model import ModelReconstructor

from test_network_model import tiny_geometry, tiny_network


@pytest.fixture
def model_file(tmp_path):
    network = tiny_network(seed=3)
    path = tmp_path / "tiny.h5"
    digest = save_model(path, network, tiny_geometry(), {"note": "test"})
    return path, network, digest


def test_round_trip_gives_the_same_network(model_file):
    path, network, digest = model_file
    loaded = load_model(path, geometry=tiny_geometry())
    assert loaded.sha256 == digest and loaded.metadata == {"note": "test"}
    assert loaded.config == network.config
    config = network.config
    windows = torch.randn(1, config.sequence_length, config.input_channels, 1, *config.input_shape)
    with torch.no_grad():
        for a, b in zip(network(windows), loaded.network(windows)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_changed_weight_fails_the_checksum(model_file):
    path = model_file[0]
    with h5py.File(path, "r+") as handle:
        name = next(iter(handle["weights"]))
        data = handle["weights"][name][()]
        data.flat[0] += 1e-3
        handle["weights"][name][...] = data
    with pytest.raises(ModelFileError, match="checksum"):
        load_model(path)


def test_missing_and_garbage_files_give_clear_errors(tmp_path, model_file):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope.h5")
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an hdf5 file at all" * 100)
    with pytest.raises(ModelFileError, match="corrupt"):
        load_model(garbage)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(model_file[0].read_bytes()[:2000])
    with pytest.raises(ModelFileError):
        load_model(truncated)


def test_geometry_mismatch_is_refused(model_file):
    path = model_file[0]
    other = tiny_geometry().replace(wavelength_m=633e-9)
    with pytest.raises(GeometryMismatchError, match="wavelength_m"):
        load_model(path, geometry=other)
    loaded = load_model(path)
    reconstructor = ModelReconstructor(loaded)
    bigger = tiny_geometry().replace(hologram_shape=(64, 64))
    with pytest.raises(GeometryMismatchError, match="hologram_shape"):
        reconstructor.start(bigger, np.ones((2, 7, 64, 64)))


def _acquisition(geometry, seed=0):
    rng = np.random.default_rng(seed)
    shape = (2, geometry.n_views, *geometry.hologram_shape)
    background = rng.poisson(3000, size=shape).astype(np.uint16)
    holograms = rng.poisson(3000, size=shape).astype(np.uint16)
    return Acquisition(holograms=holograms, background=background, geometry=geometry)


@pytest.mark.parametrize("order", ["in order", "shuffled"])
def test_session_equals_the_whole_forward(model_file, order):
    path = model_file[0]
    loaded = load_model(path)
    geometry = tiny_geometry()
    acquisition = _acquisition(geometry)
    windows = InputPreprocessor(loaded.config, geometry, acquisition.background).acquisition(acquisition.holograms)
    with torch.no_grad():
        ne, no, q = loaded.network(windows[None])
    session = ModelReconstructor(loaded).start(geometry, acquisition.background)
    views = [(p, v) for p in range(2) for v in range(geometry.n_views)]
    if order == "shuffled":
        views = [views[i] for i in np.random.default_rng(1).permutation(len(views))]
    for p, v in views:
        session.add_view(p, v, acquisition.holograms[p, v])
    volume = session.finalize()
    np.testing.assert_allclose(volume.ne, ne[0].numpy(), atol=2e-6)
    np.testing.assert_allclose(volume.no, no[0].numpy(), atol=2e-6)
    assert volume.director.shape == (3, *geometry.volume_shape)
    np.testing.assert_allclose(np.linalg.norm(volume.director, axis=0), 1.0, atol=1e-5)
    assert volume.parameters["method"] == "model" and volume.parameters["missing_views"] == 0


def test_session_with_missing_views(model_file):
    loaded = load_model(model_file[0])
    geometry = tiny_geometry()
    acquisition = _acquisition(geometry, seed=2)
    session = ModelReconstructor(loaded).start(geometry, acquisition.background)
    for v in range(geometry.n_views - 3):
        session.add_view(0, v, acquisition.holograms[0, v])
    with pytest.raises(ValueError, match="missing"):
        session.finalize()
    volume = session.finalize(allow_missing=True)
    assert np.isfinite(volume.ne).all() and volume.parameters["missing_views"] > 0
    assert volume.no.min() >= loaded.config.index_min and volume.ne.max() <= loaded.config.index_max


def test_reconstructor_without_a_model_uses_the_shipped_one():
    from biref_sdk.network.io import shipped_model_path

    assert ModelReconstructor(None).model.path == str(shipped_model_path())


def test_a_model_with_the_formula_prior_round_trips_and_its_session_equals_the_whole_forward(tmp_path):
    from biref_sdk.reconstruction.prior import formula_prior, formula_reconstructor

    network = tiny_network(seed=5, prior="formula", normalization="none")
    path = tmp_path / "prior.h5"
    save_model(path, network, tiny_geometry())
    with h5py.File(path, "r") as handle:
        assert handle.attrs["format_version"] == 5
    loaded = load_model(path)
    assert loaded.config == network.config and loaded.config.prior == "formula"
    geometry = tiny_geometry()
    acquisition = _acquisition(geometry, seed=4)
    windows = InputPreprocessor(loaded.config, geometry, acquisition.background).acquisition(acquisition.holograms)
    prior = formula_prior(formula_reconstructor(loaded.config).reconstruct(acquisition), loaded.config)
    with torch.no_grad():
        ne, no, q = loaded.network(windows[None], prior[None])
    session = ModelReconstructor(loaded).start(geometry, acquisition.background)
    views = [(p, v) for p in range(2) for v in range(geometry.n_views)]
    for i in np.random.default_rng(2).permutation(len(views)):
        p, v = views[i]
        session.add_view(p, v, acquisition.holograms[p, v])
    volume = session.finalize()
    # the formula session sums its views in arrival order (float32): index differences of ~1e-6
    np.testing.assert_allclose(volume.ne, ne[0].numpy(), atol=2e-5)
    np.testing.assert_allclose(volume.no, no[0].numpy(), atol=2e-5)
    assert volume.parameters["prior"] == "formula"


def test_an_unknown_format_version_is_refused(model_file):
    path = model_file[0]
    with h5py.File(path, "r+") as handle:
        handle.attrs["format_version"] = 6
    with pytest.raises(ModelFileError, match="format_version 6, this SDK reads 1, 2, 3, 4, 5"):
        load_model(path)


def test_a_format_1_file_reads_as_a_network_without_prior(model_file):
    import json

    from biref_sdk.network.io import _digest

    path, network, _ = model_file
    with h5py.File(path, "r+") as handle:  # what an SDK of model format 1 wrote: no prior keys
        config = json.loads(handle.attrs["config"])
        del config["prior"], config["prior_options"]
        config_json = json.dumps(config, sort_keys=True)
        weights = {name: handle["weights"][name][()] for name in handle["weights"]}
        handle.attrs["config"] = config_json
        handle.attrs["format_version"] = 1
        handle.attrs["sha256"] = _digest(config_json, handle.attrs["geometry"], weights)
    loaded = load_model(path)
    assert loaded.config == network.config and loaded.config.prior == "none"


def test_quarter_turn_session_is_the_mean_of_the_turned_whole_forwards_turned_back(tmp_path, model_file):
    from biref_sdk.network.config import config_for_geometry
    from biref_sdk.network.model import BirefNet
    from biref_sdk.reconstruction.prior import formula_prior, formula_reconstructor
    from biref_sdk.network.symmetry import quarter_turn_sources, turn_output, turn_prior, turn_views

    geometry = tiny_geometry(9)  # a ring of 8 views maps onto itself under a quarter turn
    torch.manual_seed(6)
    network = BirefNet(config_for_geometry(geometry, "tiny", window_length=2, prior="formula",
                                           normalization="none")).eval()
    path = tmp_path / "nine.h5"
    save_model(path, network, geometry)
    loaded = load_model(path)
    acquisition = _acquisition(geometry, seed=5)
    preprocessor = InputPreprocessor(loaded.config, geometry, acquisition.background)
    views = preprocessor.per_view(acquisition.holograms)
    prior = formula_prior(formula_reconstructor(loaded.config).reconstruct(acquisition), loaded.config)
    sources = quarter_turn_sources(geometry)
    answers = []
    with torch.no_grad():
        for turn in range(4):
            ne, no, q = loaded.network(preprocessor.window_mean(views)[None], prior[None])
            answers.append(turn_output(ne[0], no[0], q[0], -turn))
            views = turn_views(views, sources)
            prior = turn_prior(prior)
    expected_ne, expected_no, _ = (torch.stack(a).mean(dim=0) for a in zip(*answers))
    assert (answers[1][0] - answers[0][0]).abs().max() > 1e-4  # an untrained network is not turn-invariant

    session = ModelReconstructor(loaded, quarter_turns=True).start(geometry, acquisition.background)
    order = [(p, v) for p in range(2) for v in range(geometry.n_views)]
    for i in np.random.default_rng(3).permutation(len(order)):
        session.add_view(*order[i], acquisition.holograms[order[i]])
    volume = session.finalize()
    # the streamed formula prior differs from the whole one in float32 rounding (arrival order),
    # which the untrained network amplifies to ~2e-5; the turns differ from each other by > 1e-4
    np.testing.assert_allclose(volume.ne, expected_ne.numpy(), atol=4e-5)
    np.testing.assert_allclose(volume.no, expected_no.numpy(), atol=4e-5)
    assert volume.parameters["quarter_turns"] is True

    with pytest.raises(ValueError, match="quarter turn"):  # 7 views: a ring of 6
        ModelReconstructor(load_model(model_file[0]), quarter_turns=True).start(
            tiny_geometry(), _acquisition(tiny_geometry()).background)
    with pytest.raises(ValueError, match="True, False or None"):
        ModelReconstructor(loaded, quarter_turns="yes")
    # by default on exactly where the symmetry holds
    assert ModelReconstructor(loaded).quarter_turns is True
    assert ModelReconstructor(load_model(model_file[0])).quarter_turns is False


@pytest.mark.parametrize("quarter_turns", [False, True])
def test_a_preview_leaves_the_session_unchanged(tmp_path, quarter_turns):
    from biref_sdk.network.config import config_for_geometry
    from biref_sdk.network.model import BirefNet

    geometry = tiny_geometry(9)
    torch.manual_seed(7)
    save_model(tmp_path / "m.h5", BirefNet(config_for_geometry(geometry, "tiny", window_length=2,
                                                                normalization="none")).eval(), geometry)
    reconstructor = ModelReconstructor(load_model(tmp_path / "m.h5"), quarter_turns=quarter_turns)
    acquisition = _acquisition(geometry, seed=8)
    order = [(p, v) for v in range(geometry.n_views) for p in range(2)]
    plain, previewed = (reconstructor.start(geometry, acquisition.background) for _ in range(2))
    for i, (p, v) in enumerate(order):
        for session in (plain, previewed):
            session.add_view(p, v, acquisition.holograms[p, v])
        if i in (3, 10):  # mid-window and mid-sequence
            previewed.finalize(allow_missing=True)
    np.testing.assert_array_equal(previewed.finalize().ne, plain.finalize().ne)
