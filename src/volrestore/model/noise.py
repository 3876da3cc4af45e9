"""Counter-based Gaussian noise: keyed draws, and one global noise field per (seed, sample, step) over the image's
voxels, so every tile covering a voxel draws the same value there whatever the tiling, batching or worker.

Two field generators, named in provenance (the restorer's `noise` option): SCHEME, numpy's Philox per 16-voxel cell
(the CPU's: fastest there and what every recorded CPU result used), and DEVICE_SCHEME, Philox4x32-10 per voxel in
torch integer ops, which runs where the network runs (a GPU draws its own noise: no host generation or copy)."""

import hashlib
import itertools
import math

import numpy as np

# Provenance names of the schemes below; bump one when the numbers a (seed, counter) gives change.
SCHEME = "philox-cells16-v2"
DEVICE_SCHEME = "philox4x32-voxel-v1"
SCHEMES = {"cells": SCHEME, SCHEME: SCHEME, "voxel": DEVICE_SCHEME, DEVICE_SCHEME: DEVICE_SCHEME}
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


# Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"): multipliers and Weyl key bumps.
_M0, _M1, _W0, _W1, _MASK = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85, 0xFFFFFFFF


def _mulhilo(m: int, b):
    """(hi, lo) 32-bit words of the 64-bit product m·b for a constant m and a tensor b of uint32 values in int64:
    torch has no uint64, so m is split in 16-bit halves and every partial product stays below 2^49."""
    p, q = b * (m >> 16), b * (m & 0xFFFF)
    r = ((p & 0xFFFF) << 16) + q
    return (p >> 16) + (r >> 32), r & _MASK


def philox4x32(counter, key, rounds: int = 10):
    """Philox4x32 of four counter words (int64 tensors holding uint32 values, broadcastable) under a key of two
    uint32 ints; returns the four output words. Checked against Random123's known-answer vectors in the tests."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def field_torch(origin, shape, seed: int, *counter: int, device="cpu"):
    """The box [origin, origin + shape) of DEVICE_SCHEME's global standard-normal field, as a float32 tensor on
    `device`. Each voxel is one Philox4x32 draw whose counter is its last three coordinates (mod 2^32, so halos below
    0 are fine) plus a stream word, under a key hashed from (seed, *counter, leading coordinates): a voxel's value
    depends only on (seed, counter, its coordinates), never on the box it is drawn in."""
    import torch

    origin, shape = tuple(int(o) for o in origin), tuple(int(s) for s in shape)
    lead, pad = len(origin) - min(len(origin), 3), max(0, 3 - len(origin))  # leading axes; missing ones of z, y, x
    out = torch.empty(shape, dtype=torch.float32, device=device)
    axes = [torch.arange(o, o + n, dtype=torch.int64, device=device) & _MASK for o, n in zip(origin[lead:], shape[lead:])]
    axes = [torch.zeros(1, dtype=torch.int64, device=device)] * pad + axes
    z, y, x = (a.view(*[-1 if i == j else 1 for j in range(3)]) for i, a in enumerate(axes))
    for idx in itertools.product(*[range(o, o + n) for o, n in zip(origin[:lead], shape[:lead])]):
        words = [int(w) for w in np.frombuffer(key(seed, *counter, *idx).tobytes(), dtype=np.uint32)]
        w0, w1, _, _ = philox4x32((x, y, z, torch.full((), words[2], dtype=torch.int64, device=device)),
                                  (words[0], words[1]))
        out[tuple(i - o for i, o in zip(idx, origin))] = _box_muller(w0, w1).reshape(shape[lead:])
    return out


def _box_muller(w0, w1):
    """One standard normal per pair of uint32 words: 24-bit uniforms, u1 in (0, 1) so the log is finite."""
    import torch

    u1 = ((w0 >> 8).to(torch.float32) + 0.5) * 2.0**-24
    u2 = (w1 >> 8).to(torch.float32) * 2.0**-24
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
