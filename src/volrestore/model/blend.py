"""The output blend of one-pass models: the restoration plus weighted differences to the input and smoothed inputs."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# The candidates besides the restoration f: the input itself and in-plane Gaussian filters of it (sigma in voxels);
# their weights are chosen per image by blockwise.sure.
BLEND_SIGMAS = (0.5, 1.0)
N_WEIGHTS = 1 + len(BLEND_SIGMAS)


def smoothed(y: np.ndarray, sigma: float) -> np.ndarray:
    """y filtered by an in-plane (last two axes) Gaussian of `sigma` voxels, reflected at the array's edges; axis 0
    is the batch."""
    return ndimage.gaussian_filter(y, (0,) * (y.ndim - 2) + (sigma, sigma), mode="reflect")


def blend(f: np.ndarray, y: np.ndarray, weights) -> np.ndarray:
    """f + w0 (y - f) + sum_j w_j (G_sigma_j y - f), float64; f and y (batch, *spatial)."""
    out = f + weights[0] * (y - f)
    for w, sigma in zip(weights[1:], BLEND_SIGMAS):
        if w:
            out = out + w * (smoothed(y, sigma) - f)
    return out


def centre_tap(sigma: float) -> float:
    """d(G_sigma y)_i / dy_i: the filter's centre weight (its divergence per voxel)."""
    delta = np.zeros((1, 1, 41, 41))
    delta[..., 20, 20] = 1.0
    return float(smoothed(delta, sigma)[0, 0, 20, 20])
