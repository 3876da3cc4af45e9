"""SURE on sampled regions of the image: the output blend of one-pass models (model.blend), the std scale of K samples."""

from __future__ import annotations

import math

import numpy as np
import zarr

from volrestore.blockwise.grid import AxisGrid, Grid, fitted_tile
from volrestore.model.blend import LATERAL, N_WEIGHTS, candidates, has_planes, taps, z_averaged
from volrestore.model.restorer import restorer_for

# Regions sampled for the estimate: cut on a grid of their own (REGION voxels per axis the model tiles, no overlap,
# spread over its order), never on the run's tiles, so the weights do not depend on --tile, --overlap or --batch
# (the net's output does not either: no statistics over space). Each costs 2 restorer evaluations; voxels within
# MARGIN of a region's edge inside the volume (the net's zero padding) do not count.
SURE_REGIONS = 2
REGION = {"lateral": 256, "z": 32}
MARGIN = 16
SURE_SEED = 20261206
# The weights come from SURE, which assumes Gaussian noise: below LET_MIN_PHOTONS at the bright end the Poisson
# counts are too few for it and only the input's weight is fitted (measured: the full fit lost 0.1-0.4 dB at 3 photons
# and gained 0.2-1.5 dB at 10-30, benchmarks/README.md).
LET_MIN_PHOTONS = 8.0


def blend_weights(plan, spec, noise_fit: tuple[float, float], photons: float, seed: int = 0) -> tuple[float, ...]:
    """Weights w (in model.blend.candidates' order) minimising Stein's unbiased risk estimate of
    out = model.blend.blend(f, y, w, z): f the restorer `spec` (no blend of its own), y the input, g_j the candidates
    (y, its in-plane smoothings, its z average alone and smoothed; a 2D model has no z ones: weight 0), per-voxel
    noise variance v = gain y + intercept (`noise_fit`, metrics.shot_noise_fit: E[gain y + intercept] is the true
    variance), `photons` the image's level. With R_j = g_j - f, SURE(w) = |y - f - sum w_j R_j|² - sum v
    + 2 sum v d(out)/dy is quadratic: M w = r - c with M_jk = <R_j, R_k>, r_j = <y - f, R_j>, c_j = sum v tap_j - D
    (tap_j the candidate's own weight on each voxel, model.blend.taps; D = sum v df/dy by one perturbed evaluation,
    eps b with b ~ N(0, 1)). Below LET_MIN_PHOTONS only the input's weight is fitted, in [0, 1]. Sums run over the
    inner voxels of SURE_REGIONS sampled regions (independent of the run's tiles); deterministic given input, model
    and seed; rounded to 3 decimals as recorded."""
    gain, intercept = noise_fit
    zero = (0.0,) * N_WEIGHTS
    if not (np.isfinite(gain) and gain > 0):
        return zero  # no shot noise measured: nothing to calibrate against
    restorer, regions = _regions(plan, spec, seed)
    # the candidates this model can form: all, or without the z ones for a 2D model
    usable = list(range(N_WEIGHTS if has_planes(restorer.z_context, restorer.spatial_dims) else LATERAL))
    k = len(usable)
    m, r, vd = np.zeros((k, k)), np.zeros(k), np.zeros(k + 1)  # M, r, (tap-weighted V per candidate, D)
    for where, rng in regions:
        tm, tr, tvd = _region_sums(*where, gain, intercept, rng, seed, usable)
        m, r, vd = m + tm, r + tr, vd + tvd
    tv, d = vd[:-1], vd[-1]  # tv[0] = V, the summed noise variance (the input's own tap is 1)
    v = tv[0]
    if m[0, 0] <= 0:
        return zero  # f is the input: nothing to give back
    if not photons >= LET_MIN_PHOTONS:
        return (round(float(np.clip((r[0] - (v - d)) / m[0, 0], 0.0, 1.0)), 3), *zero[1:])
    c = tv - d
    w = np.linalg.lstsq(m, r - c, rcond=1e-10)[0]
    if not np.all(np.isfinite(w)):
        return zero
    weights = [0.0] * N_WEIGHTS
    for j, x in zip(usable, w):
        weights[j] = round(float(x), 3)
    return tuple(weights)


