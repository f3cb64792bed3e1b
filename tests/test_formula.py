"""The formula DTT reconstruction against physics: a weak isotropic sphere comes back with its index
and the medium around it, a uniform birefringent droplet with n_e > n_o and its director; the
reconstruction follows the file's own (non-preset) geometry, tolerates missing views when asked,
does not depend on the order views arrive in, and its parts (closed-form eigen-decomposition,
pruned transforms, constraint projections) match their direct definitions."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from biref_sdk.cli import main
from biref_sdk.files import read_volume, write_acquisition
from biref_sdk.geometry import Geometry, preset, ring_illumination_sines, snap_to_grid
from biref_sdk.reconstruction import get_reconstructor
from biref_sdk.reconstruction._eigen import symmetric_eigen, symmetric_eigen_full
from biref_sdk.reconstruction._fields import crop_shape
from biref_sdk.reconstruction._kspace import FourierPlan
from biref_sdk.reconstruction.formula import FormulaOptions, principal_indices, project_eigenvalues, shrink_tensors
from biref_sdk.samples import Droplet, droplet_sample, sphere_sample
from biref_sdk.simulate import Simulator

DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; no GPU on this machine")])]

SPHERE_RADIUS_M = 1.0e-6
SPHERE_INDEX = 1.545  # weak: 0.12 rad of phase through the centre, well inside Rytov's range
DROPLET_RADIUS_M = 1.1e-6
DROPLET_NE, DROPLET_NO = 1.565, 1.548
DROPLET_ANGLE_DEG = 30.0


def radius_map(geometry: Geometry) -> np.ndarray:
    z, y, x = np.meshgrid(*geometry.volume_coordinates_m(), indexing="ij")
    return np.sqrt(x**2 + y**2 + z**2)


def mean_index(volume) -> np.ndarray:
    return (volume.ne + volume.no) / 2


def assert_sphere(volume, geometry: Geometry, index: float, radius_m: float, tolerance: float = 1.5e-3) -> None:
    """Right index at the centre, the medium well outside, and no birefringence inside."""
    r = radius_map(geometry)
    centre = mean_index(volume)[r < radius_m / 2].mean()
    assert abs(centre - index) < tolerance, f"centre index {centre:.5f}, expected {index}"
    outside = mean_index(volume)[r > 1.3 * radius_m]
    medium = geometry.medium_index
    assert abs(outside.mean() - medium) < 3e-4, f"medium reads {outside.mean():.5f}, expected {medium}"
    assert np.percentile(np.abs(outside - medium), 99) < 2e-3
    assert np.median((volume.ne - volume.no)[r < 0.8 * radius_m]) < 2e-3  # isotropic


@pytest.fixture(scope="module")
def sphere_acquisition():
    geometry = preset("small")
    return Simulator(geometry).acquire(sphere_sample(geometry, SPHERE_RADIUS_M, SPHERE_INDEX), seed=0)


@pytest.fixture(scope="module")
def droplet_acquisition():
    geometry = preset("small")
    psi = math.radians(DROPLET_ANGLE_DEG)
    droplet = Droplet(center_m=(0.0, 0.0, 0.0), radius_m=DROPLET_RADIUS_M, axis=(math.cos(psi), math.sin(psi), 0.0),
                      configuration="uniform", ne=DROPLET_NE, no=DROPLET_NO)
    return Simulator(geometry).acquire(droplet_sample([droplet], geometry), seed=1)


@pytest.fixture(scope="module")
def reference_volume(sphere_acquisition):
    return get_reconstructor("formula").reconstruct(sphere_acquisition)


# -- physics ------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_weak_sphere_has_its_index_inside_and_the_medium_outside(sphere_acquisition, device):
    volume = get_reconstructor("formula", device=device).reconstruct(sphere_acquisition)
    assert volume.shape == sphere_acquisition.geometry.volume_shape
    assert_sphere(volume, sphere_acquisition.geometry, SPHERE_INDEX, SPHERE_RADIUS_M)


def test_weak_sphere_without_the_constraint_step(sphere_acquisition):
    """The plain Fourier-diffraction inversion alone is already right at the centre; it does not
    need the constraint step's prior to get there."""
    volume = get_reconstructor("formula", constraint_iterations=0, shrinkage=0.0).reconstruct(sphere_acquisition)
    r = radius_map(sphere_acquisition.geometry)
    assert abs(mean_index(volume)[r < SPHERE_RADIUS_M / 2].mean() - SPHERE_INDEX) < 1.5e-3
    assert abs(mean_index(volume)[r > 1.3 * SPHERE_RADIUS_M].mean() - 1.54) < 5e-4


