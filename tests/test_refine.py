"""The physics refinement and what it stands on: the differentiable forward model (against itself
without autograd and against finite differences), the camera noise measured in a frame's spectrum
(against the demodulated noise itself), and the fit against exact Mie scattering."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from biref_sdk.files import Volume
from biref_sdk.geometry import Geometry, preset
from biref_sdk.holography import CameraConfig, Demodulator, expose
from biref_sdk.metrics import director_angles_deg
from biref_sdk.physics import MultiSlice
from biref_sdk.reconstruction import get_reconstructor
from biref_sdk.reconstruction.consistency import ConsistencyCheck
from biref_sdk.reconstruction.refine import (PhysicsRefined, RefineOptions, Refiner, _aligned, _gaussian_smoother,
                                             _ParticleFit, particle_region)
from biref_sdk.samples import Droplet, droplet_sample
from biref_sdk.samples.droplets import director_field
from biref_sdk.samples.tensor import voxel_centres_m
from biref_sdk.simulate import SimulationConfig, Simulator

from mie_acquisition import CASES, mie_acquisition


def tiny_geometry(n_views=3) -> Geometry:
    return Geometry(wavelength_m=532e-9, medium_index=1.54, na_objective=1.2, pixel_size_m=50e-9,
                    illumination_sines=((0.0, 0.0), (0.5, 0.1), (-0.2, 0.6))[:n_views],
                    reference_carriers=((45 / 128, 15 / 128), (-15 / 128, 45 / 128)),
                    hologram_shape=(32, 32), volume_shape=(8, 24, 24), voxel_size_m=(100e-9, 50e-9, 50e-9))


def test_the_differentiable_transmit_is_transmit_and_its_gradient_the_finite_difference():
    g = tiny_geometry()
    droplet = Droplet((0.0, 0.0, 0.0), 0.45e-6, (1.0, 0.5, 0.7), "bipolar", 1.57, 1.55)
    eps6 = droplet_sample([droplet], g).eps6.double()
    optics = MultiSlice(g, dtype=torch.complex128)
    np.testing.assert_allclose(optics.transmit_differentiable(eps6).detach().numpy(), optics.transmit(eps6).numpy(),
                               rtol=0, atol=1e-12)

    weights = torch.randn(optics.transmit(eps6).shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    active = torch.ones(eps6.shape[1:], dtype=torch.bool)  # the medium's voxels too: the direction changes them

    def loss(e: torch.Tensor) -> torch.Tensor:
        return (optics.transmit_differentiable(e, active=active).abs() ** 2 * weights).sum()

    direction = torch.randn(eps6.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1e-3
    variable = eps6.clone().requires_grad_(True)
    loss(variable).backward()
    step = 1e-2
    finite = (loss(eps6 + step * direction) - loss(eps6 - step * direction)) / (2 * step)
    np.testing.assert_allclose(float((variable.grad * direction).sum()), float(finite), rtol=1e-5)


def test_the_camera_noise_measured_in_the_spectrum_is_that_of_the_demodulated_field():
    """Signal: a sphere's hologram with illumination and carriers off the FFT grid (the leakage the
    Hann window keeps out of the empty bins); noise: the camera's. The estimate from one noisy frame
    against the variance of the demodulated noise itself (noisy minus noise-free frame)."""
    g, radius_m, index = CASES["oil488"]
    acquisition = mie_acquisition("oil488")
    demodulate = Demodulator(g)
    clean = torch.as_tensor(acquisition.holograms[:, :3])
    camera = CameraConfig(electrons_per_unit_intensity=2000.0)
    noisy = torch.as_tensor(expose(clean, camera, torch.Generator().manual_seed(0)).astype(np.float32))
    noisy = (noisy - camera.offset_adu) * camera.gain_e_per_adu / camera.electrons_per_unit_intensity
    measured = (demodulate(noisy) - demodulate(clean)).abs().pow(2).mean(dim=(-3, -2, -1))  # per pixel and component
    estimate = demodulate.noise_variance(noisy)
    np.testing.assert_allclose(estimate.numpy(), measured.double().numpy(), rtol=0.1)
    assert float(demodulate.noise_variance(clean).max()) < 1e-6 * float(estimate.min())


def test_the_true_volumes_residual_is_the_camera_noise():
    """The consistency floor's physics: refit nothing, and the truth leaves exactly the noise."""
    g = preset("small")
    droplet = Droplet((0.1e-6, -0.2e-6, 0.0), 0.8e-6, (0.3, 0.5, 0.8), "radial", 1.566, 1.548)
    sample = droplet_sample([droplet], g)
    acquisition = Simulator(g, SimulationConfig()).acquire(sample, seed=4)
    check = ConsistencyCheck(g, "all")
    noise = check.frame_noise(acquisition.holograms) + check.frame_noise(acquisition.background)
    scattered, noise_energy = check.scattered_fields(check.demodulate(acquisition.holograms),
                                                     check.demodulate(acquisition.background), noise)
    simulated = MultiSlice(g).transmit(sample.eps6) - check._illumination
    residual = float((check.footprint_norm(scattered - simulated) ** 2).sum())
    np.testing.assert_allclose(residual / float(noise_energy.sum()), 1.0, atol=0.1)


