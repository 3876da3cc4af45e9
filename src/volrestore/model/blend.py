"""The output blend of one-pass models: the restoration plus weighted differences to the input and smoothed inputs."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# The candidates besides the restoration f, each weighted per image by blockwise.sure: the input y itself, in-plane
# Gaussian filters of it (sigma in voxels), and its average over neighbouring planes (a Gaussian of Z_SIGMA planes cut
# at Z_RADIUS, the planes a 2.5D tile brings as context), alone and filtered in-plane by Z_LATERAL_SIGMAS. The z ones
# put back, where SURE finds it pays (finely sampled stacks), the averaging across planes that the shipped 2.5D net
# learned to distrust (its z-stride training for coarse stacks): measured with the truth-chosen weights on the
# shipped regression, RBC at 10 photons +0.75 dB, CHO (1 um planes) +0.05 (NOTES.md).
# Wider filters since 2026-12-07 (in-plane 2 and 4, z-averaged 2 and 4, shipped regression on the quality crops at
# 10 / 30 photons): binned CHO +0.17 / +0.23 dB, RBC +0.23 / +0.35, CHO +0.03 / +0.05, phantoms -0.13 / +0.01;
# adding 8 in-plane cost the phantoms 0.06 more and gained nothing on the real crops (NOTES.md).
BLEND_SIGMAS = (0.5, 1.0, 2.0, 4.0)
Z_SIGMA, Z_RADIUS, Z_LATERAL_SIGMAS = 1.0, 2, (1.0, 2.0, 4.0)
LATERAL = 1 + len(BLEND_SIGMAS)  # the candidates of any model: y and its in-plane smoothings; the z ones follow
N_WEIGHTS = LATERAL + 1 + len(Z_LATERAL_SIGMAS)


def smoothed(y: np.ndarray, sigma: float) -> np.ndarray:
    """y filtered by an in-plane (last two axes) Gaussian of `sigma` voxels, reflected at the array's edges; axis 0
    is the batch."""
    return ndimage.gaussian_filter(y, (0,) * (y.ndim - 2) + (sigma, sigma), mode="reflect")


def has_planes(context: int, spatial_dims: int) -> bool:
    """Whether a model's tiles bring the planes the z candidates average: a 2.5D tile's context planes or a 3D tile's
    own; a 2D model's tiles have none, so its z weights stay 0."""
    return bool(context) or spatial_dims == 3


def z_kernel(radius: int = Z_RADIUS) -> np.ndarray:
    """The plane weights of the z average: a Gaussian of Z_SIGMA planes over offsets -radius..radius, summing to 1."""
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (offsets / Z_SIGMA) ** 2)
    return weights / weights.sum()


def z_averaged(stack: np.ndarray, context: int) -> np.ndarray:
    """The input averaged over neighbouring planes, shaped like the blend's y. stack (batch, planes, Y, X): a 2.5D
    tile's 1 + 2·context input planes (the own plane in the middle; the average is the own plane's, over
    min(context, Z_RADIUS) planes each side), or with context 0 a 3D tile (every plane's, reflected at its ends)."""
    stack = np.asarray(stack, np.float64)
    if context:
        radius = min(context, Z_RADIUS)
        planes = stack[:, context - radius:context + radius + 1]
        return np.tensordot(planes, z_kernel(radius), axes=([1], [0]))
    return ndimage.correlate1d(stack, z_kernel(), axis=1, mode="reflect")


def candidates(y: np.ndarray, z: np.ndarray | None) -> list[np.ndarray]:
    """The blend's candidates in weight order (y, its in-plane smoothings, then z and z smoothed in-plane); a model
    without planes around its tiles (2D) has no z ones (None)."""
    out = [y] + [smoothed(y, s) for s in BLEND_SIGMAS]
    return out + ([z] + [smoothed(z, s) for s in Z_LATERAL_SIGMAS] if z is not None else [None] * (N_WEIGHTS - LATERAL))


def blend(f: np.ndarray, y: np.ndarray, weights, z: np.ndarray | None = None) -> np.ndarray:
    """f + sum_j w_j (candidate_j - f), float64; f, y and z (the input's z average, `z_averaged`) (batch, *spatial).
    Weights of absent candidates must be 0."""
    out = np.asarray(f, np.float64)
    for w, g in zip(weights, candidates(y, z) if any(weights[1:]) else [y]):
        if w:
            if g is None:
                raise ValueError("blend weights for the z candidates need the input's neighbouring planes")
            out = out + w * (g - f)
    return out


def centre_tap(sigma: float) -> float:
    """d(G_sigma y)_i / dy_i: the in-plane filter's centre weight (its divergence per voxel)."""
    delta = np.zeros((1, 1, 41, 41))
    delta[..., 20, 20] = 1.0
    return float(smoothed(delta, sigma)[0, 0, 20, 20])


def taps(context: int, spatial_dims: int, planes: int = 0, context_planes=None) -> list:
    """Each candidate's own weight on the voxel it replaces (d candidate_i / d y_i), for SURE's divergence: a number,
    or for the z candidates of a 3D tile of `planes` planes one per plane (reflection at its ends folds more of the
    kernel onto a plane near them); None for a candidate this model cannot form (no planes around a 2D model's tiles).
    A 2.5D tile's `context_planes` (the volume planes its 1 + 2·context input planes are, reflected at the volume's
    ends) count the own plane wherever the reflection repeats it: at an end plane the kernel's weight on it is 0.65,
    not 0.40, and taking 0.40 there made SURE trust the z candidates far too much (NOTES.md)."""
    lateral = [1.0] + [centre_tap(s) for s in BLEND_SIGMAS]
    if not has_planes(context, spatial_dims):
        return lateral + [None] * (N_WEIGHTS - LATERAL)
    if context:
        radius = min(context, Z_RADIUS)
        k = z_kernel(radius)
        seen = np.arange(2 * context + 1) if context_planes is None else np.asarray(context_planes).ravel()
        used = seen[context - radius:context + radius + 1]
        own = float(np.sum(k[used == seen[context]]))
    else:
        own = np.diagonal(ndimage.correlate1d(np.eye(planes), z_kernel(), axis=1, mode="reflect")).copy()
    return lateral + [own] + [own * centre_tap(s) for s in Z_LATERAL_SIGMAS]