@pytest.mark.parametrize("device", DEVICES)
def test_uniform_birefringent_droplet_gives_ne_no_and_the_director(droplet_acquisition, device):
    volume = get_reconstructor("formula", device=device).reconstruct(droplet_acquisition)
    core = radius_map(droplet_acquisition.geometry) < 0.6 * DROPLET_RADIUS_M
    ne, no = np.median(volume.ne[core]), np.median(volume.no[core])
    assert ne - no > 0.5 * (DROPLET_NE - DROPLET_NO), f"birefringence {ne - no:.4f}"
    assert abs(ne - DROPLET_NE) < 4e-3 and abs(no - DROPLET_NO) < 3e-3, (ne, no)
    director = volume.director[:, core]
    director = director * np.sign(director[0])  # the director is a line: x >= 0
    angle = np.degrees(np.arctan2(np.median(director[1]), np.median(director[0])))
    assert abs(angle - DROPLET_ANGLE_DEG) < 3.0, f"in-plane angle {angle:.1f} deg"
    assert np.median(np.abs(director[2])) < 0.1  # in the focal plane


# -- geometry, missing views, order --------------------------------------------------------------

def custom_geometry() -> Geometry:
    """Nothing like a preset: another wavelength, medium, NA, pixel, ring and volume grid."""
    wavelength_m, medium, pixel_m = 633e-9, 1.52, 55e-9
    sines = snap_to_grid(ring_illumination_sines(25, na_illumination=0.9, medium_index=medium),
                         wavelength_m=wavelength_m, medium_index=medium, pixel_size_m=pixel_m, grid_px=128)
    return Geometry(wavelength_m=wavelength_m, medium_index=medium, na_objective=1.1, pixel_size_m=pixel_m,
                    illumination_sines=sines, reference_carriers=((45 / 128, 15 / 128), (-15 / 128, 45 / 128)),
                    hologram_shape=(128, 128), volume_shape=(24, 56, 56), voxel_size_m=(120e-9, pixel_m, pixel_m))