def test_the_fit_recovers_a_spheres_index_from_exact_mie_fields():
    """Independent physics: exact Mie frames of the off-grid oil geometry (its volume not on the
    camera pitch), the fit started from the true shape with an index 0.005 too low."""
    g, radius_m, index = CASES["oil488"]
    acquisition = mie_acquisition("oil488")
    t = acquisition.truth
    low = Volume(np.where(t.ne > g.medium_index, index - 0.005, t.ne), np.where(t.no > g.medium_index, index - 0.005, t.no),
                 t.director, t.voxel_size_m, t.medium_index)
    refined = Refiner(g, RefineOptions(max_iterations=3)).refine(low, acquisition.holograms, acquisition.background)
    z, y, x = g.volume_coordinates_m()
    core = np.sqrt(z[:, None, None] ** 2 + y[None, :, None] ** 2 + x[None, None, :] ** 2) <= radius_m / 2
    report = refined.parameters["refinement"]
    assert report["steps"] == 3 and report["residual_squared"][-1] < 0.05 * report["residual_squared"][0]
    assert abs(float(refined.no[core].mean()) - index) < 0.0015 and abs(float(refined.ne[core].mean()) - index) < 0.0015
    assert np.abs(refined.ne - refined.no)[core].max() == 0  # an isotropic start stays isotropic


def test_the_region_that_moves_is_the_particles_grown():
    shape = (6, 10, 10)
    ne = np.full(shape, 1.54, np.float32)
    ne[3, 5, 5] = 1.55
    volume = Volume(ne, ne.copy(), np.zeros((3, *shape), np.float32), (1e-7, 5e-8, 5e-8), 1.54)
    region = particle_region(volume, 1e-3, 2).numpy()
    assert region.sum() == 5 * 5 * 5 and region[1:6, 3:8, 3:8].all()
    with pytest.raises(ValueError):
        RefineOptions(view_groups=0)


def test_smoothed_changes_see_one_director_sign_per_neighbourhood():
    """The director's sign is arbitrary; before the fit's changes are smoothed, neighbours agree."""
    shape = (8, 10, 10)
    axis = torch.tensor([0.6, 0.0, 0.8])
    signs = torch.where(torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.5, -1.0, 1.0)
    director = axis[:, None, None, None] * signs
    aligned = _aligned(director, torch.ones(shape), _gaussian_smoother(1.0, "cpu"))
    products = (aligned * aligned[:, :1, :1, :1]).sum(0)
    assert torch.allclose(products.abs(), torch.ones(shape)) and bool((products > 0).all())
    smoothed = _gaussian_smoother(1.0, "cpu")(torch.ones(1, *shape))
    assert torch.allclose(smoothed[0, 3:-3, 3:-3, 3:-3], torch.ones(2, 4, 4), atol=0.01)  # a constant passes


@pytest.mark.parametrize("model", ["voxels", "particles"])
def test_the_fit_does_not_depend_on_the_start_directors_signs(bipolar_droplet_acquisition, model):
    """Both models smooth their director changes, so each voxel's sign is first aligned with its
    neighbourhood's axis: a start whose signs are flipped at random refines to the same volume
    (but where a voxel's director is across its neighbourhood's axis: those may align either way)."""
    acquisition = bipolar_droplet_acquisition
    start = get_reconstructor("formula").reconstruct(acquisition)
    flips = np.where(np.random.default_rng(0).random(start.ne.shape) < 0.5, -1, 1).astype(np.float32)
    flipped = Volume(start.ne, start.no, start.director * flips, start.voxel_size_m, start.medium_index)
    refiner = Refiner(acquisition.geometry, RefineOptions(max_iterations=3, model=model))
    a, b = (refiner.refine(v, acquisition.holograms, acquisition.background) for v in (start, flipped))
    np.testing.assert_allclose(b.ne, a.ne, atol=1e-4)
    np.testing.assert_allclose(b.no, a.no, atol=1e-4)
    birefringent = torch.as_tensor(a.ne - a.no > 1e-3)

    def mean_angle_deg(d1, d2):
        return float(director_angles_deg(d1, d2)[birefringent].mean())

    # without the alignment the two differ by about as much as the fit moved the director
    assert mean_angle_deg(a.director, b.director) < 0.1 * mean_angle_deg(a.director, start.director)


