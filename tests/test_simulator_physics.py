"""The simulator against physics: Jones calculus, refraction at a tilt, the Born field of a weak
sphere, energy conservation, anchoring of the droplet director fields, and the hologram round trip."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from biref_sdk.geometry import Geometry, preset
from biref_sdk.holography import CameraConfig, demodulate, expose, intensity
from biref_sdk.physics import MultiSlice, ViewWavevectors
from biref_sdk.samples import Droplet, director_field, sphere_sample, uniform_sample
from biref_sdk.simulate import SimulationConfig, Simulator

DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; no GPU on this machine")])]
WAVELENGTH_M = 532e-9
MEDIUM = 1.54
K0 = 2 * math.pi / WAVELENGTH_M


def make_geometry(n_px=32, volume=(8, 32, 32), voxel=(100e-9, 50e-9, 50e-9), sines=((0.0, 0.0),), na=1.2,
                  carriers=((45 / 128, 15 / 128), (-15 / 128, 45 / 128))):
    return Geometry(wavelength_m=WAVELENGTH_M, medium_index=MEDIUM, na_objective=na, pixel_size_m=50e-9,
                    illumination_sines=sines, reference_carriers=carriers,
                    hologram_shape=(n_px, n_px), volume_shape=volume, voxel_size_m=voxel)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("angle_deg", [0.0, 30.0, 45.0, 110.0])
def test_uniform_slab_matches_jones_calculus(angle_deg, device):
    """A slab filling the field of view with an in-plane optic axis is a linear retarder:
    J = R diag(exp(i phi_e), exp(i phi_o)) R^T with phi = k0 L (n - n_m)."""
    geometry = make_geometry()
    ne, no = 1.57, 1.545
    psi = math.radians(angle_deg)
    sample = uniform_sample(geometry, ne, no, director=(math.cos(psi), math.sin(psi), 0.0))
    fields = MultiSlice(geometry, device=device).transmit(sample.eps6).cpu()  # [2, 1, 2, H, W]
    thickness = geometry.volume_shape[0] * geometry.voxel_size_m[0]
    rotation = np.array([[math.cos(psi), -math.sin(psi)], [math.sin(psi), math.cos(psi)]])
    retarder = np.diag([np.exp(1j * K0 * thickness * (ne - MEDIUM)), np.exp(1j * K0 * thickness * (no - MEDIUM))])
    expected = rotation @ retarder @ rotation.T  # columns: input x, input y
    simulated = fields[:, 0, :, :, :].numpy()  # [pol, component, H, W]
    for p in range(2):
        for q in range(2):
            np.testing.assert_allclose(simulated[p, q], expected[q, p], atol=2e-5)


def test_optic_axis_along_beam_shows_no_birefringence():
    geometry = make_geometry()
    sample = uniform_sample(geometry, 1.57, 1.545, director=(0.0, 0.0, 1.0))
    fields = MultiSlice(geometry).transmit(sample.eps6)[:, 0, :, 5, 5].numpy()
    phase = np.exp(1j * K0 * geometry.volume_shape[0] * geometry.voxel_size_m[0] * (1.545 - MEDIUM))
    np.testing.assert_allclose(fields, phase * np.eye(2), atol=2e-5)


def test_tilted_isotropic_slab_phase_matches_snell():
    """At a tilt, the extra phase of a slab is L (k_z,slab - k_z,medium) (exact); the multi-slice
    model is first order in the contrast, so they agree to O(dn / n)."""
    sine = 0.6
    geometry = make_geometry(sines=((0.0, 0.0), (sine, 0.0)))
    n = MEDIUM + 0.01
    fields = MultiSlice(geometry).transmit(uniform_sample(geometry, n, n).eps6)
    background = MultiSlice(geometry).illumination()
    ratio = (fields[0, 1, 0] / background[0, 1, 0]).numpy()
    thickness = geometry.volume_shape[0] * geometry.voxel_size_m[0]
    exact = K0 * thickness * (math.sqrt(n**2 - (MEDIUM * sine) ** 2) - MEDIUM * math.sqrt(1 - sine**2))
    np.testing.assert_allclose(np.abs(ratio), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.angle(ratio), exact, rtol=0.01)
    # and the tilted-path length is what makes it differ from the on-axis view
    on_axis = np.angle((fields[0, 0, 0] / background[0, 0, 0]).numpy())
    np.testing.assert_allclose(on_axis, K0 * thickness * (n - MEDIUM), rtol=1e-4)


def born_field_of_sphere(geometry: Geometry, radius_m: float, index: float) -> np.ndarray:
    """First-Born scattered field in the focal plane for on-axis illumination, from the closed-form
    Fourier transform of a uniform sphere: U_s(k_T) = i/(2 k_z) V(k - k_in)."""
    H, W = geometry.hologram_shape
    p = geometry.pixel_size_m
    km = K0 * MEDIUM
    kx = 2 * math.pi * np.fft.fftfreq(W, p)[None, :]
    ky = 2 * math.pi * np.fft.fftfreq(H, p)[:, None]
    kz = np.sqrt(np.maximum(km**2 - kx**2 - ky**2, 1e-30))
    big_k = np.sqrt(kx**2 + ky**2 + (kz - km) ** 2)
    kr = np.maximum(big_k * radius_m, 1e-3)
    # (sin x - x cos x) / x^3, with its series where the closed form cancels catastrophically
    shape_ft = 4 * math.pi * radius_m**3 * np.where(kr < 1e-2, 1 / 3 - kr**2 / 30, (np.sin(kr) - kr * np.cos(kr)) / kr**3)
    potential = K0**2 * (index**2 - MEDIUM**2)
    spectrum = 1j / (2 * kz) * potential * shape_ft
    spectrum[kx**2 + ky**2 > (K0 * geometry.na_objective) ** 2] = 0
    # pixel centres sit at (j - W/2) p: shift the origin to the grid's centre
    centring = np.exp(1j * (kx * (W / 2) * p + ky * (H / 2) * p))
    return np.fft.ifft2(spectrum * np.conj(centring)) / p**2


def test_weak_sphere_matches_born_closed_form():
    geometry = make_geometry(n_px=96, volume=(24, 64, 64), voxel=(100e-9, 50e-9, 50e-9))
    radius, index = 0.8e-6, MEDIUM + 0.002
    optics = MultiSlice(geometry, substeps=2)
    fields = optics.transmit(sphere_sample(geometry, radius, index, supersample=4).eps6)
    scattered = (fields - optics.illumination())[0, 0, 0].numpy()  # x-polarized in, x out
    expected = born_field_of_sphere(geometry, radius, index)
    error = np.linalg.norm(scattered - expected) / np.linalg.norm(expected)
    assert error < 0.05, f"relative L2 error {error:.3f} against the Born field"


def test_energy_is_conserved_in_a_lossless_sample():
    """With an objective that collects all propagating light, a lossless droplet sample neither
    creates nor destroys power; the on-axis view's (x, y) basis is the propagation basis."""
    # carriers far out, so that the near-medium NA still leaves room for the sidebands
    geometry = make_geometry(n_px=64, volume=(16, 48, 48), na=MEDIUM - 1e-3, carriers=((0.35, 0.3), (-0.3, 0.35)))
    droplet = Droplet(center_m=(0, 0, 0), radius_m=1.0e-6, axis=(1, 1, 1), configuration="bipolar", ne=1.57, no=1.55)
    from biref_sdk.samples import droplet_sample

    optics = MultiSlice(geometry)
    fields = optics.transmit(droplet_sample([droplet], geometry).eps6)

    def power(f):
        # Poynting flux through the focal plane: each plane wave carries |E|^2 k_z / k_m, with the
        # E_z = -(k_T . E_T) / k_z of a transverse wave (the on-axis view's grid is the k_T grid)
        grid = ViewWavevectors.of(geometry)
        spectrum = torch.fft.fft2(f).numpy()
        kz = np.where(grid.propagating[0], grid.kz[0], 1.0)
        ez = -(grid.kx[0] * spectrum[:, 0] + grid.ky[0] * spectrum[:, 1]) / kz
        density = (np.abs(spectrum) ** 2).sum(1) + np.abs(ez) ** 2
        return (density * np.where(grid.propagating[0], kz / geometry.k_medium_per_m, 0.0)).sum((-2, -1))

    incident = power(optics.illumination()[:, 0])
    # the sample does scatter (the test is not vacuous) ...
    assert (fields - optics.illumination()).abs().max() > 0.1
    # ... and the power that leaves equals the power that came in
    np.testing.assert_allclose(power(fields[:, 0]) / incident, 1.0, atol=2e-4)


