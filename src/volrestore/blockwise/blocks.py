"""Blocks of a regular grid (index, write box, read box with halo), their lazy iteration, and restore's markers."""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

from volrestore.io.storage import sync_box


PROGRESS_DIR = ".volrestore-progress"  # inside the output: one empty file per finished write-block


@dataclass(frozen=True)
class Block:
    """One task's share of an n-d array. Boxes are per-axis [start, stop) pairs.

    `write` is the region the task owns (writes, or accounts for in a reduction): the write boxes of a grid tile the
    array without overlap. `read` is the region it reads: `write` grown by a halo and clipped to the array.
    """

    index: tuple[int, ...]
    write: tuple[tuple[int, int], ...]
    read: tuple[tuple[int, int], ...]

    @property
    def origin(self) -> tuple[int, ...]:
        return tuple(a for a, _ in self.write)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.write)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def write_slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.write)

    @property
    def read_slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.read)

    @property
    def inner(self) -> tuple[slice, ...]:
        """The write box inside data read from the read box: `data[block.inner]` is what the block owns."""
        return tuple(slice(w0 - r0, w1 - r0) for (w0, w1), (r0, _) in zip(self.write, self.read))


def grid_counts(shape: Sequence[int], block: Sequence[int]) -> tuple[int, ...]:
    """Blocks per axis of a grid of `block`-sized boxes over `shape` (the last ones along each axis may be smaller)."""
    return tuple(-(-int(n) // int(b)) for n, b in zip(shape, block))


def grid_size(shape: Sequence[int], block: Sequence[int]) -> int:
    """Number of blocks of size `block` that cover `shape`."""
    return math.prod(grid_counts(shape, block))


def grid_block(shape, block, index, halo=None) -> Block:
    """The Block at `index` of the grid; `halo` (voxels per side and axis, default 0) grows its read box."""
    halo = halo or (0,) * len(shape)
    write = tuple((i * b, min((i + 1) * b, n)) for i, b, n in zip(index, block, shape))
    read = tuple((max(0, a - h), min(n, z + h)) for (a, z), h, n in zip(write, halo, shape))
    return Block(tuple(int(i) for i in index), write, read)


def grid_blocks(shape, block, halo=None) -> Iterator[Block]:
    """Every Block of the grid in C order (last axis fastest), generated lazily: never a list of all blocks."""
    for index in itertools.product(*map(range, grid_counts(shape, block))):
        yield grid_block(shape, block, index, halo)


# ----------------------------------------------------------------------------------------------- restore plans


def block_counts(plan):
    """Blocks per axis of a restore plan."""
    return list(grid_counts(plan.shape, plan.block))


def n_blocks(plan) -> int:
    """Number of write-blocks of a restore plan."""
    return grid_size(plan.shape, plan.block)


def marker_path(plan, index) -> str:
    """Marker file of a block: <progress>/<i0>_..._<in-2>/<in-1> (one folder per row keeps folders small)."""
    return os.path.join(plan.progress, "_".join(map(str, index[:-1])) or "0", str(index[-1]))


def iter_blocks(plan, skip_done=False):
    """Block indices of a plan in order, generated lazily (never a list of all blocks)."""
    for index in itertools.product(*map(range, block_counts(plan))):
        if not (skip_done and os.path.exists(marker_path(plan, index))):
            yield index


def done_markers(plan):
    """Names of the progress markers present (one per finished block; lazily)."""
    for root, _, files in os.walk(plan.progress):
        yield from files


def block_box(plan, index):
    """[(start, stop)] per axis of the region a block writes."""
    return list(grid_block(plan.shape, plan.block, index).write)


def mark_done(plan, index):
    """Record a block as finished (its marker file), after its chunks are written: they are fsynced first, so after
    an OS crash a marker never stands for data that did not reach the disk."""
    box = block_box(plan, index)
    for _, image_path, array_path in plan.outputs:
        sync_box(image_path, array_path, box)
    path = marker_path(plan, index)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w"):
        pass
