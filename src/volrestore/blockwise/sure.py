"""SURE-calibrated residual blend: the share of the input a one-pass restoration gives back, chosen on sampled tiles."""

from __future__ import annotations

import numpy as np
import zarr

from volrestore.model.restorer import restorer_for

# Tiles sampled for the estimate (spread over the grid's tile order); each costs 2 restorer evaluations.
SURE_TILES = 2
SURE_SEED = 20261206


def blend_share(plan, spec, noise_fit: tuple[float, float], seed: int = 0) -> float:
    """alpha in [0, 1] minimising Stein's unbiased risk estimate of f + alpha (y - f), with f the restorer `spec` (no
    blend of its own), y the input and per-voxel noise variance v = gain y + intercept (`noise_fit`, from
    metrics.shot_noise_fit; E[gain y + intercept] is the true variance). With A = |y - f|², V = sum v and
    D = sum v df/dy (the divergence weighted by the variance, estimated by perturbing the input by eps b, b ~ N(0, 1)),
    SURE(alpha) = (1 - alpha)² A + 2 (1 - alpha) D + 2 alpha V - V is smallest at alpha = 1 - (V - D) / A. Summed over
    the inner voxels (blend weight 1, inside the volume) of SURE_TILES tiles, deterministic given input, model and
    seed. A net that removes only noise gets alpha ~ 0; one that also smooths away structure it did not learn gets
    more of the input back (measured in benchmarks/README.md). Rounded to 3 decimals, as it is recorded."""
    gain, intercept = noise_fit
    if not (np.isfinite(gain) and gain > 0):
        return 0.0  # no shot noise measured: nothing to calibrate against
    restorer = restorer_for(spec)
    grid = plan.grid
    src = zarr.open_group(plan.input, mode="r")[plan.input_array]
    spatial = [d for d, a in enumerate(plan.axes) if a in "zyx"]
    fixed = {d: src.shape[d] // 2 for d, a in enumerate(plan.axes) if a not in "zyx"}  # the middle time point etc.
    n = grid.n_tiles
    picks = sorted({min(n - 1, (i + 1) * n // (SURE_TILES + 1)) for i in range(SURE_TILES)})
    sums = np.zeros(3)  # A, D, V
    for flat in picks:
        sums += _tile_sums(plan, restorer, src, spatial, fixed, np.unravel_index(flat, grid.counts), gain, intercept,
                           np.random.default_rng([SURE_SEED, seed, flat]), seed)
    a, d, v = sums
    return round(float(np.clip(1.0 - (v - d) / a, 0.0, 1.0)), 3) if a > 0 else 0.0


def _tile_sums(plan, restorer, src, spatial, fixed, k, gain, intercept, rng, seed) -> np.ndarray:
    """(A, D, V) of one tile: its input read with its context (reflected as the block tasks read it), restored as
    is and perturbed in the same call."""
    grid = plan.grid
    ranges = [range(int(kk), int(kk) + 1) for kk in k]
    read = [ax.read_range(r) for ax, r in zip(grid.axes, ranges)]
    selection, it = [], iter(read)
    for d in range(len(plan.axes)):
        selection.append(slice(*next(it)) if d in spatial else fixed[d])
    region = np.nan_to_num(np.asarray(src[tuple(selection)], np.float64)) if plan.fill_nan else \
        np.asarray(src[tuple(selection)], np.float64)
    variance = np.clip(gain * region + intercept, 0.0, None)
    eps = 0.01 * float(np.sqrt(variance.mean())) or 1e-6
    b = rng.standard_normal(region.shape)
    index = np.ix_(*(ax.tile_index(int(kk), r[0]) for ax, kk, r in zip(grid.axes, k, read)))
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
    return np.array([np.sum(((y - f) ** 2)[inner]), np.sum((bc * v * (f2 - f))[inner]) / eps, np.sum(v[inner])])