def test_empty_sample_gives_the_illumination():
    geometry = preset("small")
    simulator = Simulator(geometry)
    from biref_sdk.samples import Sample

    eps6 = torch.zeros(6, *geometry.volume_shape)
    eps6[:3] = MEDIUM**2
    empty = Sample(eps6, geometry.voxel_size_m, MEDIUM, {})
    np.testing.assert_allclose(simulator.fields(empty).numpy(), simulator.background_fields().numpy(), atol=1e-5)
    # the illumination is the input polarization (x^ or y^ projected perpendicular to k_in)
    pol = geometry.input_polarizations()
    centre = simulator.background_fields()[:, :, :, 64, 64]
    k_in = geometry.illumination_directions() * geometry.k_medium_per_m
    phase = np.exp(1j * (k_in[:, 0] * 0.0 + k_in[:, 1] * 0.0))
    np.testing.assert_allclose(centre.numpy(), pol[:, :, :2] * phase[None, :, None], atol=1e-5)


def test_director_fields_obey_their_anchoring():
    """Bipolar droplets have planar anchoring (director tangent to the surface, parallel to the
    axis at the poles); radial droplets homeotropic (director along the normal)."""
    radius = 1e-6
    rng = np.random.default_rng(1)
    normals = rng.normal(size=(500, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    surface = torch.as_tensor(normals * radius * 0.999)
    axis = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    for config, check in (("bipolar", lambda dot: np.abs(dot).max() < 0.06),
                          ("twisted_bipolar", lambda dot: np.abs(dot).max() < 0.06),
                          ("radial", lambda dot: np.abs(dot).min() > 0.999)):
        droplet = Droplet(center_m=(0, 0, 0), radius_m=radius, axis=tuple(axis), configuration=config,
                          ne=1.57, no=1.55, twist_rad=1.0)
        d = director_field(droplet, surface).numpy()
        np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-9)
        assert check(np.sum(d * normals, axis=1)), config
    bipolar = Droplet(center_m=(0, 0, 0), radius_m=radius, axis=tuple(axis), configuration="bipolar", ne=1.57, no=1.55)
    near_pole = torch.as_tensor(axis[None] * radius * 0.99)
    assert abs(float(director_field(bipolar, near_pole)[0] @ torch.as_tensor(axis))) > 0.999


@pytest.mark.parametrize("device", DEVICES)
def test_hologram_round_trip_returns_the_field(device):
    geometry = preset("small")
    simulator = Simulator(geometry, device=device)
    fields = simulator.fields(simulator.random_sample(np.random.default_rng(3)))[:, :6]
    amplitude = 1.3
    recovered = demodulate(intensity(fields, geometry, amplitude), geometry, device=device) / amplitude
    scale = fields.abs().max()
    assert (recovered - fields).abs().max() / scale < 1e-4


def test_camera_noise_is_shot_noise_limited():
    """Demodulated noisy fields scatter as shot noise predicts: a frame's white noise of variance
    <I>/e (intensity units, e photo-electrons per unit intensity) keeps the pupil's fraction
    f = pi r^2 of its power in the sideband, so |E| fluctuates by sqrt(f <I> / (2 e)) per draw,
    and the ratio of two independent draws by sqrt(f <I> / e) / |E|."""
    geometry = preset("small")
    camera = CameraConfig()
    simulator = Simulator(geometry, SimulationConfig(camera=camera))
    truth = simulator.background_fields()[:1, :4]  # x-polarized input, four views
    frames = np.stack([expose(intensity(truth, geometry), camera, torch.Generator().manual_seed(s)) for s in (1, 2)])
    fields = demodulate(frames.astype(np.float32), geometry)
    relative = (fields[0] / fields[1])[0, :, 0]  # x in, x out: the co-polarized field, two noise draws
    spread = torch.std(relative.abs(), dim=(-2, -1)).numpy()
    pupil_fraction = math.pi * geometry.pupil_radius_cycles_per_pixel**2
    mean_intensity = float(intensity(truth, geometry).mean())
    amplitude = truth[0, :, 0].abs().mean(dim=(-2, -1)).numpy()
    expected = np.sqrt(pupil_fraction * mean_intensity / camera.electrons_per_unit_intensity) / amplitude
    np.testing.assert_allclose(spread, expected, rtol=0.25)


def test_partial_volume_conserves_the_droplet_volume():
    """The voxel-averaged tensor holds the droplet's volume: sum over voxels of the liquid-crystal
    fraction equals 4/3 pi R^3 (to the sub-sampling's discretisation), however the work is sliced."""
    from biref_sdk.samples.tensor import voxelize_droplets

    shape, voxel = (24, 40, 40), (100e-9, 50e-9, 50e-9)
    n_m, n_lc = 1.54, 1.56
    radius = 0.83e-6  # not a multiple of the voxel size: many partial voxels
    droplet = Droplet(center_m=(13e-9, -21e-9, 37e-9), radius_m=radius, configuration="radial", ne=n_lc, no=n_lc,
                      axis=(0.0, 0.0, 1.0))
    whole = voxelize_droplets([droplet], shape, voxel, n_m, supersample=5)
    sliced = voxelize_droplets([droplet], shape, voxel, n_m, supersample=5, chunk_points=1)
    torch.testing.assert_close(sliced, whole, rtol=0, atol=0)
    fraction = (whole[0] - n_m**2) / (n_lc**2 - n_m**2)  # isotropic LC: eps_xx is the mixture
    volume_m3 = float(fraction.sum()) * np.prod(voxel)
    assert volume_m3 == pytest.approx(4 / 3 * np.pi * radius**3, rel=0.01)
    assert float(fraction.min()) >= -1e-6 and float(fraction.max()) <= 1 + 1e-6
