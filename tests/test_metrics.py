"""Metric values against known results: identical images, known noise levels, scikit-image references, Mood's test."""

import numpy as np
import pytest
from skimage.metrics import normalized_root_mse, peak_signal_noise_ratio, structural_similarity

from volrestore.evaluation import metrics


@pytest.fixture(scope="module")
def ref():
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:24, :40, :40]
    img = 100 + 800 * np.exp(-((z - 12) ** 2 + (y - 20) ** 2 + (x - 18) ** 2) / 60.0)
    return (img + rng.normal(0, 5, img.shape)).astype(np.float32)


def test_identical_images(ref):
    assert metrics.psnr(ref, ref) == float("inf")
    assert metrics.ssim(ref, ref) == pytest.approx(1.0, abs=1e-12)
    assert metrics.nrmse(ref, ref) == 0.0
    assert metrics.mae(ref, ref) == 0.0


def test_psnr_of_known_noise_level(ref):
    rng = np.random.default_rng(1)
    offset, scale = metrics.normalisation(ref)
    sigma = 0.05 * scale  # noise of 5 % of the reference's percentile range → PSNR = 20·log10(1/0.05) ≈ 26.0 dB
    noisy = ref + rng.normal(0, sigma, ref.shape)
    assert metrics.psnr(noisy, ref) == pytest.approx(26.02, abs=0.15)


def test_matches_scikit_image_on_the_raw_range(ref):
    rng = np.random.default_rng(2)
    noisy = ref + rng.normal(0, 20, ref.shape).astype(np.float32)
    dr = float(ref.max()) - float(ref.min())
    assert metrics.psnr(noisy, ref, mode="raw") == pytest.approx(
        peak_signal_noise_ratio(ref.astype(np.float64), noisy.astype(np.float64), data_range=dr), rel=1e-9
    )
    n64, r64 = noisy.astype(np.float64), ref.astype(np.float64)
    expected = structural_similarity(
        (n64 - r64.min()) / dr, (r64 - r64.min()) / dr, data_range=1.0,
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    )
    assert metrics.ssim(noisy, ref, mode="raw") == pytest.approx(expected, rel=1e-9)
    assert metrics.nrmse(noisy, ref) == pytest.approx(normalized_root_mse(ref, noisy), rel=1e-9)


def test_percentiles_from_histogram_match_numpy():
    rng = np.random.default_rng(3)
    data = rng.gamma(2.0, 50.0, size=200_000)
    lo, hi = data.min(), data.max()
    got = metrics.histogram_percentiles(metrics.reference_histogram(data, lo, hi), lo, hi)
    want = np.percentile(data, metrics.PERCENTILES)
    bin_width = (hi - lo) / metrics.HIST_BINS
    assert np.allclose(got, want, atol=2 * bin_width)


def test_ms_ssim_identical_and_degraded():
    rng = np.random.default_rng(4)
    img = rng.random((192, 192))
    assert metrics.ms_ssim_2d(img, img, 0.0, 1.0) == pytest.approx(1.0, abs=1e-6)
    assert metrics.ms_ssim_2d(img + rng.normal(0, 0.3, img.shape), img, 0.0, 1.0) < 0.9


def test_moods_median_test_separates_shifted_distributions():
    rng = np.random.default_rng(5)
    same = metrics.moods_median_test({"a": rng.normal(0, 1, 200), "b": rng.normal(0, 1, 200)})
    shifted = metrics.moods_median_test({"a": rng.normal(0, 1, 200), "b": rng.normal(1, 1, 200)})
    assert same[0]["p_value"] > 0.01
    assert shifted[0]["p_value"] < 1e-6
    assert shifted[0]["median_b"] > shifted[0]["median_a"]


def test_calibration_of_a_correct_gaussian_uncertainty():
    rng = np.random.default_rng(6)
    ref = rng.random(100_000)
    std = np.full_like(ref, 0.1)
    pred = ref + rng.normal(0, 0.1, ref.shape)
    assert metrics.calibration(pred, std, ref) == pytest.approx(0.9545, abs=0.005)
    assert metrics.calibration(pred, std / 4, ref) < 0.5


