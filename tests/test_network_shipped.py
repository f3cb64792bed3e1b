"""The trained `small` model shipped in trained_models/: it loads (checksum verified), refuses
another geometry, and turns a simulated acquisition into a finite volume in the index range."""
from __future__ import annotations

import numpy as np
import pytest

from biref_sdk.geometry import preset
from biref_sdk.network import GeometryMismatchError, load_model
from biref_sdk.network.io import shipped_model_path

SHIPPED = shipped_model_path("biref_small")


@pytest.fixture(scope="module")
def shipped():
    return load_model(SHIPPED, geometry=preset("small"))


def test_shipped_model_loads_with_its_checksum(shipped):
    assert len(shipped.sha256) == 64
    assert shipped.config.volume_shape == preset("small").volume_shape
    assert SHIPPED.stat().st_size < 8e6  # a few MB
    assert shipped.metadata["epoch"] >= 1


def test_shipped_model_refuses_the_paper_geometry():
    with pytest.raises(GeometryMismatchError):
        load_model(SHIPPED, geometry=preset("paper"))


def test_shipped_model_reconstructs_a_simulated_droplet(shipped):
    from biref_sdk import metrics
    from biref_sdk.reconstruction import get_reconstructor
    from biref_sdk.simulate import Simulator

    geometry = preset("small")
    simulator = Simulator(geometry)
    acquisition = simulator.acquire(simulator.random_sample(np.random.default_rng(12345)), seed=7)
    volume = get_reconstructor("model", model=shipped).reconstruct(acquisition)
    # no model given: the method uses the shipped one
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
