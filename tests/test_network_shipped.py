"""The trained `small` models shipped in trained_models/ (the default, with the formula prior, and
the paper's network alone): each loads (checksum verified), refuses another geometry, and turns a
simulated acquisition into a finite volume in the index range."""
from __future__ import annotations

import numpy as np
import pytest

from biref_sdk.geometry import preset
from biref_sdk.network import GeometryMismatchError, load_model
from biref_sdk.network.io import shipped_model_path

PRIORS = {"biref_small": "formula", "biref_small_paper": "none"}


@pytest.fixture(scope="module", params=sorted(PRIORS))
def shipped(request):
    return load_model(shipped_model_path(request.param), geometry=preset("small"))


def test_shipped_model_loads_with_its_checksum(shipped):
    assert len(shipped.sha256) == 64
    assert shipped.config.volume_shape == preset("small").volume_shape
    assert shipped.config.prior == PRIORS[shipped.path.rsplit("/", 1)[-1][:-3]]
    assert sum(path.stat().st_size for path in shipped_model_path().parent.glob("*.h5")) < 8e6  # a few MB
    assert shipped.metadata["epoch"] >= 1


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_shipped_model_refuses_the_paper_geometry(name):
    with pytest.raises(GeometryMismatchError):
        load_model(shipped_model_path(name), geometry=preset("paper"))


def test_shipped_model_reconstructs_a_simulated_droplet(shipped):
    from biref_sdk import metrics
    from biref_sdk.reconstruction import get_reconstructor
    from biref_sdk.simulate import Simulator

    geometry = preset("small")
    simulator = Simulator(geometry)
    acquisition = simulator.acquire(simulator.random_sample(np.random.default_rng(12345)), seed=7)
    volume = get_reconstructor("model", model=shipped).reconstruct(acquisition)
    if shipped.path == str(shipped_model_path()):  # no model given: the method uses the default one
        default = get_reconstructor("model").reconstruct(acquisition)
        np.testing.assert_array_equal(default.ne, volume.ne)
    assert volume.shape == geometry.volume_shape
    for name in ("ne", "no"):
        values = getattr(volume, name)
        assert np.isfinite(values).all()
        assert values.min() >= shipped.config.index_min and values.max() <= shipped.config.index_max
    assert np.all(volume.ne >= volume.no)
    # a trained model finds the droplet: far better than a uniform medium-index guess
    truth = acquisition.truth
    blank = np.full(geometry.volume_shape, geometry.medium_index, np.float32)
    assert metrics.psnr(truth.ne, volume.ne) > metrics.psnr(truth.ne, blank) + 3.0


def test_a_missing_shipped_model_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="--model PATH"):
        shipped_model_path("no_such_model")
