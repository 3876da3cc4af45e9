"""Counter-based Gaussian noise: keyed draws, and one global noise field per (seed, sample, step) over the image's
voxels, so every tile covering a voxel draws the same value there whatever the tiling, batching or worker."""

import hashlib
import itertools

import numpy as np

# Provenance name of the scheme below; bump it when the numbers a (seed, counter) gives change.
SCHEME = "philox-cells16-v2"
CELL = 16  # field cells per tiled axis: one Philox stream per cell, so a tile only generates what it touches


def key(seed: int, *counter: int) -> np.ndarray:
    """A 128-bit Philox key from a hash of the integers (signed, so halo origins below 0 are fine)."""
    data = np.array([seed, len(counter), *counter], dtype=np.int64).tobytes()
    return np.frombuffer(hashlib.blake2b(data, digest_size=16).digest(), dtype=np.uint64).copy()


def normal(shape, seed: int, *counter: int) -> np.ndarray:
    """Standard normal float32 noise of `shape`; the same (seed, *counter) always gives the same numbers."""
    return np.random.Generator(np.random.Philox(key=key(seed, *counter))).standard_normal(shape, dtype=np.float32)


def field(origin, shape, seed: int, *counter: int) -> np.ndarray:
    """The box [origin, origin + shape) of a global standard-normal field over all integer voxel coordinates (any
    number of axes, negative ones too: halos reach outside the image), for the stream (seed, *counter).

    The field is cut into cells of CELL voxels along every axis whose box is longer than 1 and of 1 voxel along the
    others (2D tiles of a 3D image step through z one slice at a time); each cell is a keyed Philox draw, so a voxel's
    value depends only on (seed, counter, its coordinates, which axes are tiled)."""
    origin, shape = tuple(int(o) for o in origin), tuple(int(s) for s in shape)
    cell = tuple(CELL if s > 1 else 1 for s in shape)
    out = np.empty(shape, np.float32)
    ranges = [range(o // c, -(-(o + s) // c)) for o, s, c in zip(origin, shape, cell)]
    for idx in itertools.product(*ranges):
        lo = [i * c for i, c in zip(idx, cell)]
        block = normal(cell, seed, *counter, len(idx), *cell, *idx)
        src = tuple(slice(max(o - a, 0), min(o + s - a, c)) for o, s, a, c in zip(origin, shape, lo, cell))
        dst = tuple(slice(a + sl.start - o, a + sl.stop - o) for a, sl, o in zip(lo, src, origin))
        out[dst] = block[src]
    return out
