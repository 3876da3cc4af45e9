"""Fixed global tile grid (core + halo/overlap) anchored at the volume origin: reflection indices, sin² blending weights, tiles per block."""

# Per spatial axis of length N, with tile length T, overlap O (T >= 2*O) and stride S = T - O:
#   tile k covers the global voxels [k*S - O, k*S - O + T),
#   count = 1 if N + 2*O <= T else ceil((N + 2*O - T) / S) + 1   (the last tile reaches at least O past the end).
# So every voxel of the volume has at least O voxels of context in its tiles; voxels outside [0, N) are read by
# half-sample symmetric reflection (works for any pad, even N = 1). Neighbouring tiles share exactly O voxels, and
# T >= 2*O means at most two tiles overlap on any axis. Blending weight of tile k along an axis: sin² ramp up over
# its first O voxels when tile k-1 exists, the complementary cos² ramp over its last O voxels when tile k+1 exists,
# 1 elsewhere (so 1 at the true volume borders). Per axis the weights of the tiles covering a voxel sum to 1; in 3D
# the product weights sum to 1 too, and the engine still divides by the (separable) summed weight so rounding never
# shows. The grid depends only on (N, T, O): never on chunking, blocks, batches or workers.

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from volrestore.errors import UserError


def reflect(index: np.ndarray, size: int) -> np.ndarray:
    """Map global indices (possibly outside [0, size)) into the volume by half-sample symmetric reflection."""
    period = 2 * size
    j = np.mod(index, period)
    return np.where(j >= size, period - 1 - j, j)


@lru_cache(maxsize=64)
def _ramp(overlap: int) -> np.ndarray:
    j = np.arange(overlap, dtype=np.float64)
    return np.sin(0.5 * np.pi * (j + 0.5) / overlap) ** 2


@dataclass(frozen=True)
class AxisGrid:
    """The tiles along one axis of length `size`. `context`: voxels read on each side of every tile that the restorer
    sees but does not output (a 2.5D model's neighbouring z-slices); they are reflected at the volume border like a
    tile's own voxels and never enter the blend."""

    size: int
    tile: int
    overlap: int
    context: int = 0

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    @property
    def count(self) -> int:
        excess = self.size + 2 * self.overlap - self.tile
        return 1 if excess <= 0 else -(-excess // self.stride) + 1

    def start(self, k: int) -> int:
        return k * self.stride - self.overlap

    def tiles_touching(self, lo: int, hi: int) -> range:
        """Tiles whose span intersects the voxels [lo, hi) (every covering tile has non-zero weight there)."""
        first = max(0, (lo + self.overlap - self.tile) // self.stride + 1)
        last = min(self.count - 1, (hi - 1 + self.overlap) // self.stride)
        return range(first, last + 1)

    def weights(self, k: int) -> np.ndarray:
        """Blending weights (float64, length tile) of tile k."""
        w = np.ones(self.tile)
        if self.overlap:
            ramp = _ramp(self.overlap)
            if k > 0:
                w[: self.overlap] = ramp
            if k < self.count - 1:
                w[self.tile - self.overlap :] = 1.0 - ramp
        return w

    def weight_sum(self, lo: int, hi: int) -> np.ndarray:
        """Summed weight over the voxels [lo, hi), added in the fixed tile order (so independent of the block)."""
        total = np.zeros(hi - lo)
        for k in self.tiles_touching(lo, hi):
            a, b = max(lo, self.start(k)), min(hi, self.start(k) + self.tile)
            total[a - lo : b - lo] += self.weights(k)[a - self.start(k) : b - self.start(k)]
        return total

    def read_range(self, tiles: range) -> tuple[int, int]:
        """The in-volume voxel range [lo, hi) that holds every (reflected) voxel of these tiles."""
        idx = reflect(np.arange(self.start(tiles[0]) - self.context, self.start(tiles[-1]) + self.tile + self.context),
                      self.size)
        return int(idx.min()), int(idx.max()) + 1

    def tile_index(self, k: int, read_lo: int) -> np.ndarray:
        """Indices into a region read from read_lo that give tile k with its context, reflection included."""
        return reflect(np.arange(self.start(k) - self.context, self.start(k) + self.tile + self.context),
                       self.size) - read_lo


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def fitted_tile(size: int, tile: int, overlap: int, multiple: int = 1) -> int:
    """The tile length to use: a tile longer than the volume plus both halos shrinks to the smallest allowed length."""
    return min(tile, _round_up(size + 2 * overlap, multiple))


def validate_tile(axis: str, tile: int, overlap: int, multiple: int, model: str) -> None:
    """Raise UserError for a tile the grid or the restorer cannot use."""
    if tile < 1 or overlap < 0:
        raise UserError(f"tile on {axis} must be >= 1 and overlap >= 0, got tile {tile}, overlap {overlap}")
    if tile < 2 * overlap:
        raise UserError(
            f"tile {tile} on {axis} is smaller than twice the overlap {overlap}; "
            f"use a tile of at least {2 * overlap} or an overlap of at most {tile // 2}"
        )
    if tile % multiple:
        lower, upper = tile // multiple * multiple, _round_up(tile, multiple)
        sizes = " or ".join(str(s) for s in (lower, upper) if s >= max(1, 2 * overlap))
        raise UserError(
            f"tile {tile} on {axis} is not a multiple of {multiple} as model {model} requires; use e.g. {sizes}"
        )


@dataclass(frozen=True)
class Grid:
    """The tile grid over the spatial axes (a tuple of AxisGrid, e.g. z, y, x)."""

    axes: tuple[AxisGrid, ...]

    @classmethod
    def build(cls, shape, tile, overlap, multiples, contexts=None) -> "Grid":
        """Grid for a spatial shape from per-axis requested tile, overlap, size multiple (already validated) and
        read-only context."""
        contexts = contexts or [0] * len(shape)
        return cls(tuple(AxisGrid(n, fitted_tile(n, t, o, m), o, c)
                         for n, t, o, m, c in zip(shape, tile, overlap, multiples, contexts)))

    @property
    def tile_shape(self) -> tuple[int, ...]:
        return tuple(a.tile for a in self.axes)

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(a.count for a in self.axes)

    @property
    def n_tiles(self) -> int:
        return math.prod(self.counts)

    def tiles_touching(self, lo, hi) -> list[range]:
        return [a.tiles_touching(l, h) for a, l, h in zip(self.axes, lo, hi)]

    def weights(self, k) -> np.ndarray:
        """Separable float64 weight of tile k (a tuple of per-axis tile indices)."""
        w = np.ones((1,) * len(self.axes))
        for d, (a, kk) in enumerate(zip(self.axes, k)):
            shape = [1] * len(self.axes)
            shape[d] = a.tile
            w = w * a.weights(kk).reshape(shape)
        return w

    def weight_sum(self, lo, hi) -> np.ndarray:
        """Summed tile weight over the box [lo, hi): the product of the per-axis sums (the grid is a full product)."""
        w = np.ones((1,) * len(self.axes))
        for d, (a, l, h) in enumerate(zip(self.axes, lo, hi)):
            shape = [1] * len(self.axes)
            shape[d] = h - l
            w = w * a.weight_sum(l, h).reshape(shape)
        return w
