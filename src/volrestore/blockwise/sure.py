"""SURE-chosen output blend of one-pass models (model.blend): its weights, from sampled tiles of the image at plan time."""

from __future__ import annotations

import numpy as np
import zarr

from volrestore.model.blend import BLEND_SIGMAS, N_WEIGHTS, centre_tap, smoothed
from volrestore.model.restorer import restorer_for

# Tiles sampled for the estimate (spread over the grid's tile order); each costs 2 restorer evaluations.
SURE_TILES = 2
SURE_SEED = 20261206
# The weights come from SURE, which assumes Gaussian noise: below LET_MIN_PHOTONS at the bright end the Poisson
# counts are too few for it and only the input's weight is fitted (measured: the full fit lost 0.1-0.4 dB at 3 photons
# and gained 0.2-1.5 dB at 10-30, benchmarks/README.md).
LET_MIN_PHOTONS = 8.0


def blend_weights(plan, spec, noise_fit: tuple[float, float], photons: float, seed: int = 0) -> tuple[float, ...]:
    """Weights w (the input's, then each of BLEND_SIGMAS') minimising Stein's unbiased risk estimate of
    out = model.blend.blend(f, y, w): f the restorer `spec` (no blend of its own), y the input, g_j the candidates
    (y and its smoothed copies), per-voxel noise variance v = gain y + intercept (`noise_fit`, metrics.shot_noise_fit:
    E[gain y + intercept] is the true variance), `photons` the image's level. With R_j = g_j - f, SURE(w) =
    |y - f - sum w_j R_j|² - sum v + 2 sum v d(out)/dy is quadratic: M w = r - c with M_jk = <R_j, R_k>, r_j =
    <y - f, R_j>, c_j = tap_j V - D (V = sum v, D = sum v df/dy by one perturbed evaluation, eps b with b ~ N(0, 1),
    tap_j the candidate's own divergence). Below LET_MIN_PHOTONS only the input's weight is fitted, in [0, 1]. Sums
    run over the inner voxels (blend weight 1, inside the volume) of SURE_TILES tiles; deterministic given input,
    model and seed; rounded to 3 decimals as recorded."""
    gain, intercept = noise_fit
    zero = (0.0,) * N_WEIGHTS
    if not (np.isfinite(gain) and gain > 0):
        return zero  # no shot noise measured: nothing to calibrate against
    restorer = restorer_for(spec)
    grid = plan.grid
    src = zarr.open_group(plan.input, mode="r")[plan.input_array]
    spatial = [d for d, a in enumerate(plan.axes) if a in "zyx"]
    fixed = {d: src.shape[d] // 2 for d, a in enumerate(plan.axes) if a not in "zyx"}  # the middle time point etc.
    n = grid.n_tiles
    picks = sorted({min(n - 1, (i + 1) * n // (SURE_TILES + 1)) for i in range(SURE_TILES)})
    k = N_WEIGHTS
    m, r, vd = np.zeros((k, k)), np.zeros(k), np.zeros(2)  # M, r, (V, D)
    for flat in picks:
        tm, tr, tvd = _tile_sums(plan, restorer, src, spatial, fixed, np.unravel_index(flat, grid.counts), gain,
                                 intercept, np.random.default_rng([SURE_SEED, seed, flat]), seed)
        m, r, vd = m + tm, r + tr, vd + tvd
    v, d = vd
    if m[0, 0] <= 0:
        return zero  # f is the input: nothing to give back
    if not photons >= LET_MIN_PHOTONS:
        return (round(float(np.clip((r[0] - (v - d)) / m[0, 0], 0.0, 1.0)), 3), *zero[1:])
    c = np.array([v - d] + [centre_tap(s) * v - d for s in BLEND_SIGMAS])
    w = np.linalg.lstsq(m, r - c, rcond=1e-10)[0]
    return tuple(round(float(x), 3) for x in w) if np.all(np.isfinite(w)) else zero


def _tile_sums(plan, restorer, src, spatial, fixed, k, gain, intercept, rng, seed):
    """(M, r, (V, D)) of one tile: its input read with its context (reflected as the block tasks read it), restored
    as is and perturbed in the same call."""
    grid = plan.grid
    ranges = [range(int(kk), int(kk) + 1) for kk in k]
    read = [ax.read_range(rr) for ax, rr in zip(grid.axes, ranges)]
    it = iter(read)
    selection = tuple(slice(*next(it)) if d in spatial else fixed[d] for d in range(len(plan.axes)))
    region = np.asarray(src[selection], np.float64)
    region = np.nan_to_num(region) if plan.fill_nan else region
    variance = np.clip(gain * region + intercept, 0.0, None)
    eps = 0.01 * float(np.sqrt(variance.mean())) or 1e-6
    b = rng.standard_normal(region.shape)
    index = np.ix_(*(ax.tile_index(int(kk), rr[0]) for ax, kk, rr in zip(grid.axes, k, read)))
    data = np.stack([region[index], (region + eps * b)[index]]).astype(np.dtype(plan.read_dtype))
    squeeze = restorer.spatial_dims < len(spatial)
    origins = [tuple(ax.start(int(kk)) for ax, kk in zip(grid.axes, k))] * 2
    out = restorer(data[:, 0] if squeeze and not restorer.z_context else data, origins, seed)["mean"]
    f, f2 = (np.asarray(o, np.float64).reshape(grid.tile_shape) for o in out)
    # The tile's own voxels (a 2.5D tile's context slices stripped), and where each counts: blend weight 1 (no
    # neighbour shares it) and inside the volume (not a reflected copy).
    own = tuple(slice(ax.context, ax.context + ax.tile) for ax in grid.axes)
    y, bc, v = (a[index][own] for a in (region, b, variance))
    inner = np.ones(grid.tile_shape, bool)
    for d, (ax, kk) in enumerate(zip(grid.axes, k)):
        pos = ax.start(int(kk)) + np.arange(ax.tile)
        ok = (ax.weights(int(kk)) == 1.0) & (pos >= 0) & (pos < ax.size)
        inner &= ok.reshape([-1 if e == d else 1 for e in range(len(grid.axes))])
    residuals = [y - f] + [smoothed(y[None], s)[0] - f for s in BLEND_SIGMAS]
    rr = [x[inner] for x in residuals]
    m = np.array([[np.dot(a, b2) for b2 in rr] for a in rr])
    r = np.array([np.dot(rr[0], x) for x in rr])
    return m, r, np.array([v[inner].sum(), np.sum((bc * v * (f2 - f))[inner]) / eps])