def test_a_refined_reconstruction_fits_the_views_received_and_keeps_its_volume_when_the_fit_fails(
        bipolar_droplet_acquisition, monkeypatch, caplog):
    acquisition = bipolar_droplet_acquisition
    reconstructor = PhysicsRefined(get_reconstructor("formula"), RefineOptions(max_iterations=1))
    assert reconstructor.name == "formula+refined"
    session = reconstructor.start(acquisition.geometry, acquisition.background)
    for p in range(2):
        for v in range(acquisition.geometry.n_views):
            if (p, v) != (1, 5):
                session.add_view(p, v, acquisition.holograms[p, v])
    volume = session.finalize(allow_missing=True)
    report = volume.parameters["refinement"]
    assert report["steps"] == 1 and report["residual_squared"][1] < report["residual_squared"][0]

    def broken(*args, **kwargs):
        raise FloatingPointError("line search failed")

    monkeypatch.setattr(reconstructor.refiner_for(acquisition.geometry), "refine", broken)
    kept = reconstructor.reconstruct(acquisition)
    assert "refinement" not in kept.parameters and kept.parameters["refinement_error"].startswith("FloatingPointError")
    assert "refinement failed" in caplog.text


def test_reconstruct_refines_on_request_and_says_how(bipolar_droplet_acquisition, tmp_path, capsys):
    from biref_sdk.cli import main
    from biref_sdk.files import read_volume, write_acquisition

    write_acquisition(tmp_path / "a.h5", bipolar_droplet_acquisition)
    assert main(["reconstruct", str(tmp_path / "a.h5"), "--out", str(tmp_path / "v.h5"), "--refine-iterations", "1",
                 "--consistency-views", "3"]) == 0
    out = capsys.readouterr().out
    assert "refinement           residual^2" in out and "consistency" in out
    assert read_volume(tmp_path / "v.h5").parameters["refinement"]["steps"] == 1
    with pytest.raises(SystemExit):
        main(["serve", "--refine-iterations", "1"])  # not offered where every volume's latency counts


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; no GPU on this machine")
@pytest.mark.parametrize("options", [RefineOptions(max_iterations=2),
                                     RefineOptions(max_iterations=2, model="particles", fit_shapes=True)],
                         ids=["voxels", "particles-shapes"])
def test_the_refinement_on_cuda_follows_the_cpu(bipolar_droplet_acquisition, options):
    start = get_reconstructor("formula").reconstruct(bipolar_droplet_acquisition)
    refined = {device: Refiner(bipolar_droplet_acquisition.geometry, options, device)
               .refine(start, bipolar_droplet_acquisition.holograms, bipolar_droplet_acquisition.background)
               for device in ("cpu", "cuda")}
    cpu, cuda = refined["cpu"], refined["cuda"]
    np.testing.assert_allclose(cuda.parameters["refinement"]["residual_squared"],
                               cpu.parameters["refinement"]["residual_squared"], rtol=1e-3)
    np.testing.assert_allclose(cuda.ne, cpu.ne, atol=2e-4)
    np.testing.assert_allclose(cuda.no, cpu.no, atol=2e-4)


