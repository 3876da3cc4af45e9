"""Synthetic fluorescence-like volumes (nuclei, membranes, filaments, puncta seen through a PSF) for demos, tests and training."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def phantom(shape=(64, 128, 128), seed: int = 0, psf_sigma=(1.6, 0.9, 0.9), background: float = 0.05) -> np.ndarray:
    """A clean volume in [0, ~1]: a mixture of structures typical of light-sheet and confocal data, blurred by a
    Gaussian PSF (sigma per axis in voxels, wider along z as in most microscopes). Same seed, same volume."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    vol = np.zeros(shape, np.float32)
    grid = np.indices(shape, dtype=np.float32)
    size = np.array(shape, np.float32)
    scale = float(np.cbrt(np.prod(size) / (64 * 128 * 128)))  # keep densities similar across volume sizes

    # Nuclei: filled ellipsoids with a soft edge and a speckled chromatin texture.
    texture = ndimage.gaussian_filter(rng.random(shape).astype(np.float32), 1.5)
    texture = (texture - texture.min()) / (np.ptp(texture) + 1e-6)
    for _ in range(max(1, int(5 * scale))):
        c = rng.uniform(0.15, 0.85, 3) * size
        r = rng.uniform(0.08, 0.16, 3) * size.min() * np.array([0.7, 1.0, 1.0])
        d = np.sqrt(sum(((grid[i] - c[i]) / r[i]) ** 2 for i in range(3)))
        vol += rng.uniform(0.25, 0.45) * (1 / (1 + np.exp(np.clip((d - 1) * 12, -50, 50)))) * (0.6 + 0.8 * texture)

    # Membranes: thin spherical shells (cells, vesicles).
    for _ in range(max(1, int(6 * scale))):
        c = rng.uniform(0.1, 0.9, 3) * size
        r = rng.uniform(0.1, 0.25) * size.min()
        d = np.sqrt(sum((grid[i] - c[i]) ** 2 for i in range(3)))
        vol += rng.uniform(0.3, 0.6) * np.exp(-((d - r) ** 2) / (2 * 0.8**2))

    # Filaments: smooth random walks with momentum (microtubules, actin, neurites), one voxel wide before blur.
    for _ in range(max(2, int(24 * scale))):
        p = rng.uniform(0, 1, 3) * size
        v = rng.normal(size=3)
        v /= np.linalg.norm(v)
        brightness = rng.uniform(0.5, 1.0)
        for _ in range(int(2.5 * size.max())):
            v = v + rng.normal(0, 0.15, 3)
            v /= np.linalg.norm(v)
            p = p + 0.5 * v
            idx = np.round(p).astype(int)
            if np.any(idx < 0) or np.any(idx >= size):
                break
            vol[tuple(idx)] = max(vol[tuple(idx)], brightness * 2.5)

    # Puncta: diffraction-limited spots (vesicles, single molecules).
    n = max(4, int(150 * scale))
    idx = tuple(rng.integers(0, s, n) for s in shape)
    np.add.at(vol, idx, rng.uniform(1.5, 4.0, n).astype(np.float32))

    vol = ndimage.gaussian_filter(vol, psf_sigma)
    vol = vol / max(float(np.percentile(vol, 99.9)), 1e-6)
    return (np.clip(vol, 0, 1.5) + background).astype(np.float32)
