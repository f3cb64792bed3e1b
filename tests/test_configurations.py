"""Closed-form director configurations fitted to a director field: each configuration found again on
its own field (exactly and with noise), and left alone where no closed form fits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from biref_sdk.metrics import director_angles_deg
from biref_sdk.reconstruction.configurations import MIN_AGREEMENT, configured_director, fit_configuration
from biref_sdk.reconstruction.particles import ParticleMap
from biref_sdk.samples.droplets import Droplet, director_field
from biref_sdk.samples.tensor import voxel_centres_m

SHAPE, VOXEL_M = (24, 40, 40), (100e-9, 50e-9, 50e-9)


def _points_m():
    z, y, x = voxel_centres_m(SHAPE, VOXEL_M)
    zz, yy, xx = torch.meshgrid(z, y, x, indexing="ij")
    return torch.stack([xx, yy, zz], -1).double()


def _field(droplet: Droplet) -> np.ndarray:
    """The droplet's director [3, Z, Y, X] and the mask of the voxels inside it."""
    points = _points_m()
    director = director_field(droplet, points).permute(3, 0, 1, 2).numpy()
    centre = torch.as_tensor(droplet.center_m, dtype=torch.float64)
    inside = ((points - centre).norm(dim=-1) < droplet.radius_m).numpy()
    return director, inside


def _noisy(director: np.ndarray, tilt_deg: float, seed: int) -> np.ndarray:
    """Each voxel's director tilted at random by about ``tilt_deg``: a reconstruction's scatter."""
    kick = np.random.default_rng(seed).normal(scale=np.radians(tilt_deg) / np.sqrt(2), size=director.shape)
    noisy = director + kick - (kick * director).sum(0) * director
    return noisy / np.linalg.norm(noisy, axis=0)


DROPLETS = [
    Droplet((40e-9, -30e-9, 20e-9), 0.7e-6, (0.3, -0.5, 0.8), "bipolar", 1.565, 1.548),
    Droplet((0.0, 60e-9, 0.0), 0.7e-6, (1.0, 0.2, 0.4), "twisted_bipolar", 1.565, 1.548, twist_rad=1.2),
    Droplet((-50e-9, 0.0, 0.0), 0.7e-6, (0.0, 0.0, 1.0), "radial", 1.565, 1.548),
    Droplet((0.0, 0.0, 50e-9), 0.7e-6, (-0.6, 0.7, 0.4), "preradial", 1.565, 1.548, defect_offset=0.5),
    Droplet((0.0, 0.0, 0.0), 0.7e-6, (0.5, 0.5, -0.7), "uniform", 1.565, 1.548),
]


@pytest.mark.parametrize("droplet", DROPLETS, ids=lambda d: d.configuration)
def test_each_configuration_is_found_again_on_its_own_noisy_field(droplet):
    director, inside = _field(droplet)
    spheroid = Droplet(droplet.center_m, droplet.radius_m, (0.0, 0.0, 1.0), "uniform", 1.6, 1.6)
    for tilt_deg in (0.0, 12.0):
        fit = fit_configuration(_noisy(director, tilt_deg, seed=1), inside.astype(float), spheroid, VOXEL_M)
        assert fit.droplet.configuration == droplet.configuration
        if droplet.configuration != "radial":
            axis_angle = np.degrees(np.arccos(abs(np.dot(fit.droplet.axis, droplet.axis))))
            assert axis_angle < 4.0, (tilt_deg, fit.droplet.axis)
        closed = director_field(fit.droplet, _points_m()).permute(3, 0, 1, 2).numpy()
        # the fitted closed form lies within a few degrees of the true one, however noisy the input
        assert float(director_angles_deg(director, closed)[torch.as_tensor(inside)].median()) < 3.0
        assert fit.agreement > (0.999 if tilt_deg == 0 else 0.9)


def _one_particle(inside: np.ndarray, spheroid: Droplet) -> ParticleMap:
    return ParticleMap(owner=inside.astype(np.int64), occupancy=inside.astype(np.float32),
                       ne=np.array([1.565]), no=np.array([1.548]), shapes=("sphere",), spheroids=(spheroid,))


def test_a_noisy_droplets_director_becomes_its_closed_form():
    droplet = DROPLETS[0]
    director, inside = _field(droplet)
    noisy = _noisy(director, 12.0, seed=2)
    spheroid = Droplet(droplet.center_m, droplet.radius_m, (0.0, 0.0, 1.0), "uniform", 1.6, 1.6)
    configured, report = configured_director(noisy, _one_particle(inside, spheroid), VOXEL_M, [True])
    assert report[0]["used"] and report[0]["configuration"] == "bipolar"
    mask = torch.as_tensor(inside)
    before = float(director_angles_deg(director, noisy)[mask].median())
    after = float(director_angles_deg(director, configured)[mask].median())
    assert after < 0.2 * before, (before, after)
    np.testing.assert_allclose(configured[:, ~inside], noisy[:, ~inside], atol=1e-7)  # the medium keeps its director


def test_a_director_no_closed_form_fits_and_a_particle_cut_by_the_edge_are_left_alone():
    droplet = DROPLETS[0]
    _, inside = _field(droplet)
    spheroid = Droplet(droplet.center_m, droplet.radius_m, (0.0, 0.0, 1.0), "uniform", 1.6, 1.6)
    scrambled = _noisy(np.ones((3, *SHAPE)) / np.sqrt(3), 80.0, seed=3)
    configured, report = configured_director(scrambled, _one_particle(inside, spheroid), VOXEL_M, [True])
    assert report[0]["agreement"] < MIN_AGREEMENT and not report[0]["used"]
    np.testing.assert_allclose(configured, scrambled, atol=1e-7)

    director, _ = _field(droplet)
    cut = np.zeros_like(inside)
    cut[:, :, :26] = inside[:, :, 14:]  # the droplet moved 14 voxels: the field's edge runs through it
    assert cut[:, :, 0].any()
    configured, report = configured_director(director, _one_particle(cut, spheroid), VOXEL_M, [True])
    assert report == []
    # an isotropic particle has no director to fit
    assert configured_director(director, _one_particle(inside, spheroid), VOXEL_M, [False])[1] == []