def test_seam_ratio_detects_a_step():
    ramp = np.tile(np.arange(64, dtype=np.float64), (8, 1))
    assert metrics.seam_ratio(ramp, {1: [16, 32, 48]}) == pytest.approx(1.0)
    stepped = ramp.copy()
    stepped[:, 32:] += 5
    assert metrics.seam_ratio(stepped, {1: [16, 32, 48]}) > 5


def test_whiteness_of_residuals():
    rng = np.random.default_rng(7)
    white = rng.normal(size=(32, 32, 32))
    assert abs(metrics.lag1_autocorrelation(white, 2)) < 0.05
    from scipy.ndimage import uniform_filter

    smooth = uniform_filter(white, 3)
    assert metrics.lag1_autocorrelation(smooth, 2) > 0.5


@pytest.mark.parametrize("photons", [10.0, 30.0, 100.0])
def test_shot_noise_photons_reads_the_photon_level_in_any_units(photons):
    """A smooth object at a known photon level, in camera units (gain 3.7, offset 100): the counts at its own 99.9th
    percentile within 15 %; a noiseless one reads as far more photons; a 2x2 binned stack as ~4x (summing 4 pixels
    quadruples the photons)."""
    z, y, x = np.mgrid[:8, :96, :96]
    clean = 5 + 95 * np.exp(-((y - 48.0) ** 2 + (x - 40.0) ** 2) / 900.0) * (1 + 0 * z)
    scale = photons / np.percentile(clean, 99.9)
    counts = np.random.default_rng(3).poisson(clean * scale)
    estimate = metrics.shot_noise_photons(counts * 3.7 + 100)
    assert estimate == pytest.approx(np.percentile(counts, 99.9), rel=0.15)
    assert metrics.shot_noise_photons(clean * 3.7 + 100) > 20 * estimate
    binned = counts.reshape(8, 48, 2, 48, 2).sum(axis=(2, 4))
    assert metrics.shot_noise_photons(binned) == pytest.approx(np.percentile(binned, 99.9), rel=0.15)


def test_noise_free_median_undoes_most_of_the_pull_noise_gives_the_median():
    """A fluorescence-like stack (70 % flat background at 25, objects up to ~400: a long bright tail) with Poisson and
    read noise in camera units: the plain median of the noisy voxels sits 9-14 grey levels above the clean one (toward
    the mean); noise_free_median, with the noise fitted on the image, removes well over a third of that at 10 photons
    and over half at 30, transforms with the camera's gain and offset, and is the plain median without a noise fit."""
    from scipy import ndimage

    rng = np.random.default_rng(5)
    field = ndimage.gaussian_filter(rng.standard_normal((8, 128, 128)), (1, 6, 6))
    clean = 25 + 120 * np.clip(field / field.std() - 0.6, 0, None)
    for photons, kept in ((10.0, 0.65), (30.0, 0.4)):
        scale = photons / np.percentile(clean, 99.9)
        camera = (rng.poisson(clean * scale) + rng.normal(0, 1.5, clean.shape)) / scale * 3.7 + 100
        fit = metrics.shot_noise_fit(camera)
        plain = (np.median(camera) - 100) / 3.7 - np.median(clean)
        fixed = (metrics.noise_free_median(camera, *fit) - 100) / 3.7 - np.median(clean)
        assert plain > 8 and 0 < fixed < kept * plain, (photons, plain, fixed)
        a, b = 0.02, -5.0  # other camera units: the fit's line transforms as variance does (a² v, at a x + b)
        other = metrics.noise_free_median(camera * a + b, fit[0] * a, fit[1] * a * a - fit[0] * a * b)
        assert other == pytest.approx(metrics.noise_free_median(camera, *fit) * a + b, rel=1e-6)
    assert metrics.noise_free_median(camera, float("nan"), float("nan")) == np.median(camera)
