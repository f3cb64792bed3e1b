"""The paper's network: shapes, output constraints, the stage-by-stage API, Q-tensor directors,
and the input preprocessing."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from biref_sdk.geometry import Geometry, preset, ring_illumination_sines
from biref_sdk.network import (BirefNet, InputPreprocessor, NetworkConfig, config_for_geometry,
                               fourier_downsample, q_from_director, window_layout)



def tiny_geometry(n_views: int = 7) -> Geometry:
    return Geometry(wavelength_m=532e-9, medium_index=1.54, na_objective=1.2, pixel_size_m=50e-9,
                    illumination_sines=ring_illumination_sines(n_views, 1.0, 1.54),
                    reference_carriers=((11 / 32, 4 / 32), (-4 / 32, 11 / 32)), hologram_shape=(32, 32),
                    volume_shape=(12, 16, 16), voxel_size_m=(100e-9, 50e-9, 50e-9))


def tiny_network(seed: int = 0, **overrides) -> BirefNet:
    torch.manual_seed(seed)
    config = config_for_geometry(tiny_geometry(), "tiny", window_length=2, **overrides)
    network = BirefNet(config)
    # non-trivial batch-norm statistics, so that evaluation mode is not an identity
    network.train()
    with torch.no_grad():
        prior = torch.randn(2, config.prior_channels, *config.volume_shape) if config.prior_channels else None
        for _ in range(2):
            network(torch.randn(2, config.sequence_length, config.input_channels, 1, *config.input_shape), prior)
    return network.eval()


def test_window_layout_follows_the_paper():
    assert window_layout(37, 6) == 6  # the paper: six feature maps from 37 views
    assert window_layout(37, 3) == 12
    assert window_layout(37, 4) == 8  # nine whole windows: odd, so one is dropped
    assert window_layout(37, 5) == 6  # seven -> six
    assert window_layout(37, 1) == 36
    with pytest.raises(ValueError):
        window_layout(37, 0)
    with pytest.raises(ValueError):
        window_layout(5, 3)  # one window: odd, nothing left


def test_paper_configuration_has_the_papers_shapes():
    config = config_for_geometry(preset("paper"), "paper", input_mode="hologram")
    assert config.input_shape == (512, 512)
    assert config.encoder_strides == (2, 2, 2, 2, 2)
    assert config.latent_shape == (1, 16, 16)  # the paper's 1x16x16 feature maps
    assert config.encoder_channels[-1] == 192 and config.hidden_channels == 512
    assert config.sequence_length == 6
    decoded = config.decoded_shape
    assert all(d >= v for d, v in zip(decoded, (80, 332, 332)))  # the final resize only trims


def test_small_configuration_decodes_the_volume_exactly():
    config = config_for_geometry(preset("small"), "small")
    assert config.decoded_shape == (32, 64, 64)
    assert config.input_shape == (64, 64)
    assert BirefNet(config).parameters().__next__() is not None
    n_bytes = 4 * sum(p.numel() for p in BirefNet(config).parameters())
    assert n_bytes < 5e6  # a few MB


@pytest.mark.parametrize("bad", [dict(input_mode="phase"), dict(attention="none"), dict(encoder_channels=(4, 4)),
                                 dict(index_min=1.6, index_max=1.5), dict(encoder_strides=(2, 2, 2, 2, 2)),
                                 dict(normalization="group"), dict(input_scale=0.0), dict(input_scale=math.inf)])
def test_bad_configuration_raises(bad):
    base = config_for_geometry(tiny_geometry(), "tiny").to_dict()
    base.update(bad)
    with pytest.raises(ValueError):
        NetworkConfig(**base)


def test_configuration_round_trips_through_a_dict():
    config = config_for_geometry(tiny_geometry(), "tiny")
    assert NetworkConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        NetworkConfig.from_dict({**config.to_dict(), "colour": 1})


@pytest.mark.parametrize("attention, normalization", [("position", "batch"), ("sequence", "batch"),
                                                      ("position", "none")])
def test_stage_by_stage_equals_the_whole_forward(attention, normalization):
    network = tiny_network(attention=attention, normalization=normalization, input_scale=3.0)
    config = network.config
    windows = torch.randn(2, config.sequence_length, config.input_channels, 1, *config.input_shape)
    with torch.no_grad():
        whole = network(windows)
        hidden = network.initial_hidden(2)
        states = []
        for t in range(config.sequence_length):
            features = network.encode(windows[:, t])
            assert features.shape == (2, config.encoder_channels[-1], *config.latent_shape)
            hidden = network.gru_step(hidden, features)
            states.append(hidden)
        staged = network.finalize(torch.stack(states, dim=1))
    for a, b in zip(whole, staged):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ne, no, q = whole
    assert ne.shape == no.shape == (2, *config.volume_shape)
    assert q.shape == (2, 5, *config.volume_shape)


def test_outputs_stay_in_the_index_range_with_ne_above_no():
    network = tiny_network()
    config = network.config
    # extreme inputs drive the sigmoids into saturation
    windows = 1e3 * torch.randn(3, config.sequence_length, config.input_channels, 1, *config.input_shape)
    with torch.no_grad():
        ne, no, _ = network(windows)
    assert torch.all(no >= config.index_min) and torch.all(ne <= config.index_max)
    assert torch.all(ne >= no)


@pytest.mark.parametrize("normalization", ["batch", "none"])
def test_a_samples_training_output_depends_on_its_batch_only_with_batch_normalization(normalization):
    # why "none" exists: in training mode batch statistics make one sample's output depend on the
    # other samples of its batch, so the absolute field amplitude (which fixes the index) is blurred
    network = tiny_network(normalization=normalization).train()
    config = network.config
    shape = (config.sequence_length, config.input_channels, 1, *config.input_shape)
    sample, partner_a, partner_b = torch.randn(shape), torch.randn(shape), 3 * torch.randn(shape)
    with torch.no_grad():
        with_a = network(torch.stack([sample, partner_a]))[1][0]
        with_b = network(torch.stack([sample, partner_b]))[1][0]
    differs = not torch.allclose(with_a, with_b, rtol=0, atol=1e-7)
    assert differs == (normalization == "batch")


def test_input_scale_multiplies_the_encoder_input():
    network = tiny_network(normalization="none", input_scale=4.0)
    unscaled = BirefNet(network.config.replace(input_scale=1.0))
    unscaled.load_state_dict(network.state_dict())
    window = torch.randn(1, network.config.input_channels, 1, *network.config.input_shape)
    with torch.no_grad():
        torch.testing.assert_close(network.encode(window), unscaled.eval().encode(4.0 * window))


def test_gradients_reach_the_first_layer():
    network = tiny_network().train()
    config = network.config
    windows = torch.randn(2, config.sequence_length, config.input_channels, 1, *config.input_shape)
    ne, no, q = network(windows)
    (ne.mean() + no.mean() + q.pow(2).mean()).backward()
    first = network.encoder[0].conv1.weight.grad
    assert first is not None and torch.isfinite(first).all() and first.abs().sum() > 0


def test_q_tensor_is_sign_free_and_gives_back_the_director():
    rng = np.random.default_rng(0)
    d = rng.normal(size=(3, 2, 3, 4))
    d /= np.linalg.norm(d, axis=0)
    director = torch.as_tensor(d, dtype=torch.float32)
    q = q_from_director(director)
    torch.testing.assert_close(q, q_from_director(-director))
    # the basis is orthonormal, so |q| equals the Frobenius norm of d d^T - I/3: sqrt(2/3)
    torch.testing.assert_close(q.norm(dim=0), torch.full(q.shape[1:], math.sqrt(2 / 3)), rtol=1e-5, atol=1e-5)
    from biref_sdk.reconstruction.model import director_from_q

    back = director_from_q(q)
    alignment = (back * director).sum(dim=0).abs()
    torch.testing.assert_close(alignment, torch.ones_like(alignment), rtol=1e-5, atol=1e-5)


def test_fourier_downsample_is_exact_for_band_limited_fields():
    n, factor = 32, 2
    y, x = np.mgrid[0:n, 0:n]
    f = (3 / n, -5 / n)  # below the coarse Nyquist frequency (1/4 cycle per fine pixel)
    field = torch.as_tensor(np.exp(2j * np.pi * (f[0] * x + f[1] * y)) * (1 + 0.5 * np.cos(2 * np.pi * 2 * y / n)),
                            dtype=torch.complex128)
    coarse = fourier_downsample(field, factor)
    torch.testing.assert_close(coarse, field[::factor, ::factor], rtol=1e-10, atol=1e-10)


def tiny_frames(geometry: Geometry, phase=None) -> np.ndarray:
    """Noise-free camera frames uint16[2, V, H, W] of the unit illuminations of docs/formats.md,
    multiplied by ``exp(i phase)`` (a thin phase object, phase [H, W]) if given."""
    from biref_sdk.holography import CameraConfig, expose, intensity

    h, w = geometry.hologram_shape
    yy, xx = np.mgrid[0:h, 0:w]
    scale = geometry.medium_index * geometry.pixel_size_m / geometry.wavelength_m
    pol = geometry.input_polarizations()
    fields = np.zeros((2, geometry.n_views, 2, h, w), complex)
    for v, (sx, sy) in enumerate(geometry.sines):
        wave = np.exp(2j * np.pi * scale * (sx * xx + sy * yy))
        for p in range(2):
            fields[p, v] = pol[p, v, :2, None, None] * wave
    if phase is not None:
        fields = fields * np.exp(1j * phase)
    return expose(intensity(torch.as_tensor(fields, dtype=torch.complex64), geometry), CameraConfig(noise=False))


def test_field_preprocessing_is_zero_for_the_background_and_sees_a_phase_object():
    geometry = tiny_geometry()
    config = config_for_geometry(geometry, "tiny", window_length=2)
    background = tiny_frames(geometry)
    pre = InputPreprocessor(config, geometry, background)
    zero = pre.acquisition(background)
    assert zero.shape == (config.sequence_length, config.input_channels, 1, *config.input_shape)
    assert zero.abs().max() == 0
    # a weak, smooth phase object: the x-polarized input's co-polarized channel picks up i*phi
    h, w = geometry.hologram_shape
    yy, xx = np.mgrid[0:h, 0:w]
    phi = 0.05 * np.exp(-((xx - w / 2) ** 2 + (yy - h / 2) ** 2) / (2 * 4.0**2))
    x = pre.acquisition(tiny_frames(geometry, phi))
    imag_x = x[0, 2, 0]  # window 0, polarization 0, Im(u_x)
    assert imag_x.max() > 0.5 * phi.max()
    peak = np.unravel_index(int(imag_x.argmax()), imag_x.shape)
    assert abs(peak[0] - h / 4) <= 2 and abs(peak[1] - w / 4) <= 2  # the object's centre, at half resolution


def test_preprocessor_rejects_a_wrong_background():
    geometry = tiny_geometry()
    config = config_for_geometry(geometry, "tiny", window_length=2)
    with pytest.raises(ValueError, match="background"):
        InputPreprocessor(config, geometry, np.ones((2, 3, 32, 32)))
    with pytest.raises(ValueError, match="non-positive"):
        InputPreprocessor(config.replace(input_mode="hologram"), geometry, np.zeros((2, 7, 32, 32)))


# -- the formula prior ------------------------------------------------------------------------------
def test_prior_configuration_records_every_formula_option():
    from biref_sdk.reconstruction.formula import FormulaOptions
    from biref_sdk.reconstruction.prior import with_prior_options

    config = with_prior_options(config_for_geometry(tiny_geometry(), "tiny", prior="formula",
                                                    prior_options={"shrinkage": 0.0}))
    assert config.prior_channels == 7
    assert set(config.prior_options) == set(FormulaOptions.__dataclass_fields__)
    assert config.prior_options["shrinkage"] == 0.0
    assert config.prior_options["regularization"] == FormulaOptions().regularization
    assert NetworkConfig.from_dict(config.to_dict()) == config
    assert config_for_geometry(tiny_geometry(), "tiny").prior_channels == 0
    base = config_for_geometry(tiny_geometry(), "tiny").to_dict()
    for bad in (dict(prior="learned"), dict(prior_options={"shrinkage": 0.0}), dict(prior="formula", prior_options=3)):
        with pytest.raises((ValueError, TypeError)):
            NetworkConfig(**{**base, **bad})
    with pytest.raises(ValueError, match="colour"):
        with_prior_options(NetworkConfig(**{**base, "prior": "formula", "prior_options": {"colour": 1}}))


def test_stage_by_stage_with_the_prior_equals_the_whole_forward():
    network = tiny_network(seed=4, prior="formula", normalization="none")
    config = network.config
    windows = torch.randn(2, config.sequence_length, config.input_channels, 1, *config.input_shape)
    prior = torch.randn(2, config.prior_channels, *config.volume_shape)
    with torch.no_grad():
        whole = network(windows, prior)
        hidden, states = network.initial_hidden(2), []
        for t in range(config.sequence_length):
            hidden = network.gru_step(hidden, network.encode(windows[:, t]))
            states.append(hidden)
        staged = network.finalize(torch.stack(states, dim=1), prior)
        other = network(windows, prior + 1.0)
    for a, b in zip(whole, staged):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(whole[0], other[0])  # the prior reaches the output


def test_the_prior_is_required_exactly_where_configured():
    with_prior = tiny_network(prior="formula")
    without = tiny_network()
    config = with_prior.config
    windows = torch.randn(1, config.sequence_length, config.input_channels, 1, *config.input_shape)
    with pytest.raises(ValueError, match="needs its 'formula' prior"):
        with_prior(windows)
    with pytest.raises(ValueError, match="needs its 'formula' prior"):
        with_prior(windows, torch.zeros(1, 7, 4, 4, 4))
    with pytest.raises(ValueError, match="takes no prior"):
        without(windows, torch.zeros(1, 7, *config.volume_shape))


def test_formula_prior_channels_of_a_uniform_uniaxial_volume():
    from biref_sdk.files import Volume
    from biref_sdk.reconstruction.prior import formula_prior

    config = config_for_geometry(tiny_geometry(), "tiny", prior="formula")
    shape = config.volume_shape
    director = np.zeros((3, *shape), np.float32)
    director[2] = -1.0  # along z; the sign must not matter
    volume = Volume(np.full(shape, 1.562, np.float32), np.full(shape, 1.546, np.float32), director,
                    (1e-7, 5e-8, 5e-8), 1.54)
    prior = formula_prior(volume, config).numpy()
    span = config.index_max - config.index_min
    assert prior.shape == (7, *shape)
    np.testing.assert_allclose(prior[0], (1.562 - 1.54) / span, rtol=1e-5)
    np.testing.assert_allclose(prior[1], (1.546 - 1.54) / span, rtol=1e-4)
    # d = z: d dᵀ - I/3 = diag(-1/3, -1/3, 2/3) is 2/sqrt(6) times the second basis matrix
    expected_q = np.array([0, 2 / math.sqrt(6), 0, 0, 0]) * (1.562 - 1.546) / span
    np.testing.assert_allclose(prior[2:, 0, 0, 0], expected_q, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        formula_prior(Volume(volume.ne[:2], volume.no[:2], director[:, :2], volume.voxel_size_m, 1.54), config)


def test_the_shared_director_equals_the_whole_volumes_also_with_a_busy_helper():
    """``director_from_q_shared``: the same values as ``director_from_q``, whether the helper thread
    takes its share or is busy (then the caller takes it back)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from biref_sdk.reconstruction.model import director_from_q, director_from_q_shared

    q = torch.randn(5, 6, 20, 30, generator=torch.Generator().manual_seed(4))
    expected = director_from_q(q)
    with ThreadPoolExecutor(1) as executor:
        assert torch.equal(director_from_q_shared(q, executor, chunk_voxels=500), expected)
        release = threading.Event()
        busy = executor.submit(release.wait)  # another session's decoder
        assert torch.equal(director_from_q_shared(q, executor, chunk_voxels=500), expected)
        release.set()
        busy.result()


