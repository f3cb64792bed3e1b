"""The paper's metrics against independent implementations (scikit-image) and closed forms."""
from __future__ import annotations

import math

import numpy as np
import pytest

from biref_sdk import metrics
from biref_sdk.files import Volume

skimage_metrics = pytest.importorskip("skimage.metrics")


def random_index_volume(rng, shape, smooth=True):
    volume = rng.uniform(1.535, 1.575, size=shape)  # a little outside the range: exercises the clipping
    if smooth:
        from scipy.ndimage import gaussian_filter
        volume = gaussian_filter(volume, 1.0) + 0.003 * rng.standard_normal(shape)
    return volume


def eight_bit(volume):
    return np.clip((volume - 1.54) / 0.03 * 255.0, 0, 255)


@pytest.mark.parametrize("shape", [(11, 11, 11), (16, 20, 24), (32, 13, 17)])
def test_ssim_matches_scikit_image_3d(shape):
    rng = np.random.default_rng(sum(shape))
    truth = random_index_volume(rng, shape)
    estimate = truth + 0.004 * rng.standard_normal(shape)
    expected = skimage_metrics.structural_similarity(
        eight_bit(truth), eight_bit(estimate), gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        data_range=255)
    assert metrics.ssim(truth, estimate) == pytest.approx(expected, abs=1e-9)


def test_ssim_of_identical_volumes_is_one_and_drops_with_noise():
    rng = np.random.default_rng(0)
    truth = random_index_volume(rng, (12, 14, 16))
    assert metrics.ssim(truth, truth) == pytest.approx(1.0, abs=1e-12)
    slightly = metrics.ssim(truth, truth + 0.001 * rng.standard_normal(truth.shape))
    very = metrics.ssim(truth, truth + 0.01 * rng.standard_normal(truth.shape))
    assert 1.0 > slightly > very


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_psnr_matches_scikit_image(seed):
    rng = np.random.default_rng(seed)
    truth = random_index_volume(rng, (8, 9, 10), smooth=False)
    estimate = truth + 0.005 * rng.standard_normal(truth.shape)
    expected = skimage_metrics.peak_signal_noise_ratio(eight_bit(truth), eight_bit(estimate), data_range=255)
    assert metrics.psnr(truth, estimate) == pytest.approx(expected, abs=1e-9)


def test_psnr_closed_form_and_identity():
    truth = np.full((4, 4, 4), 1.55)
    # an offset of 0.003 index units is 25.5 grey levels everywhere: PSNR = 20 log10(255 / 25.5) = 20 dB
    assert metrics.psnr(truth, truth + 0.003) == pytest.approx(20.0, abs=1e-9)
    assert metrics.psnr(truth, truth) == math.inf
    # values below 1.54 are clipped by the mapping, as in the paper's 8-bit rendering
    assert metrics.psnr(np.full((2, 2, 2), 1.54), np.full((2, 2, 2), 1.50)) == math.inf


def test_rmse_in_index_units():
    truth = np.zeros((3, 4, 5)) + 1.55
    estimate = truth.copy()
    estimate[0] += 0.01  # one third of the voxels off by 0.01
    assert metrics.rmse(truth, estimate) == pytest.approx(0.01 / math.sqrt(3))


def test_director_error_is_sign_invariant_and_masked():
    shape = (4, 5, 6)
    truth = np.zeros((3, *shape))
    truth[0] = 1.0
    angle = math.radians(10.0)
    estimate = np.zeros_like(truth)
    estimate[0] = -math.cos(angle)  # flipped sign: the same axis
    estimate[1] = math.sin(angle)
    ne = np.full(shape, 1.54)
    no = np.full(shape, 1.54)
    ne[:2] = 1.56  # droplet only in the first two slices
    # outside the droplet the estimate is way off: must not count
    estimate[:, 2:] = np.array([0.0, 0.0, 1.0])[:, None, None, None]
    assert metrics.director_error_deg(truth, estimate, ne, no) == pytest.approx(10.0, abs=1e-6)
    assert math.isnan(metrics.director_error_deg(truth, estimate, no, no))


def test_compare_volumes_keys_and_shape_check():
    rng = np.random.default_rng(3)
    shape = (12, 12, 12)
    director = rng.standard_normal((3, *shape))
    truth = Volume(random_index_volume(rng, shape) + 0.01, random_index_volume(rng, shape), director,
                   (1e-7, 5e-8, 5e-8), 1.54)
    result = metrics.compare_volumes(truth, truth)
    assert set(result) == set(metrics.METRIC_KEYS)
    assert result["ssim_ne"] == pytest.approx(1.0) and result["rmse_no"] == 0.0
    small = Volume(truth.ne[:11], truth.no[:11], truth.director[:, :11], truth.voxel_size_m, 1.54)
    with pytest.raises(ValueError):
        metrics.compare_volumes(truth, small)


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError):
        metrics.psnr(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))
    with pytest.raises(ValueError):
        metrics.ssim(np.zeros((5, 20, 20)), np.zeros((5, 20, 20)))  # smaller than the window


def test_isotropic_core_birefringence_sees_false_birefringence_in_the_core_only():
    z, y, x = np.meshgrid(*(np.arange(24) - 12,) * 3, indexing="ij")
    r = np.sqrt(x**2 + y**2 + z**2)
    truth = np.where(r < 8, 1.55, 1.54)
    shell = (r >= 7.5) & (r < 8)  # a surface shell, which the 2-voxel erosion leaves out
    estimate_ne = truth + 0.003 * (r < 8) + 0.02 * shell
    got = metrics.isotropic_core_birefringence(truth, truth, estimate_ne, truth, medium_index=1.54)
    assert abs(got - 0.003) < 1e-9
    assert metrics.isotropic_core_birefringence(truth, truth, truth, truth, 1.54) == 0.0
    assert np.isnan(metrics.isotropic_core_birefringence(truth + 0.01, truth, truth, truth, 1.54))  # no isotropic particle