def test_cli_reconstructs_a_file_with_its_own_geometry(tmp_path, capsys):
    geometry = custom_geometry()
    index = geometry.medium_index + 0.005
    acquisition = Simulator(geometry).acquire(sphere_sample(geometry, SPHERE_RADIUS_M, index), seed=2)
    write_acquisition(tmp_path / "acq.h5", acquisition)
    assert main(["reconstruct", str(tmp_path / "acq.h5"), "--out", str(tmp_path / "vol.h5"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shape"] == [24, 56, 56] and "metrics" in summary  # the file carries its truth
    volume = read_volume(tmp_path / "vol.h5")
    assert volume.voxel_size_m == geometry.voxel_size_m and volume.medium_index == geometry.medium_index
    assert volume.parameters["views_used"] == 25
    assert_sphere(volume, geometry, index, SPHERE_RADIUS_M)
    # the consistency check is on by default offline, in this geometry too: the formula's sphere
    # explains most of the scattered field
    assert summary["consistency"]["views_checked"] == 10 and volume.consistency.views_checked == 10
    assert 0 <= volume.consistency.score < 0.5 and volume.uncertainty is None


def test_volume_grid_off_the_camera_pitch(sphere_acquisition):
    """A volume grid coarser than the camera pixels (a user's volume) reconstructs too, with the
    constraint iterations (run on a camera-pitch working grid, then interpolated)."""
    geometry = sphere_acquisition.geometry.replace(volume_shape=(16, 32, 32), voxel_size_m=(200e-9, 100e-9, 100e-9))
    session = get_reconstructor("formula").start(geometry, sphere_acquisition.background)
    for p in range(2):
        for v in range(geometry.n_views):
            session.add_view(p, v, sphere_acquisition.holograms[p, v])
    volume = session.finalize()
    assert volume.shape == (16, 32, 32) and volume.parameters["constraint_iterations_run"] == 5
    assert_sphere(volume, geometry, SPHERE_INDEX, SPHERE_RADIUS_M, tolerance=2e-3)


def test_missing_views_need_allow_missing(sphere_acquisition):
    acquisition = sphere_acquisition
    session = get_reconstructor("formula").start(acquisition.geometry, acquisition.background)
    absent = {(0, 3), (1, 3), (0, 17), (1, 17), (1, 20)}  # views 3 and 17 gone, view 20 half
    for p in range(2):
        for v in range(acquisition.geometry.n_views):
            if (p, v) not in absent:
                session.add_view(p, v, acquisition.holograms[p, v])
    with pytest.raises(ValueError, match="3 views incomplete"):
        session.finalize()
    volume = session.finalize(allow_missing=True)
    assert volume.parameters["missing_views"] == [3, 17, 20] and volume.parameters["views_used"] == 34
    assert_sphere(volume, acquisition.geometry, SPHERE_INDEX, SPHERE_RADIUS_M)


def test_no_complete_view_is_an_error(sphere_acquisition):
    session = get_reconstructor("formula").start(sphere_acquisition.geometry, sphere_acquisition.background)
    session.add_view(0, 0, sphere_acquisition.holograms[0, 0])
    with pytest.raises(ValueError, match="no complete view"):
        session.finalize(allow_missing=True)


def test_views_in_any_order_and_interleaved_sessions_give_the_same_volume(sphere_acquisition, reference_volume):
    """The streaming runtime feeds views as they come, for several acquisitions at once."""
    acquisition = sphere_acquisition
    reconstructor = get_reconstructor("formula")
    pairs = [(p, v) for p in range(2) for v in range(acquisition.geometry.n_views)]
    order = np.random.default_rng(0).permutation(len(pairs))
    shuffled = reconstructor.start(acquisition.geometry, acquisition.background)
    in_order = reconstructor.start(acquisition.geometry, acquisition.background)
    for i, j in zip(order, range(len(pairs))):
        shuffled.add_view(*pairs[i], acquisition.holograms[pairs[i]])
        in_order.add_view(*pairs[j], acquisition.holograms[pairs[j]])
    for volume in (shuffled.finalize(), in_order.finalize()):
        for name in ("ne", "no"):  # float32 sums in another order: equal to rounding
            np.testing.assert_allclose(getattr(volume, name), getattr(reference_volume, name), atol=2e-6)
    with pytest.raises(ValueError, match="duplicate view"):
        shuffled.add_view(0, 0, acquisition.holograms[0, 0])


def test_index_bounds_hold_in_the_output(sphere_acquisition):
    bounds = (1.542, 1.5445)  # tighter than the sample on purpose: both bounds bind
    volume = get_reconstructor("formula", index_bounds=bounds).reconstruct(sphere_acquisition)
    for n in (volume.ne, volume.no):
        assert n.min() >= bounds[0] - 1e-6 and n.max() <= bounds[1] + 1e-6
    assert np.isclose(volume.ne.max(), bounds[1], atol=1e-6)  # the sphere (1.545) hits the top
    outside = radius_map(sphere_acquisition.geometry) > 1.3 * SPHERE_RADIUS_M
    assert np.isclose(np.median(volume.no[outside]), bounds[0], atol=1e-6)  # the medium (1.54) the bottom


def test_options_are_checked():
    with pytest.raises(ValueError, match="unknown formula options: bogus"):
        get_reconstructor("formula", bogus=1)
    for bad in ({"constraint_iterations": -1}, {"shrinkage": -1e-3}, {"index_bounds": (1.57, 1.54)},
                {"z_oversampling": 0.5}, {"late_views": -1}, {"late_views": 5, "late_iterations": 0},
                {"late_views": 5, "late_iterations": 6}):
        with pytest.raises(ValueError):
            FormulaOptions(**bad)
    geometry = preset("small")
    with pytest.raises(ValueError, match="late_views 37 must be below the 37 views"):
        get_reconstructor("formula", late_views=37).start(geometry, np.zeros((2, 37, *geometry.hologram_shape)))


def test_warm_start_runs_before_the_late_views_and_keeps_the_physics(sphere_acquisition, droplet_acquisition):
    """``late_views``: the constraint iterations but the last start once the early views are in; the
    volume is the same for any arrival order and for a preview's later finalize, and as right."""
    acquisition = droplet_acquisition
    geometry = acquisition.geometry
    reconstructor = get_reconstructor("formula", late_views=12)
    offline = reconstructor.reconstruct(acquisition)
    assert offline.parameters["constraint_iterations_after_last_view"] == 1
    session = reconstructor.start(geometry, acquisition.background)
    late = [(p, v) for v in range(25, 37) for p in range(2)]
    early = [(p, v) for v in range(25) for p in range(2)]
    rng = np.random.default_rng(1)
    for p, v in [late[i] for i in rng.permutation(len(late))[:6]] + [early[i] for i in rng.permutation(len(early))]:
        session.add_view(p, v, acquisition.holograms[p, v])
    assert session._warm_start is not None  # started with the last early view, before the late ones
    preview = session.finalize(allow_missing=True)  # late views missing: every iteration now, on what is there
    assert preview.parameters["constraint_iterations_after_last_view"] == 5
    for p, v in late:
        if not session.received[p, v]:
            session.add_view(p, v, acquisition.holograms[p, v])
    streamed = session.finalize()
    for name in ("ne", "no"):
        np.testing.assert_allclose(getattr(streamed, name), getattr(offline, name), atol=2e-6)
    # as right as five iterations after the last view: the droplet's indices and director
    cold = get_reconstructor("formula").reconstruct(acquisition)
    inside = radius_map(geometry) < 0.5 * DROPLET_RADIUS_M
    for volume in (offline, cold):
        assert abs(np.median(volume.ne[inside]) - DROPLET_NE) < 3e-3
        assert abs(np.median(volume.no[inside]) - DROPLET_NO) < 3e-3
    assert abs(np.median(offline.ne[inside]) - np.median(cold.ne[inside])) < 1e-3
    psi = math.radians(DROPLET_ANGLE_DEG)
    cosine = np.abs(offline.director[0] * math.cos(psi) + offline.director[1] * math.sin(psi))[inside]
    assert np.degrees(np.arccos(np.median(cosine))) < 5.0
    assert_sphere(get_reconstructor("formula", late_views=12).reconstruct(sphere_acquisition), geometry,
                  SPHERE_INDEX, SPHERE_RADIUS_M)


def test_evaluate_cli_passes_formula_options(tmp_path, capsys):
    assert main(["simulate", "--preset", "small", "--n", "1", "--seed", "3", "--out", str(tmp_path / "d.h5")]) == 0
    capsys.readouterr()
    scores = {}
    for iterations in (0, 5):
        assert main(["evaluate", str(tmp_path / "d.h5"), "--method", "formula", "--json",
                     "--option", f"constraint_iterations={iterations}"]) == 0
        scores[iterations] = json.loads(capsys.readouterr().out)["formula"]
    # the option reached the reconstruction: the constraint step changes (here: improves) it
    assert scores[5]["rmse_no"] < scores[0]["rmse_no"]


def test_an_evaluation_split_in_parts_scores_the_samples_of_the_whole(tmp_path):
    from biref_sdk.evaluation import MethodScores, evaluate

    assert main(["simulate", "--preset", "small", "--n", "3", "--seed", "5", "--out", str(tmp_path / "d.h5")]) == 0
    formula = {"formula": get_reconstructor("formula")}
    whole, first, rest = ({"formula": MethodScores("formula")} for _ in range(3))
    evaluate(tmp_path / "d.h5", formula, scores=whole)
    evaluate(tmp_path / "d.h5", formula, scores=first, limit=1)
    assert evaluate(tmp_path / "d.h5", formula, scores=rest, first=1, limit=5)["formula"]["n_samples"] == 2
    assert first["formula"].samples + rest["formula"].samples == whole["formula"].samples
    with pytest.raises(ValueError, match="first"):
        evaluate(tmp_path / "d.h5", formula, first=-1)


# -- parts against their definitions ----------------------------------------------------------------

def random_symmetric(rng, n):
    m = rng.normal(size=(n, 3, 3))
    m = m + m.transpose(0, 2, 1)
    axis = rng.normal(size=(n // 4, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    m[: n // 4] = 0.01 * np.eye(3) + 0.02 * axis[:, :, None] * axis[:, None, :]  # uniaxial, prolate
    m[n // 4: n // 2] = 0.03 * np.eye(3) - 0.02 * axis[:, :, None] * axis[:, None, :]  # uniaxial, oblate
    m[n // 2: n // 2 + 10] = 0.01 * np.eye(3)  # isotropic
    return m


def as_t6(m: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.stack([m[:, 0, 0], m[:, 1, 1], m[:, 2, 2], m[:, 0, 1], m[:, 0, 2], m[:, 1, 2]]))


def test_closed_form_eigen_decomposition_matches_eigh():
    m = random_symmetric(np.random.default_rng(0), 4000)
    values, vectors = np.linalg.eigh(m)
    full_values, basis = symmetric_eigen_full(as_t6(m))
    np.testing.assert_allclose(full_values.numpy().T, values, atol=1e-9)
    V = basis.numpy().transpose(2, 1, 0)  # [n, xyz, which]
    np.testing.assert_allclose(V @ (full_values.numpy().T[:, :, None] * V.transpose(0, 2, 1)), m, atol=1e-9)
    np.testing.assert_allclose(V.transpose(0, 2, 1) @ V, np.broadcast_to(np.eye(3), m.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(V), 1.0, atol=1e-12)
    # float32: arccos loses half the digits at an exact degeneracy (the oblate tensors here)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-5)):
        largest, smallest, top = symmetric_eigen(as_t6(m).to(dtype))
        np.testing.assert_allclose(largest.double().numpy(), values[:, 2], atol=tol)
        np.testing.assert_allclose(smallest.double().numpy(), values[:, 0], atol=tol)
        separated = values[:, 2] - values[:, 1] > 1e-3
        alignment = np.abs(np.einsum("in,ni->n", top.double().numpy(), vectors[:, :, 2]))
        np.testing.assert_allclose(alignment[separated], 1.0, atol=10 * tol)
    # scale-free: tiny (a projected medium voxel) and huge tensors, float32 included
    for scale in (1e-30, 1e25):
        for dtype in (torch.float32, torch.float64):
            largest, smallest, top = symmetric_eigen(as_t6(m).to(dtype) * scale)
            assert torch.isfinite(top).all()
            np.testing.assert_allclose(largest.double().numpy() / scale, values[:, 2], atol=1e-5)
            full_values, basis = symmetric_eigen_full(as_t6(m).to(dtype) * scale)
            assert torch.isfinite(basis).all()
            np.testing.assert_allclose(full_values.double().numpy().T / scale, values, atol=1e-5)
    # isotropic: the convention is z^
    z_hat = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    assert torch.equal(symmetric_eigen(as_t6(np.eye(3)[None] * 0.01))[2][:, 0], z_hat)


def test_constraint_projections():
    m = random_symmetric(np.random.default_rng(1), 400) * 0.01
    t6 = as_t6(m)
    low, high = -0.05, 0.02
    projected = project_eigenvalues(t6, low, high).numpy()
    pm = np.stack([np.stack([projected[0], projected[3], projected[4]], -1),
                   np.stack([projected[3], projected[1], projected[5]], -1),
                   np.stack([projected[4], projected[5], projected[2]], -1)], -2)
    values, vectors = np.linalg.eigh(m)
    expected = (vectors * np.clip(values, low, high)[:, None, :]) @ vectors.transpose(0, 2, 1)
    np.testing.assert_allclose(pm, expected, atol=1e-12)  # nearest tensor with eigenvalues in bounds
    norm = np.sqrt(np.sum(m**2, axis=(1, 2)))
    threshold = np.median(norm)
    shrunk = shrink_tensors(t6, threshold).numpy()
    scale = np.maximum(0.0, 1 - threshold / norm)
    np.testing.assert_allclose(shrunk, t6.numpy() * scale, atol=1e-15)
    assert (scale == 0).sum() >= len(m) // 2 - 1  # below the threshold: exactly the medium


def test_principal_indices_of_medium_and_sample_voxels():
    """Voxels of exactly the medium (zero contrast) skip the decomposition: the medium's index and
    the z^ convention, as the decomposition itself gives; the rest their eigenvalues and vectors."""
    m = random_symmetric(np.random.default_rng(2), 300) * 0.01
    t6 = as_t6(m).float()
    t6[:, ::3] = 0.0
    n_m = 1.54
    ne, no, director = principal_indices(t6.reshape(6, 10, 30), n_m, chunk_voxels=64)
    largest, smallest, vector = symmetric_eigen(t6)
    np.testing.assert_array_equal(ne.reshape(-1).numpy(), (n_m + largest / (2 * n_m)).numpy())
    np.testing.assert_array_equal(no.reshape(-1).numpy(), (n_m + smallest / (2 * n_m)).numpy())
    np.testing.assert_array_equal(director.reshape(3, -1).numpy(), vector.numpy())
    assert np.all(ne.reshape(-1).numpy()[::3] == np.float32(n_m))


def test_fourier_plan_transforms_match_the_direct_sums():
    """``to_volume`` is the Fourier series (1/V_box) sum F(K) exp(i K.r) at the voxel centres,
    ``from_volume`` the sum f(r) exp(-i K.r) dV over the voxels, both on the box's frequencies."""
    geometry = preset("small").replace(volume_shape=(8, 20, 24))
    plan = FourierPlan(geometry, crop_shape(geometry), "cpu", 2.0, 0.3, 1e-3)
    Z, Y, X = geometry.volume_shape
    dz, dy, dx = geometry.voxel_size_m
    H, W = geometry.hologram_shape
    box_volume_m3 = plan.n_z * dz * H * dy * W * dx
    z, y, x = (torch.as_tensor(c, dtype=torch.float64) for c in geometry.volume_coordinates_m())
    Mz, My, Mx = plan.half_box
    rng = np.random.default_rng(2)
    for mz, my, mx in ((0, 0, 0), (1, -My // 2, Mx // 3), (-Mz, My, Mx), (Mz, 4, 0)):
        c = complex(*rng.normal(size=2)) if (mz, my, mx) != (0, 0, 0) else 1.0
        half = torch.zeros(1, *plan.half_shape, dtype=torch.complex64)
        half[0, mz + Mz, my + My, mx] += c
        if mx == 0 and (mz, my) != (0, 0):  # the kx = 0 plane holds both K and -K
            half[0, -mz + Mz, -my + My, 0] += np.conj(c)
        K = (2 * math.pi * mz / (plan.n_z * dz), 2 * math.pi * my / (H * dy), 2 * math.pi * mx / (W * dx))
        wave = torch.exp(1j * (K[0] * z[:, None, None] + K[1] * y[None, :, None] + K[2] * x[None, None, :]))
        weight = 1.0 if (mz, my, mx) == (0, 0, 0) else 2.0
        expected = weight * (c * wave).real / box_volume_m3
        got = plan.to_volume(half)[0].double()
        torch.testing.assert_close(got, expected, atol=1e-5 * expected.abs().max(), rtol=0)
    field = torch.as_tensor(rng.normal(size=(1, Z, Y, X)), dtype=torch.float32)
    spectrum = plan.from_volume(field)[0]
    for mz, my, mx in ((0, 0, 0), (1, -My // 2, Mx // 3), (-Mz, My, Mx)):
        K = (2 * math.pi * mz / (plan.n_z * dz), 2 * math.pi * my / (H * dy), 2 * math.pi * mx / (W * dx))
        wave = torch.exp(-1j * (K[0] * z[:, None, None] + K[1] * y[None, :, None] + K[2] * x[None, None, :]))
        expected = (field[0].double() * wave).sum() * dz * dy * dx
        assert abs(complex(spectrum[mz + Mz, my + My, mx]) - complex(expected)) < 1e-4 * abs(complex(expected)) + 1e-30
