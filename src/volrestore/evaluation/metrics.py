"""Image quality numbers on numpy arrays: PSNR/SSIM/MS-SSIM/NRMSE/MAE, percentiles, Mood's test, calibration, seams, residuals."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

# Reference normalisation as in the CARE literature: the reference's 0.1 and 99.9 percentiles map to 0 and 1, and
# PSNR/SSIM use data range 1. Percentiles come from a fixed 65536-bin histogram over the reference's [min, max]
# so that a blockwise (lazy) evaluation gives exactly the numbers of an in-memory one.
PERCENTILES = (0.1, 99.9)
HIST_BINS = 65536


def histogram_percentiles(hist: np.ndarray, lo: float, hi: float, q=PERCENTILES) -> tuple[float, ...]:
    """Percentiles (0–100) from a histogram of equal bins over [lo, hi], within one bin of numpy's 'linear' rule."""
    cdf = np.cumsum(hist, dtype=np.float64)
    width = (hi - lo) / len(hist) if hi > lo else 0.0

    def order_statistic(k: int) -> float:  # the k-th smallest value (0-based), placed evenly inside its bin
        i = int(np.searchsorted(cdf, k, side="right"))
        before = cdf[i - 1] if i > 0 else 0.0
        return lo + (i + (k - before + 0.5) / hist[i]) * width

    out = []
    for p in q:
        position = p / 100.0 * (cdf[-1] - 1)  # numpy's 'linear' method: interpolate between order statistics
        k = int(np.floor(position))
        a = order_statistic(k)
        b = order_statistic(min(k + 1, int(cdf[-1]) - 1))
        out.append(float(a + (position - k) * (b - a)))
    return tuple(out)