def test_closed_form_configurations_bring_a_scattered_director_home(bipolar_droplet_acquisition):
    """A start whose director scatters about the truth's (each voxel tilted by about 12 degrees, as a
    network's) and whose levels are off: the fields alone move the scattered director little in a few
    steps, the closed form found on it (bipolar) puts it within a few degrees, and the refit levels
    explain the fields as well as the free director does."""
    acquisition = bipolar_droplet_acquisition
    truth = acquisition.truth
    kick = np.random.default_rng(4).normal(scale=np.radians(12) / np.sqrt(2), size=truth.director.shape)
    director = truth.director + kick - (kick * truth.director).sum(0) * truth.director
    director /= np.linalg.norm(director, axis=0)
    medium = truth.medium_index
    start = Volume(medium + (truth.ne - medium) * 0.9, medium + (truth.no - medium) * 1.1,
                   director.astype(np.float32), truth.voxel_size_m, medium)
    free, configured = (Refiner(acquisition.geometry, RefineOptions(
        max_iterations=3, model="particles", fit_shapes=True, fit_configurations=closed_form,
        configuration_iterations=3)).refine(start, acquisition.holograms, acquisition.background)
        for closed_form in (False, True))
    report = configured.parameters["refinement"]
    assert [(row["configuration"], row["used"]) for row in report["configurations"]] == [("bipolar", True)]
    assert report["configurations_kept"]
    assert report["residual_squared"][-1] <= free.parameters["refinement"]["residual_squared"][-1] * 1.1
    birefringent = torch.as_tensor(truth.ne - truth.no > 1e-3)

    def median_angle_deg(volume):
        return float(director_angles_deg(truth.director, volume.director)[birefringent].median())

    assert median_angle_deg(configured) < 3.0 < 0.5 * median_angle_deg(free), (
        median_angle_deg(configured), median_angle_deg(free))
    core = torch.as_tensor(truth.ne - medium > 0.9 * (truth.ne.max() - medium)).numpy()
    # both levels back within 0.001 of the truth's (they started 0.0015-0.0025 off)
    for fitted, true in ((configured.ne, truth.ne), (configured.no, truth.no)):
        assert abs(np.median(fitted[core]) - np.median(true[core])) < 1e-3


def test_a_closed_form_the_fields_disagree_with_is_not_kept(bipolar_droplet_acquisition, monkeypatch):
    """The fields judge the closed form: a bipolar droplet given a radial director explains them
    worse than its free director, so the free fit is published and the report says so."""
    import biref_sdk.reconstruction.refine as refine_module
    from biref_sdk.reconstruction.configurations import configured_director

    acquisition = bipolar_droplet_acquisition
    truth = acquisition.truth

    def radial_instead(director, particles, voxel_size_m, birefringent, **kwargs):
        configured, rows = configured_director(director, particles, voxel_size_m, birefringent, **kwargs)
        spheroid = particles.spheroids[rows[0]["particle"] - 1]
        own = (particles.owner == rows[0]["particle"]) & (particles.occupancy > 0)
        z, y, x = voxel_centres_m(own.shape, voxel_size_m)
        zz, yy, xx = torch.meshgrid(z, y, x, indexing="ij")
        points = torch.stack([xx, yy, zz], -1)[torch.as_tensor(own)].double()
        centre = torch.as_tensor(spheroid.center_m, dtype=torch.float64)
        radial = (points - centre) / (points - centre).norm(dim=-1, keepdim=True).clamp_min(1e-12)
        configured[:, own] = radial.T.numpy()
        return configured, [{**rows[0], "configuration": "radial"}]

    monkeypatch.setattr(refine_module, "configured_director", radial_instead)
    # the two fits are compared to 1e-5: one thread, as threaded CPU sums vary in their last bits
    # and L-BFGS grows that (with 2 threads this test failed one run in two)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        options = dict(max_iterations=2, model="particles", fit_shapes=True, configuration_iterations=2)
        free = Refiner(acquisition.geometry, RefineOptions(**options)).refine(
            truth, acquisition.holograms, acquisition.background)
        judged = Refiner(acquisition.geometry, RefineOptions(**options, fit_configurations=True)).refine(
            truth, acquisition.holograms, acquisition.background)
    finally:
        torch.set_num_threads(threads)
    report = judged.parameters["refinement"]
    assert report["configurations"][0]["configuration"] == "radial" and not report["configurations_kept"]
    # the radial director raised the residual far beyond the tolerance, and the free fit is what is published
    assert report["configuration_residual_squared"][-1] > 2 * report["residual_squared"][-1]
    np.testing.assert_allclose(judged.director, free.director, atol=1e-5)
    np.testing.assert_allclose(judged.ne, free.ne, atol=1e-6)


