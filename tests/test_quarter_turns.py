"""Quarter-turn augmentation against the simulator: the turned inputs of a sample are the inputs
of the turned sample (and its truth and formula prior turn with it)."""
import dataclasses

import numpy as np
import pytest
import torch

from biref_sdk.files import Volume
from biref_sdk.geometry import preset
from biref_sdk.holography import CameraConfig
from biref_sdk.network.config import config_for_geometry
from biref_sdk.network.model import q_from_director
from biref_sdk.network.preprocess import InputPreprocessor
from biref_sdk.reconstruction.prior import formula_prior, formula_reconstructor
from biref_sdk.samples import random_sample, volume_sample
from biref_sdk.simulate import SimulationConfig, Simulator
from biref_sdk.network.symmetry import QuarterTurns, quarter_turn_sources, turn_image, turn_q

TURN = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def turned_volume(volume: Volume) -> Volume:
    """The sample turned by +90 degrees about z, built independently of the augmentation code:
    position (x, y) -> (-y, x) on the grid centred at index N/2."""
    def turn(a):  # new[.., y', x'] = old[.., y = -x', x = y']
        n = a.shape[-1]
        yi, xi = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        return a[..., (n - xi) % n, yi]
    director = np.einsum("ij,jzyx->izyx", TURN, volume.director)
    return dataclasses.replace(volume, ne=turn(volume.ne), no=turn(volume.no), director=turn(director))


@pytest.fixture(scope="module")
def pair():
    geometry = preset("small")
    simulator = Simulator(geometry, SimulationConfig(camera=CameraConfig(noise=False)))
    truth = random_sample(np.random.default_rng(7), geometry).truth()
    acquisitions = [simulator.acquire(volume_sample(v)) for v in (truth, turned_volume(truth))]
    config = config_for_geometry(geometry, "small", normalization="none", prior="formula")
    return geometry, config, acquisitions


def test_the_ring_maps_onto_itself_nine_views_per_quarter_turn():
    sources = quarter_turn_sources(preset("small"))
    assert sources[0] == 0  # the axial view stays
    # ring view k (azimuth (k - 1) * 10 degrees) comes from the view 90 degrees before it
    assert list(sources[1:]) == [(k - 1 - 9) % 36 + 1 for k in range(1, 37)]


def test_an_asymmetric_pattern_is_refused():
    geometry = preset("small")
    sines = geometry.sines.copy()
    sines[5] *= 0.9
    with pytest.raises(ValueError, match="quarter turn"):
        quarter_turn_sources(geometry.replace(illumination_sines=sines))


def test_four_turns_are_the_identity_and_q_turns_as_the_director():
    x = torch.randn(3, 8, 8)
    assert torch.equal(turn_image(turn_image(turn_image(turn_image(x)))), x)
    director = torch.nn.functional.normalize(torch.randn(3, 2, 6, 6), dim=0)
    turned = torch.as_tensor(turned_volume(Volume(np.ones((2, 6, 6)), np.ones((2, 6, 6)), director.numpy(),
                                                  (1, 1, 1), 1.0)).director)
    torch.testing.assert_close(turn_q(q_from_director(director)), q_from_director(turned), atol=1e-6, rtol=0)


def test_turned_inputs_truth_and_prior_are_those_of_the_turned_sample(pair):
    geometry, config, (original, turned) = pair
    per_view = [InputPreprocessor(config, geometry, a.background).per_view(a.holograms) for a in (original, turned)]
    formula = formula_reconstructor(config)
    priors = [formula_prior(formula.reconstruct(a), config) for a in (original, turned)]
    item = {"ne": torch.as_tensor(original.truth.ne), "no": torch.as_tensor(original.truth.no),
            "q": q_from_director(torch.as_tensor(original.truth.director)), "prior": priors[0]}
    views, augmented = QuarterTurns(geometry)(per_view[0], item, 1)

    signal = per_view[1].pow(2).mean().sqrt()
    error = (views - per_view[1]).pow(2).mean().sqrt() / signal
    print(f"turned inputs against the turned sample's: relative RMS {error:.2e}")
    assert error < 0.01
    # without the exchange of polarizations (or with the wrong sense of turn) it is far off
    assert (turn_image(per_view[0]) - per_view[1]).pow(2).mean().sqrt() > 0.3 * signal
    for name in ("ne", "no"):  # the truths went through the dielectric tensor: float32 round-off
        torch.testing.assert_close(augmented[name], torch.as_tensor(getattr(turned.truth, name)), atol=1e-6, rtol=0)
    torch.testing.assert_close(augmented["q"], q_from_director(torch.as_tensor(turned.truth.director)),
                               atol=1e-5, rtol=0)
    # the formula reconstruction turns with the sample, up to its float32 sums
    prior_scale = priors[1].pow(2).mean().sqrt()
    prior_error = (augmented["prior"] - priors[1]).pow(2).mean().sqrt() / prior_scale
    print(f"turned prior against the turned sample's: relative RMS {prior_error:.2e}")
    assert prior_error < 0.01


def test_several_turns_at_once_equal_single_turns_in_a_row():
    from biref_sdk.network.symmetry import turn_image, turn_q

    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    q = torch.randn(5, 4, 6, 6, dtype=torch.float64)
    stepped_x, stepped_q = x, q
    for turns in range(6):
        assert torch.equal(turn_image(x, turns), stepped_x)
        torch.testing.assert_close(turn_q(q, turns), stepped_q, rtol=0, atol=1e-12)
        stepped_x, stepped_q = turn_image(stepped_x), turn_q(stepped_q)
    assert torch.equal(turn_image(turn_image(x, 3), 1), x)