def reference_histogram(ref: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Counts of ref in HIST_BINS equal bins over [lo, hi]; add these over blocks for the whole image."""
    return np.histogram(np.asarray(ref, dtype=np.float64), bins=HIST_BINS, range=(lo, hi if hi > lo else lo + 1))[0]


def blockwise_percentiles(read_blocks, q=PERCENTILES) -> tuple[float, float, tuple[float, ...]]:
    """(min, max, percentiles) of data read in blocks: `read_blocks()` yields arrays and is called twice (a min/max
    pass, then a histogram pass), so memory stays one block whatever the image size."""
    lo, hi = float("inf"), float("-inf")
    for block in read_blocks():
        lo, hi = min(lo, float(np.min(block))), max(hi, float(np.max(block)))
    hist = np.zeros(HIST_BINS, np.int64)
    for block in read_blocks():
        hist += reference_histogram(block, lo, hi)
    return lo, hi, histogram_percentiles(hist, lo, hi, q)


def run_percentiles(read, blocks, q=PERCENTILES, *, client=None, progress=False, what="the image",
                    total=None) -> tuple[float, float, tuple[float, ...]]:
    """blockwise_percentiles with one task per block through the blockwise runner (client None: local threads).

    `read(block)` returns a block's data (it is sent to the workers, so it must pickle); `blocks()` yields the blocks
    and is called twice (min/max, then histograms). Min/max and integer histogram counts do not depend on the order
    in which tasks end, so the numbers are exactly blockwise_percentiles' over the same blocks.
    """
    from volrestore.blockwise.runner import run_blockwise

    lo, hi = float("inf"), float("-inf")
    hist = np.zeros(HIST_BINS, np.int64)

    def extend(block, extremes):
        nonlocal lo, hi
        lo, hi = min(lo, extremes[0]), max(hi, extremes[1])

    def add(block, counts):
        np.add(hist, counts, out=hist)

    run_blockwise(client, _block_extremes, blocks(), args=(read,), on_result=extend, progress=progress,
                  what=f"range of {what}", total=total)
    run_blockwise(client, _block_histogram, blocks(), args=(read, lo, hi), on_result=add, progress=progress,
                  what=f"histogram of {what}", total=total)
    return lo, hi, histogram_percentiles(hist, lo, hi, q)


def _block_extremes(read, block) -> tuple[float, float]:
    data = read(block)
    return float(np.min(data)), float(np.max(data))


def _block_histogram(read, lo, hi, block) -> np.ndarray:
    return reference_histogram(read(block), lo, hi)


def normalisation(ref: np.ndarray, mode: str = "percentile") -> tuple[float, float]:
    """(offset, range) that map the reference to [0, 1]: percentile (0.1–99.9, default) or the raw min–max."""
    ref = np.asarray(ref, dtype=np.float64)
    lo, hi = float(ref.min()), float(ref.max())
    if mode == "raw":
        return lo, hi - lo
    p_lo, p_hi = histogram_percentiles(reference_histogram(ref, lo, hi), lo, hi)
    return p_lo, p_hi - p_lo


def psnr_from_mse(mse: float, data_range: float = 1.0) -> float:
    """PSNR in dB of a mean squared error at the given data range (inf for a perfect match)."""
    return float("inf") if mse == 0 else float(10.0 * np.log10(data_range**2 / mse))


def psnr(pred, ref, mode: str = "percentile") -> float:
    """PSNR in dB after normalising both images by the reference (see PERCENTILES)."""
    offset, scale = normalisation(ref, mode)
    p = (np.asarray(pred, np.float64) - offset) / scale
    r = (np.asarray(ref, np.float64) - offset) / scale
    return psnr_from_mse(float(np.mean((p - r) ** 2)))


def nrmse(pred, ref) -> float:
    """||pred − ref|| / ||ref||, as scikit-image's normalized_root_mse with its default 'euclidean' rule."""
    p, r = np.asarray(pred, np.float64), np.asarray(ref, np.float64)
    return float(np.sqrt(np.sum((p - r) ** 2)) / np.sqrt(np.sum(r**2)))


def mae(pred, ref) -> float:
    """Mean absolute error."""
    return float(np.mean(np.abs(np.asarray(pred, np.float64) - np.asarray(ref, np.float64))))


# SSIM: Wang et al.'s Gaussian window (sigma 1.5, 11 taps), population covariance, data range 1 after normalisation.
SSIM_SIGMA = 1.5
SSIM_MARGIN = 5  # half the 11-tap window: scikit-image crops this many voxels at each border before averaging


def ssim_map(pred, ref) -> np.ndarray:
    """The local SSIM map of two images already normalised to data range 1 (2D or 3D)."""
    from skimage.metrics import structural_similarity

    _, full = structural_similarity(
        np.asarray(pred, np.float64),
        np.asarray(ref, np.float64),
        data_range=1.0,
        gaussian_weights=True,
        sigma=SSIM_SIGMA,
        use_sample_covariance=False,
        full=True,
    )
    return full


def ssim(pred, ref, mode: str = "percentile") -> float:
    """Mean SSIM over the image (3D for a volume), after normalising both by the reference."""
    offset, scale = normalisation(ref, mode)
    p = (np.asarray(pred, np.float64) - offset) / scale
    r = (np.asarray(ref, np.float64) - offset) / scale
    full = ssim_map(p, r)
    crop = tuple(slice(SSIM_MARGIN, max(SSIM_MARGIN, n - SSIM_MARGIN)) for n in full.shape)
    return float(full[crop].mean(dtype=np.float64))


def ms_ssim_2d(pred, ref, offset: float, scale: float) -> float:
    """MS-SSIM of one 2D slice (MONAI; as many of the 5 standard scales as the slice size allows)."""
    import torch
    from monai.metrics import MultiScaleSSIMMetric

    weights = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
    side = min(np.shape(pred))
    levels = len(weights)
    # MONAI's size rule for an 11-tap window: side // max(1, scales − 1)² must exceed 10.
    while levels > 1 and side // max(1, levels - 1) ** 2 <= 10:
        levels -= 1
    if side <= 10:
        return float("nan")  # too small for even one 11-tap scale
    w = np.asarray(weights[:levels])
    metric = MultiScaleSSIMMetric(spatial_dims=2, data_range=1.0, weights=tuple((w / w.sum()).tolist()))
    p = torch.as_tensor((np.asarray(pred, np.float64) - offset) / scale, dtype=torch.float64)[None, None]
    r = torch.as_tensor((np.asarray(ref, np.float64) - offset) / scale, dtype=torch.float64)[None, None]
    return float(metric(p, r).mean())


def moods_median_test(samples: dict[str, np.ndarray]) -> list[dict]:
    """Mood's median test (scipy.stats.median_test) between every pair of methods' per-slice metric values."""
    from itertools import combinations

    from scipy.stats import median_test

    rows = []
    for a, b in combinations(samples, 2):
        stat, p, grand_median, _ = median_test(np.asarray(samples[a]), np.asarray(samples[b]))
        rows.append(
            {
                "a": a,
                "b": b,
                "median_a": float(np.median(samples[a])),
                "median_b": float(np.median(samples[b])),
                "grand_median": float(grand_median),
                "statistic": float(stat),
                "p_value": float(p),
            }
        )
    return rows


def calibration(pred, std, ref, k: float = 2.0) -> float:
    """Share of voxels where |pred − ref| ≤ k·std (≈ 0.95 for a calibrated Gaussian uncertainty at k = 2)."""
    err = np.abs(np.asarray(pred, np.float64) - np.asarray(ref, np.float64))
    return float(np.mean(err <= k * np.asarray(std, np.float64)))


def reliability_curve(pred, std, ref, bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Mean predicted std vs observed RMS error in std-quantile bins (for a reliability plot)."""
    s = np.asarray(std, np.float64).ravel()
    e = (np.asarray(pred, np.float64) - np.asarray(ref, np.float64)).ravel()
    edges = np.quantile(s, np.linspace(0, 1, bins + 1))
    which = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, bins - 1)
    predicted = np.array([s[which == i].mean() if np.any(which == i) else np.nan for i in range(bins)])
    observed = np.array([np.sqrt(np.mean(e[which == i] ** 2)) if np.any(which == i) else np.nan for i in range(bins)])
    return predicted, observed


def seam_ratio(image, tile_starts: dict[int, list[int]]) -> float:
    """Gradient energy across the engine's tile borders ÷ gradient energy elsewhere (≈ 1 when there are no seams).

    tile_starts maps an axis to the positions p where a tile border lies between voxel p−1 and p.
    """
    img = np.asarray(image, np.float64)
    on, on_n, off, off_n = 0.0, 0, 0.0, 0
    for axis, starts in tile_starts.items():
        d = np.diff(img, axis=axis) ** 2  # d[i] is the step between voxel i and i+1
        border = np.zeros(d.shape[axis], bool)
        for p in starts:
            if 1 <= p <= d.shape[axis]:
                border[p - 1] = True
        shape = [1] * d.ndim
        shape[axis] = -1
        mask = np.broadcast_to(border.reshape(shape), d.shape)
        on += d[mask].sum()
        on_n += mask.sum()
        off += d[~mask].sum()
        off_n += (~mask).sum()
    if on_n == 0 or off_n == 0 or off == 0:
        return float("nan")
    return float((on / on_n) / (off / off_n))


def lag1_autocorrelation(residual, axis: int) -> float:
    """Autocorrelation at lag 1 along an axis (≈ 0 for white residuals, > 0 when structure was removed)."""
    r = np.asarray(residual, np.float64)
    r = r - r.mean()
    a = np.take(r, np.arange(r.shape[axis] - 1), axis=axis)
    b = np.take(r, np.arange(1, r.shape[axis]), axis=axis)
    denom = np.sqrt(np.sum(a * a) * np.sum(b * b))
    return float(np.sum(a * b) / denom) if denom else float("nan")


def mean_variance(signal, residual, bins: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Residual variance in bins of restored intensity: shot noise gives a rising, roughly linear relation."""
    s = np.asarray(signal, np.float64).ravel()
    r = np.asarray(residual, np.float64).ravel()
    edges = np.quantile(s, np.linspace(0, 1, bins + 1))
    which = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, bins - 1)
    means = np.array([s[which == i].mean() if np.any(which == i) else np.nan for i in range(bins)])
    variances = np.array([r[which == i].var() if np.any(which == i) else np.nan for i in range(bins)])
    return means, variances


def shot_noise_photons(image, q: float = 99.9, at: float | None = None, bins: int = 16) -> float:
    """An image's noise level as photons: the noise variance at its q-th percentile intensity (or at intensity `at`)
    divided by the squared gain, i.e. the photons a pure shot-noise image would have there (read noise adds its
    variance in photons²), from `shot_noise_fit`. `image`: an array, or a list of arrays (e.g. sampled chunks) in one
    fit. Measured on quality.py's crops: within ~30 % at 3-30 photons on real volumes; sharp synthetic structure reads
    as noise (a noiseless phantom: ~100 photons), correlated noise as fewer. A "clean" reference that is itself an
    acquisition (an 8-bit confocal stack: ~56) carries its own noise; degrading it to P photons measures something
    only when P is well below that. NaN when there is too little to fit, inf when no noise rises with intensity."""
    parts = image if isinstance(image, (list, tuple)) else [image]
    gain, intercept = shot_noise_fit(parts, bins)
    if not gain > 0:
        return photons_at(gain, intercept, math.nan)
    level = np.percentile(np.concatenate([np.asarray(p, np.float64).ravel() for p in parts]), q) if at is None else at
    return photons_at(gain, intercept, level)


def photons_at(gain: float, intercept: float, level: float) -> float:
    """Photons the noise fit (`shot_noise_fit`) puts at intensity `level`: variance there / gain² (read noise counts
    as its variance in photons²). NaN for a failed fit, inf when no noise rises with intensity."""
    if not gain > 0:
        return float("nan") if math.isnan(gain) else float("inf")
    return float((gain * level + intercept) / gain**2)


# noise_free_median: histogram bins and EM steps. The EM is stopped early on purpose: run to convergence, the
# maximum-likelihood density of the noise-free intensities turns into a few spikes and its median jumps by several per
# cent of the range between 300 and 3000 steps; at 300 it is smooth and within 1-2 % of the truth at 10-30 photons
# on the quality crops (benchmarks/README.md).
NOISE_FREE_BINS, NOISE_FREE_STEPS = 400, 300


def noise_free_median(values, gain: float, intercept: float) -> float:
    """The median of the noise-free intensities under noisy voxels `values`, given their noise variance
    gain x intensity + intercept (shot_noise_fit). Zero-mean noise keeps the mean but not the median: on a
    fluorescence image (mostly background, a long bright tail) it pulls the median toward the mean (held-out CHO at 10
    photons: 29.2 instead of 25 grey levels, RBC 386 instead of 350). The values' histogram is deconvolved by the
    noise (EM for a mixing density on the histogram's bins, each noise-free bin spread as a Gaussian of the fitted
    variance), and the median read from the result, kept within the values' own quartiles. The plain median when the
    fit failed or shows no noise. Equivariant to gain and offset of the values (with the fit's)."""
    from scipy.special import ndtr

    v = np.asarray(values, np.float64).ravel()
    median = float(np.median(v))
    if not (np.isfinite(gain) and np.isfinite(intercept) and gain > 0):
        return median
    lo, hi = np.quantile(v, [1e-4, 1 - 1e-4])
    if not hi > lo:
        return median
    edges = np.linspace(lo, hi, NOISE_FREE_BINS + 1)
    observed = np.histogram(np.clip(v, lo, hi), edges)[0] / v.size
    centres = (edges[:-1] + edges[1:]) / 2
    std = np.sqrt(np.maximum(gain * centres + intercept, ((hi - lo) / NOISE_FREE_BINS) ** 2 / 4))
    cdf = ndtr((edges[:, None] - centres[None, :]) / std[None, :])
    cdf[0], cdf[-1] = 0.0, 1.0  # what the noise carries past the ends lands in the end bins, as the clip put it
    spread = np.diff(cdf, axis=0)  # P(observed bin | noise-free bin)
    density = np.full(NOISE_FREE_BINS, 1.0 / NOISE_FREE_BINS)
    for _ in range(NOISE_FREE_STEPS):
        density *= spread.T @ (observed / np.maximum(spread @ density, 1e-300))
        density /= density.sum()
    quartiles = np.quantile(v, [0.25, 0.75])
    return float(np.clip(np.interp(0.5, np.cumsum(density), centres), *quartiles))


def shot_noise_fit(image, bins: int = 16) -> tuple[float, float]:
    """(gain, intercept) of the straight line noise variance = gain x intensity + intercept (Poisson-Gaussian: gain =
    intensity units per photon, intercept = gain² x read² - gain x offset); NaNs when there is too little to fit.

    Per voxel (in-plane, last two axes): noise h = x - mean(4 lateral neighbours) (variance 1.25 v for white noise);
    voxels are binned by the mean of the 20 others of their 5 x 5 square, which shares no noise with h, and each bin's
    intensity is the mean of the 5 voxels h uses, which shares no noise with the binning, so neither biases the slope
    at low photon counts (binning by a mean that includes the voxel flattens it: 15 photons read at 3). Variance per
    bin by MAD, so edges count little."""
    parts = image if isinstance(image, (list, tuple)) else [image]
    ring, cross, high = [], [], []
    for part in parts:
        x = np.asarray(part, np.float64)
        x = x.reshape(-1, *x.shape[-2:]) if x.ndim >= 2 else x.reshape(1, 1, -1)
        if min(x.shape[-2:]) < 5:
            continue
        centre = x[:, 2:-2, 2:-2]
        neighbours = x[:, 1:-3, 2:-2] + x[:, 3:-1, 2:-2] + x[:, 2:-2, 1:-3] + x[:, 2:-2, 3:-1]
        square = ndimage.uniform_filter(x, size=(1, 5, 5))[:, 2:-2, 2:-2] * 25
        high.append(((centre - neighbours / 4) / np.sqrt(1.25)).ravel())
        ring.append(((square - centre - neighbours) / 20).ravel())
        cross.append(((centre + neighbours) / 5).ravel())
    if not high:
        return float("nan"), float("nan")
    s, c, h = np.concatenate(ring), np.concatenate(cross), np.concatenate(high)
    edges = np.unique(np.quantile(s, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, max(len(edges) - 2, 0))
    means, variances = [], []
    for i in range(len(edges) - 1):
        hi = h[which == i]
        if hi.size >= 50:
            means.append(c[which == i].mean())
            variances.append((1.4826 * np.median(np.abs(hi - np.median(hi)))) ** 2)
    if len(means) < 3:
        return float("nan"), float("nan")
    gain, intercept = np.polyfit(means, variances, 1)
    return float(gain), float(intercept)
