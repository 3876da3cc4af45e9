"""Counter-based Gaussian noise keyed by (seed, sample, tile origin, step): independent of worker, batch and chunking."""

import hashlib

import numpy as np


def key(seed: int, *counter: int) -> np.ndarray:
    """A 128-bit Philox key from a hash of the integers (signed, so halo origins below 0 are fine)."""
    data = np.array([seed, len(counter), *counter], dtype=np.int64).tobytes()
    return np.frombuffer(hashlib.blake2b(data, digest_size=16).digest(), dtype=np.uint64).copy()


def normal(shape, seed: int, *counter: int) -> np.ndarray:
    """Standard normal float32 noise of `shape`; the same (seed, *counter) always gives the same numbers."""
    return np.random.Generator(np.random.Philox(key=key(seed, *counter))).standard_normal(shape, dtype=np.float32)
