"""Trust with every volume: the per-voxel uncertainty of the quarter turns and the physics consistency
score (re-simulation against the measured fields), in memory, in volume files, on the wire."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from biref_sdk.files import Acquisition, Consistency, Volume, read_volume, write_volume
from biref_sdk.geometry import preset
from biref_sdk.holography import intensity
from biref_sdk.reconstruction import get_reconstructor
from biref_sdk.reconstruction.consistency import ConsistencyCheck, ConsistencyChecked, checked_views
from biref_sdk.samples import sphere_sample
from biref_sdk.samples.tensor import eps6_to_volume
from biref_sdk.simulate import SimulationConfig, Simulator

from mie_reference import mie_scattered_fields


def scores(check: ConsistencyCheck, acquisition: Acquisition, volume: Volume) -> Consistency:
    views = check.views
    frames, background = acquisition.holograms[:, views], acquisition.background[:, views]
    return check.score(volume, check.demodulate(frames), check.demodulate(background),
                       noise_variance=check.frame_noise(frames) + check.frame_noise(background))


@pytest.fixture(scope="module")
def small_sphere():
    """A noise-free float acquisition of an isotropic sphere (n 1.555 in 1.54, r 0.8 um) in the small preset."""
    g = preset("small")
    sample = sphere_sample(g, 0.8e-6, 1.555)
    sim = Simulator(g)
    fields, empty = sim.fields(sample), sim.background_fields()
    truth = eps6_to_volume(sample.eps6, g.voxel_size_m, g.medium_index)
    return Acquisition(intensity(fields, g).numpy(), intensity(empty, g).numpy(), g, truth=truth)


def test_checked_views_are_the_axial_one_and_a_ring_spread():
    g = preset("small")
    views = checked_views(g, 5)
    assert views[0] == int(np.argmin(np.hypot(*g.sines.T))) and len(set(views)) == 5
    angles = np.sort(np.degrees(np.arctan2(g.sines[views[1:], 1], g.sines[views[1:], 0])) % 360)
    np.testing.assert_allclose(np.diff(angles), 90, atol=10)
    assert list(checked_views(g, "all")) == list(range(g.n_views))
    with pytest.raises(ValueError):
        checked_views(g, 0)


def test_the_true_volume_explains_noise_free_fields_and_an_empty_one_explains_none(small_sphere):
    check = ConsistencyCheck(small_sphere.geometry, 5)
    truth = scores(check, small_sphere, small_sphere.truth)
    assert truth.score < 0.01 and truth.noise_floor < 0.01      # quantisation-free: the check inverts the camera
    empty = small_sphere.truth
    empty = Volume(np.full_like(empty.ne, empty.medium_index), np.full_like(empty.no, empty.medium_index),
                   empty.director, empty.voxel_size_m, empty.medium_index)
    np.testing.assert_allclose(scores(check, small_sphere, empty).score, 1.0, atol=1e-6)
    t = small_sphere.truth
    wrong = Volume(np.where(t.ne > 1.541, 1.56, t.ne), np.where(t.no > 1.541, 1.56, t.no), t.director,
                   t.voxel_size_m, t.medium_index)
    assert scores(check, small_sphere, wrong).score > 0.3      # n 1.56 instead of 1.555
    birefringent = Volume(np.where(t.ne > 1.541, 1.56, t.ne), t.no, t.director, t.voxel_size_m, t.medium_index)
    residual = scores(check, small_sphere, birefringent).residual[:, check.views]
    # the director is along z: the axial view sees n_o alone, the ring views see n_e too
    axial = list(check.views).index(0)
    assert residual[:, axial].max() < 0.01 and np.delete(residual, axial, axis=1).max(axis=0).min() > 0.1


def test_the_score_does_not_depend_on_per_view_power_and_phase(small_sphere):
    """A real microscope's views differ in power and phase; sample and background frames share them."""
    check = ConsistencyCheck(small_sphere.geometry, 5)
    g = small_sphere.geometry
    sim = Simulator(g)
    sample = sphere_sample(g, 0.8e-6, 1.555)
    gains = torch.as_tensor(np.random.default_rng(0).uniform(0.5, 2.0, (2, g.n_views)))
    phases = torch.as_tensor(np.random.default_rng(1).uniform(0, 2 * np.pi, (2, g.n_views)))
    factor = (gains.sqrt() * torch.exp(1j * phases)).to(torch.complex64)[:, :, None, None, None]
    changed = Acquisition(intensity(sim.fields(sample) * factor, g).numpy(),
                          intensity(sim.background_fields() * factor, g).numpy(), g)
    assert scores(check, changed, small_sphere.truth).score < 0.01