def std_scale(plan, spec, noise_fit: tuple[float, float], seed: int = 0) -> tuple[float, float]:
    """(factor, floor) that turn the K samples' spread s into the estimated error of their mean on this image:
    std² = (factor s)² + floor², the least-squares fit of the mean's squared error e² over the inner voxels of the
    SURE_REGIONS sampled regions, factor² and floor² >= 0, without the truth: the fit's normal equations need
    sum w e² for the weights w = s² and w = 1, and SURE estimates each, sum w [(y - f)² - v + 2 v df/dy] (f the
    restorer `spec`'s mean with its std unscaled, v = gain y + intercept, `noise_fit`; df_i/dy_i by one perturbed
    call with the same sampler noise, b_i (f(y + eps b) - f(y))_i / eps, unbiased per voxel). s depends on the noise
    at its own voxel only through the samples' shared input: taken as a fixed weight.

    Why: the K samples' std is not the error of their mean. For exact posterior samples the mean misses by the
    posterior spread × sqrt(1 + 1/K); a few-step sampler spreads its samples less than the posterior (DDIM 10 on CHO:
    2·std covered 0.79 of the voxels), and a model on data unlike its training errs where its samples agree (the
    shipped model on RBC: no single factor covered more than 0.65). The floor is the error the spread does not see.
    (1.0, 0.0), the raw spread, when no shot noise was measured or SURE finds no error (an estimate that noisy says
    nothing); 4 significant digits as recorded. SURE takes the noise as Gaussian of that variance: at a few photons
    the Poisson counts make it approximate (benchmarks/README.md has the coverage it gives)."""
    raw = (1.0, 0.0)
    gain, intercept = noise_fit
    if not (np.isfinite(gain) and gain > 0):
        return raw
    _, regions = _regions(plan, spec, seed)
    gram, rhs = np.zeros((2, 2)), np.zeros(2)  # the normal equations over the bases (s², 1)
    for where, rng in regions:
        reg = _region_restored(*where, gain, intercept, rng, seed)
        inner, v = reg["inner"], reg["v"]
        risk = (reg["y"] - reg["f"]) ** 2 - v + 2 * v * reg["b"] * (reg["f2"] - reg["f"]) / reg["eps"]
        bases = np.stack([reg["std"][inner] ** 2, np.ones(int(inner.sum()))])
        gram += bases @ bases.T
        rhs += bases @ risk[inner]
    coef = _nonnegative_least_squares(gram, rhs)
    if coef is None or not coef.any():
        return raw
    return tuple(float(f"{np.sqrt(c):.4g}") for c in coef)


