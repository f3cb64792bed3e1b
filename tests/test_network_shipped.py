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


def test_the_default_model_reports_no_birefringence_in_an_isotropic_sphere_and_keeps_a_droplets():
    """Issue 13's isotropic sphere (r 0.9 µm, n 1.552): the core's n_e - n_o within its goal of
    0.001 (measured 0.0001; stage 7, before the isotropy gate, 0.0031); a radial liquid-
    crystal droplet keeps its core birefringence (measured 0.0166 against the truth's 0.0169)."""
    from biref_sdk.metrics import _eroded, isotropic_core_birefringence
    from biref_sdk.reconstruction import get_reconstructor
    from biref_sdk.samples import droplet_sample, sphere_sample
    from biref_sdk.samples.droplets import Droplet
    from biref_sdk.simulate import Simulator

    geometry = preset("small")
    simulator = Simulator(geometry)
    reconstructor = get_reconstructor("model")
    sphere = simulator.acquire(sphere_sample(geometry, 0.9e-6, 1.552), seed=5)
    volume = reconstructor.reconstruct(sphere)
    truth = sphere.truth
    assert isotropic_core_birefringence(truth.ne, truth.no, volume.ne, volume.no, geometry.medium_index) < 0.0005
    droplet = Droplet(center_m=(0.0, 0.0, 0.0), radius_m=0.8e-6, axis=(0.0, 0.0, 1.0), configuration="radial",
                      ne=1.565, no=1.548)
    acquisition = simulator.acquire(droplet_sample([droplet], geometry), seed=6)
    volume, truth = reconstructor.reconstruct(acquisition), acquisition.truth
    core = _eroded((truth.ne - truth.no) > 1e-3, 2)
    expected = float((truth.ne - truth.no)[core].mean())
    assert float((volume.ne - volume.no)[core].mean()) == pytest.approx(expected, rel=0.08)