def test_on_exact_mie_fields_the_true_sphere_scores_best():
    """Independent physics: frames of exact Mie scattering (n 1.552 in 1.54, r 0.9 um, the small
    preset). The true sphere's residual is the forward model's own error at high NA (under 2 %), far
    below that of a sphere 0.004 denser or 10 % smaller."""
    g, radius_m, index = preset("small"), 0.9e-6, 1.552
    check = ConsistencyCheck(g, 5)
    views = g.replace(illumination_sines=g.sines[check.views])
    illumination = Simulator(views).background_fields().to(torch.complex128)
    scattered = torch.from_numpy(mie_scattered_fields(views, radius_m, index))
    frames, empty = intensity(illumination + scattered, views).numpy(), intensity(illumination, views).numpy()
    measured, background = check.demodulate(frames), check.demodulate(empty)
    noise = check.frame_noise(frames) + check.frame_noise(empty)

    def sphere(radius, n):
        return eps6_to_volume(sphere_sample(g, radius, n).eps6, g.voxel_size_m, g.medium_index)

    truth = check.score(sphere(radius_m, index), measured, background, noise_variance=noise)
    assert np.nanmax(truth.residual) < 0.02
    for wrong in (sphere(radius_m, index + 0.004), sphere(0.9 * radius_m, index)):
        assert check.score(wrong, measured, background, noise_variance=noise).score > 10 * truth.score


def test_a_checked_reconstruction_carries_the_score_with_views_missing(small_sphere):
    reconstructor = ConsistencyChecked(get_reconstructor("formula"), views=5)
    session = reconstructor.start(small_sphere.geometry, small_sphere.background)
    views = reconstructor.check_for(small_sphere.geometry).views
    skipped = int(views[1])
    for p in range(2):
        for v in range(small_sphere.geometry.n_views):
            if not (p == 1 and v == skipped):
                session.add_view(p, v, small_sphere.holograms[p, v])
    volume = session.finalize(allow_missing=True)
    c = volume.consistency
    assert c.views_checked == 9 and np.isnan(c.residual[1, skipped]) and np.isfinite(c.residual[0, skipped])
    assert 0 < c.score < 1 and c.time_s > 0
    assert reconstructor.session_bytes(small_sphere.geometry) > get_reconstructor("formula").session_bytes(
        small_sphere.geometry)


def test_a_failed_check_keeps_the_volume_and_says_why(small_sphere, monkeypatch, caplog):
    reconstructor = ConsistencyChecked(get_reconstructor("formula"), views=1)

    def broken(*args, **kwargs):
        raise FloatingPointError("no convergence")

    monkeypatch.setattr(reconstructor.check_for(small_sphere.geometry), "score", broken)
    volume = reconstructor.reconstruct(small_sphere)
    assert volume.consistency is None and volume.ne.shape == small_sphere.truth.shape
    assert volume.parameters["consistency_error"] == "FloatingPointError: no convergence"
    assert "consistency check failed" in caplog.text