def _nonnegative_least_squares(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray | None:
    """argmin over a >= 0 of a' G a - 2 a' r (G positive semi-definite), by trying every set of free coefficients
    (two here); None when nothing is finite."""
    n, best, best_value = len(rhs), None, np.inf
    for mask in range(1 << n):
        free = [i for i in range(n) if mask >> i & 1]
        a = np.zeros(n)
        if free:
            sub = gram[np.ix_(free, free)]
            if abs(np.linalg.det(sub)) < 1e-300:
                continue
            a[free] = np.linalg.solve(sub, rhs[free])
        if np.all(a >= 0) and np.all(np.isfinite(a)):
            value = a @ gram @ a - 2 * a @ rhs
            if value < best_value:
                best, best_value = a, value
    return best


def _regions(plan, spec, seed: int):
    """(the restorer of `spec`, [((plan, grid, restorer, src, spatial, fixed, region index), rng), ...]): the
    SURE_REGIONS regions the estimates sample, spread over the region grid's order, each with its own perturbation
    generator; the middle point of non-spatial axes (time, channel)."""
    restorer = restorer_for(spec)
    grid = _region_grid(plan.grid, restorer.size_multiple)
    src = zarr.open_group(plan.input, mode="r")[plan.input_array]
    fixed = {d: src.shape[d] // 2 for d in plan.other_axes}
    n = grid.n_tiles
    # Regions smaller than REGION (a small image, or planes of one) are sampled until they hold as many voxels as
    # SURE_REGIONS full ones: the fit's noise falls with its voxel count (9 blend weights on two 64² planes of a
    # small crop vs all 16: shipped regression on the quality crops +0.08 dB on average, NOTES.md).
    full = math.prod(_region_extent(plan.grid, d) for d in range(len(plan.grid.axes)))
    count = min(n, max(SURE_REGIONS, -(-SURE_REGIONS * full // math.prod(grid.tile_shape))))
    picks = sorted({min(n - 1, (i + 1) * n // (count + 1)) for i in range(count)})
    return restorer, [((plan, grid, restorer, src, plan.spatial_axes, fixed, np.unravel_index(flat, grid.counts)),
                       np.random.default_rng([SURE_SEED, seed, flat])) for flat in picks]


def _region_grid(grid, multiple: int):
    """The sampling regions' grid: REGION voxels (rounded down to the net's size multiple) along the axes the run
    tiles, 1 along an axis it does not (a 2D model's z, whose context slices come along), no overlap."""
    axes = []
    for d, ax in enumerate(grid.axes):
        if ax.tile == 1:
            axes.append(AxisGrid(ax.size, 1, 0, ax.context))
            continue
        want = max(multiple, _region_extent(grid, d) // multiple * multiple)
        axes.append(AxisGrid(ax.size, fitted_tile(ax.size, want, 0, multiple), 0, ax.context))
    return Grid(tuple(axes))


def _region_extent(grid, d: int) -> int:
    """A full region's voxels along axis d of the run's tile grid: REGION's z or lateral size, 1 where the run does
    not tile (tile 1)."""
    if grid.axes[d].tile == 1:
        return 1
    return REGION["z"] if d == 0 and len(grid.axes) == 3 else REGION["lateral"]


def _region_restored(plan, grid, restorer, src, spatial, fixed, k, gain, intercept, rng, seed) -> dict:
    """One region k of `grid`, read with its context (reflected as the block tasks read it) and restored twice in one
    call, as is and perturbed by eps·b (b ~ N(0, 1)): the region's own voxels as y (input), f and f2 (the two
    restorations), std (the unperturbed call's, when the restorer gives one), b, v (noise variance), `inner` (where a
    voxel counts: inside the volume, not a reflected copy, and away from an edge that cuts it), eps, and what the
    blend's z candidates need (the read region, its index and the own-voxel slices)."""
    ranges = [range(int(kk), int(kk) + 1) for kk in k]
    read = [ax.read_range(rr) for ax, rr in zip(grid.axes, ranges)]
    it = iter(read)
    selection = tuple(slice(*next(it)) if d in spatial else fixed[d] for d in range(len(plan.axes)))
    region = np.asarray(src[selection], np.float64)
    region = np.nan_to_num(region) if plan.fill_nan else region
    # Not clipped at 0: SURE needs E[v] to be the noise variance, and where read noise takes a dark voxel below
    # -intercept/gain a clipped v is too large (by 4 % of the mean on a 10-photon phantom: a third of the
    # restoration's error).
    variance = gain * region + intercept
    eps = 0.01 * float(np.sqrt(max(variance.mean(), 0.0))) or 1e-6
    b = rng.standard_normal(region.shape)
    index = np.ix_(*(ax.tile_index(int(kk), rr[0]) for ax, kk, rr in zip(grid.axes, k, read)))
    data = np.stack([region[index], (region + eps * b)[index]]).astype(np.dtype(plan.read_dtype))
    squeeze = restorer.spatial_dims < len(spatial)
    origins = [tuple(ax.start(int(kk)) for ax, kk in zip(grid.axes, k))] * 2
    out = restorer(data[:, 0] if squeeze and not restorer.z_context else data, origins, seed)
    f, f2 = (np.asarray(o, np.float64).reshape(grid.tile_shape) for o in out["mean"])
    std = np.asarray(out["std"][0], np.float64).reshape(grid.tile_shape) if "std" in out else None
    # The region's own voxels (a 2.5D region's context slices stripped), and where each counts.
    own = tuple(slice(ax.context, ax.context + ax.tile) for ax in grid.axes)
    y, bc, v = (a[index][own] for a in (region, b, variance))
    inner = np.ones(grid.tile_shape, bool)
    for d, (ax, kk) in enumerate(zip(grid.axes, k)):
        start = ax.start(int(kk))
        pos = start + np.arange(ax.tile)
        ok = (pos >= 0) & (pos < ax.size)
        if ax.tile > 1:
            ok &= (pos >= start + MARGIN) | (start <= 0)
            ok &= (pos < start + ax.tile - MARGIN) | (start + ax.tile >= ax.size)
        inner &= ok.reshape([-1 if e == d else 1 for e in range(len(grid.axes))])
    return {"y": y, "f": f, "f2": f2, "std": std, "b": bc, "v": v, "inner": inner, "eps": eps, "region": region,
            "index": index, "own": own}


def _region_sums(plan, grid, restorer, src, spatial, fixed, k, gain, intercept, rng, seed, usable):
    """(M, r, (sum v·tap_j for each usable candidate j, D)) of one region (`_region_restored`)."""
    reg = _region_restored(plan, grid, restorer, src, spatial, fixed, k, gain, intercept, rng, seed)
    y, f, f2, bc, v, inner, own = (reg[key] for key in ("y", "f", "f2", "b", "v", "inner", "own"))
    region, index = reg["region"], reg["index"]
    # The z average as the restorer forms it from the same planes: a 2.5D region's context planes, a 3D region's own.
    z = None
    if restorer.z_context:  # (1 + 2c, Y, X) -> the own plane's average (1, Y, X), then its own lateral voxels
        z = z_averaged(region[index][None], restorer.z_context)[(slice(None), *own[1:])]
    elif has_planes(0, restorer.spatial_dims):  # a 3D region: every plane's average, then its own voxels
        z = z_averaged(region[index][None], 0)[0][own]
    every = candidates(y[None], None if z is None else z[None])
    rr = [(every[j][0] - f)[inner] for j in usable]
    m = np.array([[np.dot(a, b2) for b2 in rr] for a in rr])
    r = np.array([np.dot(rr[0], x) for x in rr])
    # Each candidate's own weight per voxel: a number, or per plane of the 3D region as it was filtered (then cut to
    # its own planes like y).
    tap = taps(restorer.z_context, restorer.spatial_dims, region[index].shape[0],
               index[0] if restorer.z_context else None)
    per_voxel = [np.broadcast_to(np.reshape(tap[j] if np.ndim(tap[j]) == 0 else tap[j][own[0]],
                                            (-1,) + (1,) * (y.ndim - 1)), y.shape) for j in usable]
    tv = [np.sum((v * t)[inner]) for t in per_voxel]
    return m, r, np.array([*tv, np.sum((bc * v * (f2 - f))[inner]) / reg["eps"]])
