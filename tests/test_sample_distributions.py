"""The training distributions: what each category draws, and that the original one is unchanged."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from biref_sdk.files import read_geometry
from biref_sdk.samples import DISTRIBUTIONS, Droplet, director_field, random_droplets, random_sample
from biref_sdk.samples.droplets import BROAD_MIXTURE, draw_distribution

EXTENT_M = (3.2e-6, 3.2e-6, 3.2e-6)


def test_the_original_distribution_draws_what_it_always_drew():
    # measured with the code before the new features (main at af04feb): old data sets stay reproducible
    (d,) = random_droplets(np.random.default_rng(12345), EXTENT_M, 1.54)
    assert d.configuration == "preradial" and d.aspect == 1.0
    np.testing.assert_allclose(d.center_m, (-2.9850247710042313e-07, 4.844112713087315e-07, 2.8712060203094355e-07))
    np.testing.assert_allclose([d.radius_m, d.ne, d.no, d.twist_rad, d.defect_offset],
                               [7.854950543789886e-07, 1.5654185846162048, 1.5446806076704334,
                                0.7730702860925281, 0.6795524607333272])


def _draw(name, n, seed=0):
    rng = np.random.default_rng(seed)
    return [random_droplets(rng, EXTENT_M, 1.54, DISTRIBUTIONS[name]) for _ in range(n)]


def test_droplets_never_overlap_and_stay_inside_unless_edge_cut():
    half = np.asarray(EXTENT_M) / 2
    for name in DISTRIBUTIONS:
        for droplets in _draw(name, 20):
            for i, a in enumerate(droplets):
                for b in droplets[i + 1:]:
                    assert np.linalg.norm(np.subtract(a.center_m, b.center_m)) >= a.bounding_radius_m + b.bounding_radius_m
                reach = np.abs(a.center_m) + a.bounding_radius_m
                assert reach[2] <= half[2] * (1 + 1e-9)  # never cut by the top or bottom
                if name != "edge":
                    assert np.all(reach <= half * (1 + 1e-9))
    cut = [d for ds in _draw("edge", 40) for d in ds if np.any(np.abs(d.center_m[:2]) + d.radius_m > half[:2])]
    assert len(cut) >= 10


def test_categories_draw_what_their_names_say():
    iso = [d for ds in _draw("isotropic", 30) for d in ds]
    assert all(d.ne == d.no for d in iso) and min(d.ne for d in iso) < 1.545  # below the LC n_o range too
    assert all(2 <= len(ds) <= 4 for ds in _draw("multi", 30))
    assert all(d.aspect >= 1.2 for ds in _draw("elongated", 20) for d in ds)
    small = [d.radius_m for ds in _draw("small", 20) for d in ds]
    large = [d.radius_m for ds in _draw("large", 20) for d in ds]
    assert max(small) < 0.75e-6 < 1.25e-6 < min(large)
    mixed = [d for ds in _draw("multi", 60) for d in ds]
    assert 0.1 < np.mean([d.ne == d.no for d in mixed]) < 0.4  # LC droplets and isotropic particles together


def test_the_broad_mixture_draws_its_categories_by_weight():
    rng = np.random.default_rng(0)
    names = [draw_distribution(rng, "broad")[0] for _ in range(4000)]
    for weight, name in BROAD_MIXTURE:
        assert abs(names.count(name) / len(names) - weight) < 0.03
    with pytest.raises(ValueError, match="unknown distribution"):
        draw_distribution(rng, "nope")


def test_a_spheroidal_bipolar_droplet_keeps_its_director_tangent_to_its_surface():
    droplet = Droplet(center_m=(0.0, 0.0, 0.0), radius_m=1e-6, axis=(1.0, 1.0, 0.5), configuration="bipolar",
                      ne=1.56, no=1.55, aspect=1.5)
    axis = torch.tensor(droplet.axis, dtype=torch.float64)
    rng = np.random.default_rng(1)
    u = torch.as_tensor(rng.normal(size=(500, 3)))
    u /= u.norm(dim=1, keepdim=True)
    # points on the spheroid: the unit sphere stretched by the aspect along the axis
    along = (u @ axis)[:, None] * axis
    surface = (u - along + 1.5 * along) * droplet.radius_m
    # outward normal: the gradient of |x_perp|^2/R^2 + (x.a)^2/(aR)^2
    s_along = (surface @ axis)[:, None] * axis
    normal = (surface - s_along) + s_along / 1.5**2
    normal /= normal.norm(dim=1, keepdim=True)
    d = director_field(droplet, surface)
    poles = (u @ axis).abs() > 0.99  # the director is undefined at the poles
    assert torch.all((d * normal).sum(1)[~poles].abs() < 1e-6)


def test_a_broad_sample_records_its_category_and_voxelizes_a_spheroid():
    geometry = read_geometry("small")
    sample = random_sample(np.random.default_rng(3), geometry, "broad")
    assert sample.description["category"] in {name for _, name in BROAD_MIXTURE}
    droplet = Droplet(center_m=(0.0, 0.0, 0.0), radius_m=0.5e-6, axis=(0.0, 0.0, 1.0), configuration="uniform",
                      ne=1.56, no=1.56, aspect=1.6)
    from biref_sdk.samples import droplet_sample

    truth = droplet_sample([droplet], geometry).truth()
    inside = truth.ne > 1.55
    dz, dy, dx = geometry.voxel_size_m
    # extents along z and x measured on the voxel grid: 2 * 0.8 um and 2 * 0.5 um
    assert abs(inside.any(axis=(1, 2)).sum() * dz - 1.6e-6) <= 2 * dz
    assert abs(inside.any(axis=(0, 1)).sum() * dx - 1.0e-6) <= 2 * dx


def test_simulate_writes_a_named_distribution_with_its_camera_settings(tmp_path):
    import json

    from biref_sdk.cli import main as biref
    from biref_sdk.files import Dataset

    out = tmp_path / "multi.h5"
    assert biref(["simulate", "--preset", "small", "--distribution", "multi", "--n", "1", "--seed", "4",
                  "--supersample", "1", "--reference-amplitude", "0.8", "--read-noise-e", "3.5", "--out", str(out)]) == 0
    with Dataset(out) as data:
        parameters = data.parameters if isinstance(data.parameters, dict) else json.loads(data.parameters)
        assert parameters["simulator"]["droplets"] == "multi"
        assert parameters["simulator"]["distributions"]["multi"]["max_droplets"] == 4
        assert parameters["simulator"]["camera"]["reference_amplitude"] == 0.8
        assert parameters["simulator"]["camera"]["read_noise_e"] == 3.5
    with pytest.raises(SystemExit, match="not the broad mixture"):
        biref(["simulate", "--preset", "small", "--distribution", "broad", "--max-droplets", "3", "--out", str(out)])
    with pytest.raises(SystemExit, match="unknown --distribution"):
        biref(["simulate", "--preset", "small", "--distribution", "many", "--out", str(out)])