def test_volume_files_keep_the_trust_data(tmp_path):
    rng = np.random.default_rng(0)
    residual = np.full((2, 37), np.nan)
    residual[:, :5] = rng.random((2, 5))
    volume = Volume(rng.random((4, 5, 6)), rng.random((4, 5, 6)), rng.random((3, 4, 5, 6)), (1e-7, 5e-8, 5e-8), 1.54,
                    uncertainty=rng.random((3, 4, 5, 6)), consistency=Consistency(residual, 0.3, 0.2, 0.05))
    write_volume(tmp_path / "v.h5", volume)
    back = read_volume(tmp_path / "v.h5")
    np.testing.assert_array_equal(back.uncertainty, volume.uncertainty.astype(np.float32))
    np.testing.assert_allclose(back.consistency.residual, residual, rtol=1e-6)
    assert (back.consistency.score, back.consistency.views_checked) == (0.3, 10)
    plain = Volume(volume.ne, volume.no, volume.director, volume.voxel_size_m, 1.54)
    write_volume(tmp_path / "plain.h5", plain)
    assert read_volume(tmp_path / "plain.h5").uncertainty is None
    with pytest.raises(ValueError):
        Volume(volume.ne, volume.no, volume.director, volume.voxel_size_m, 1.54, uncertainty=np.zeros((2, 4, 5, 6)))


@pytest.mark.parametrize("quarter_turns", [True, None], ids=["measured by the turns", "the shipped model's default"])
def test_the_model_uncertainty_is_large_where_the_error_is(quarter_turns):
    """The quarter turns' spread (measured, or predicted by the shipped one-pass model's head), on
    a held-out simulated droplet: voxels in the top tenth of uncertainty have several times the
    error of the rest."""
    g = preset("small")
    sim = Simulator(g, SimulationConfig(droplets="single"))
    acquisition = sim.acquire(sim.random_sample(np.random.default_rng(9_000_001)), seed=9_000_001)
    reconstructor = get_reconstructor("model", engine="torch", quarter_turns=quarter_turns)
    volume = reconstructor.reconstruct(acquisition)
    u = volume.uncertainty
    assert u.shape == (3, *volume.shape) and (u >= 0).all() and (u[2] <= np.pi / 2 + 1e-6).all()
    error = np.abs(volume.ne - acquisition.truth.ne)
    top = u[0] >= np.quantile(u[0], 0.9)
    assert error[top].mean() > 3 * error[~top].mean()
    one_pass = get_reconstructor("model", engine="torch", quarter_turns=False).reconstruct(acquisition)
    assert (one_pass.uncertainty is None) == (not reconstructor.model.config.uncertainty_head)


def test_a_streamed_volume_carries_the_trust_data_to_a_subscriber_and_a_file(tmp_path):
    """The model with the check behind the real server: the subscriber's volume has the uncertainty
    and the consistency of the offline reconstruction, and so has the file --save-dir writes."""
    from biref_sdk.streaming.client import Producer, Subscriber
    from biref_sdk.streaming.microscope import SimulatedMicroscope
    from biref_sdk.streaming.server import StreamingServer
    from biref_sdk.streaming.service import ServiceConfig

    acquisition = SimulatedMicroscope("small", seed=0).acquisition(0)
    reconstructor = ConsistencyChecked(get_reconstructor("model", engine="torch"), views=3)
    offline = reconstructor.reconstruct(acquisition)
    config = ServiceConfig(status_interval_s=0.1, acquisition_timeout_s=120)
    with StreamingServer(reconstructor, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", config,
                         save_dir=tmp_path) as server, \
            Subscriber(server.results_address, topics=("volume", "error")) as subscriber:
        subscriber.wait_ready(60)
        with Producer(server.ingest_address, timeout_s=60) as producer:
            producer.send_acquisition(acquisition, "trusted")
            result = subscriber.wait_volume("trusted", 120)
    assert result.header["protocol"] == "biref/2" and result.header["arrays"][-1] == "uncertainty"
    np.testing.assert_allclose(result.volume.uncertainty, offline.uncertainty, atol=1e-6)
    streamed, expected = result.volume.consistency, offline.consistency
    assert streamed.views_checked == 6 and result.header["consistency"]["views_checked"] == 6
    np.testing.assert_allclose(streamed.residual, expected.residual, rtol=1e-4)
    np.testing.assert_allclose(streamed.score, expected.score, rtol=1e-3, atol=1e-6)
    saved = tmp_path / "trusted.h5"
    from test_streaming_support import wait_until

    wait_until(saved.exists, 60)
    np.testing.assert_array_equal(read_volume(saved).uncertainty, result.volume.uncertainty)
    assert read_volume(saved).consistency.score == pytest.approx(streamed.score)