def test_a_droplet_read_oblate_across_its_axis_is_restarted_prolate_along_it():
    """The shape fit's local minimum: an elongated bipolar droplet (aspect 1.4 along its axis) whose
    start is an oblate spheroid of its volume across that axis. Restarted prolate along the closed
    form's axis (found on the director), the fields choose the restart, which ends prolate along
    the truth's axis and explains them better than the fit that went on from the oblate start."""
    geometry = preset("small")
    axis = np.array([1.0, 0.0, 0.3]) / np.linalg.norm([1.0, 0.0, 0.3])
    truth_droplet = Droplet((0.0, 0.0, 0.0), 0.45e-6, tuple(axis), "bipolar", 1.565, 1.548, aspect=1.4)
    acquisition = Simulator(geometry).acquire(droplet_sample([truth_droplet], geometry), seed=3)
    across = np.cross(axis, [0.0, 1.0, 0.0])
    oblate = Droplet((0.0, 0.0, 0.0), 0.45e-6 * 2 ** (1 / 3), tuple(across / np.linalg.norm(across)), "uniform",
                     1.562, 1.550, aspect=0.7)
    start = droplet_sample([oblate], geometry).truth()
    z, y, x = voxel_centres_m(start.ne.shape, geometry.voxel_size_m)
    points = torch.stack(torch.meshgrid(x, y, z, indexing="ij"), -1).permute(2, 1, 0, 3).double()
    start.director = director_field(truth_droplet, points).permute(3, 0, 1, 2).float().numpy()
    options = dict(max_iterations=2, model="particles", fit_shapes=True, fit_configurations=True,
                   configuration_iterations=2, restart_iterations=4)
    went_on, restarted = (Refiner(geometry, RefineOptions(**options, restart_shapes=restart)).refine(
        start, acquisition.holograms, acquisition.background) for restart in (False, True))
    report = restarted.parameters["refinement"]
    assert [(r["restart"], r["kept"]) for r in report["shape_restarts"]][-1] == ("prolate", True), report
    fitted = report["particles"]["spheroids"][0]
    assert fitted["aspect"] > 1.2, fitted
    assert abs(np.dot(fitted["axis"], axis)) > np.cos(np.radians(10)), fitted
    assert report["residual_squared"][-1] < went_on.parameters["refinement"]["residual_squared"][-1]


def test_an_isotropic_bead_read_elongated_is_restarted_a_sphere_which_the_fields_keep():
    """An isotropic bead, a sphere, whose start is a prolate spheroid of its volume (aspect 1.4):
    after the droplets' tries the bead alone is restarted a sphere, and the fields keep it."""
    geometry = preset("small")
    bead = Droplet((0.0, 0.0, 0.0), 0.5e-6, (1.0, 0.0, 0.0), "uniform", 1.56, 1.56)
    acquisition = Simulator(geometry).acquire(droplet_sample([bead], geometry), seed=4)
    axis = np.array([1.0, 0.0, 0.5]) / np.linalg.norm([1.0, 0.0, 0.5])
    elongated = Droplet((0.0, 0.0, 0.0), 0.5e-6 / 1.4 ** (1 / 3), tuple(axis), "uniform", 1.558, 1.558, aspect=1.4)
    start = droplet_sample([elongated], geometry).truth()
    options = dict(max_iterations=2, model="particles", fit_shapes=True, fit_configurations=True,
                   configuration_iterations=2, restart_iterations=4)
    went_on, restarted = (Refiner(geometry, RefineOptions(**options, restart_shapes=restart)).refine(
        start, acquisition.holograms, acquisition.background) for restart in (False, True))
    report = restarted.parameters["refinement"]
    assert [(r["restart"], r["kept"]) for r in report["shape_restarts"]] == [("isotropic sphere", True)], report
    [fitted] = report["particles"]["spheroids"]
    assert fitted["aspect"] == 1.0, fitted
    assert went_on.parameters["refinement"]["particles"]["spheroids"][0]["aspect"] > 1.1
    assert report["residual_squared"][-1] < went_on.parameters["refinement"]["residual_squared"][-1]


def test_a_restarted_spheroid_keeps_its_centre_and_volume_and_a_checkpoint_brings_it_back():
    geometry = preset("small")
    droplet = Droplet((0.1e-6, 0.0, -0.1e-6), 0.5e-6, (1.0, 0.0, 0.0), "uniform", 1.56, 1.55, aspect=1.3)
    fit = _ParticleFit(droplet_sample([droplet], geometry).truth(),
                       RefineOptions(model="particles", fit_shapes=True), "cpu")
    [before] = fit.fitted_particles().spheroids
    assert before.aspect > 1.1
    saved = fit.checkpoint()
    fit.restart_spheroid(1, 1.0, (1.0, 0.0, 0.0))
    [sphere] = fit.fitted_particles().spheroids
    assert sphere.aspect == 1.0
    np.testing.assert_allclose(sphere.center_m, before.center_m, atol=1e-12)
    np.testing.assert_allclose(sphere.radius_m**3, before.radius_m**3 * before.aspect, rtol=1e-9)
    with torch.no_grad():
        fit.parameters[-1][0] += 1.0  # the spheroid's moves from the restart are undone too
    fit.restore(saved)
    [after] = fit.fitted_particles().spheroids
    assert after == before
    with pytest.raises(ValueError, match="fit_configurations"):
        RefineOptions(model="particles", fit_shapes=True, restart_shapes=True)