def test_the_isotropy_gate_scales_only_the_birefringence_by_the_networks_own_order():
    """The gate leaves n_o and Q as they are and multiplies n_e - n_o by a factor in (0, 1): at its
    start sigmoid(20 max<|Q|> - 3), max<|Q|> the largest mean of the norm of the network's Q over
    5^3 voxels within 9^3 (here by whole 3D box filters, the network's are separable)."""
    import torch.nn.functional as F

    plain = tiny_network(seed=3, prior="formula", normalization="none", uncertainty_head=True)
    with torch.no_grad():  # an order between an isotropic particle's and a liquid crystal's
        plain.head.weight[2:] *= 0.01
        plain.head.bias[2:] *= 0.01
    gated = BirefNet(plain.config.replace(isotropy_gate=True)).eval()
    missing, unexpected = gated.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == ["isotropy.bias", "isotropy.weight"]
    config = plain.config
    torch.manual_seed(1)
    features = torch.randn(1, config.decoder_channels[-1], *config.decoded_shape)
    prior = torch.randn(1, config.prior_channels, *config.volume_shape)
    with torch.no_grad():
        ne, no, q, spread = plain.readout(features, prior)
        gated_ne, gated_no, gated_q, gated_spread = gated.readout(features, prior)
    assert torch.equal(gated_no, no) and torch.equal(gated_q, q) and torch.equal(gated_spread, spread)
    local = F.avg_pool3d(torch.linalg.vector_norm(q, dim=1, keepdim=True), 5, stride=1, padding=2,
                         count_include_pad=False)
    around = F.max_pool3d(local, 9, stride=1, padding=4)[:, 0]
    expected = no + (ne - no) * torch.sigmoid(20 * around - 3)
    torch.testing.assert_close(gated_ne, expected, atol=1e-6, rtol=0)
    assert torch.all(gated_ne >= gated_no) and torch.all(gated_ne <= ne)
    birefringent = (ne - no) > 1e-4
    gate = (gated_ne - no)[birefringent] / (ne - no)[birefringent]
    assert 0.1 < float(gate.min()) and float(gate.max()) < 0.5  # a low order: most of n_e - n_o removed
