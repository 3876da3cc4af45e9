"""Blocks of a regular grid (index, write box, read box with halo), their lazy iteration, and restore's markers."""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from volrestore.io.storage import sync_box

PROGRESS_DIR = ".volrestore-progress"  # inside the output: the progress records of finished write-blocks
# At most this many progress records per run: inode quotas on HPC file systems are 10^6-10^7 per user.
MAX_PROGRESS_RECORDS = 100_000


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


def progress_group_for(shape, block) -> int:
    """Write-blocks per progress record for a plan (fixed at plan time): 1 until the plan has more than
    MAX_PROGRESS_RECORDS blocks, then as many as keep the records at that bound (a petabyte plan of 10^8 blocks
    keeps 10^5 small files, not 10^8)."""
    return max(1, -(-grid_size(shape, block) // MAX_PROGRESS_RECORDS))


def group_size(plan) -> int:
    """Write-blocks per progress record of a plan."""
    return getattr(plan, "progress_group", 1)


def block_group(plan, index) -> int:
    """The progress group of a block: consecutive blocks in C order share one record."""
    return int(np.ravel_multi_index(tuple(index), block_counts(plan))) // group_size(plan)


def group_indices(plan, group: int) -> list[tuple[int, ...]]:
    """The block indices of a progress group, in C order."""
    size, total = group_size(plan), n_blocks(plan)
    flat = range(group * size, min((group + 1) * size, total))
    return [tuple(int(i) for i in np.unravel_index(f, block_counts(plan))) for f in flat]


def n_groups(plan) -> int:
    """Number of progress groups (= progress records when every block is done)."""
    return -(-n_blocks(plan) // group_size(plan))


def marker_path(plan, group: int) -> str:
    """The progress record of a group: <progress>/<group // 1000>/<group> (folders of at most 1000 records)."""
    return os.path.join(plan.progress, str(group // 1000), str(group))


def done_in_group(plan, group: int) -> set[tuple[int, ...]]:
    """Blocks of a group recorded done (lines "i0_i1_..."; a line cut by a crash is ignored)."""
    try:
        text = Path(marker_path(plan, group)).read_text()
    except FileNotFoundError:
        return set()
    done = set()
    for line in text.split("\n"):
        parts = line.split("_")
        if line and all(p.isdigit() for p in parts) and len(parts) == len(plan.shape):
            done.add(tuple(int(p) for p in parts))
    return done


def iter_blocks(plan, skip_done=False):
    """Block indices of a plan in order, generated lazily (never a list of all blocks); with skip_done, those not
    recorded done (one read per progress record, not one stat per block)."""
    if not skip_done:
        yield from itertools.product(*map(range, block_counts(plan)))
        return
    for group in range(n_groups(plan)):
        done = done_in_group(plan, group) if os.path.exists(marker_path(plan, group)) else set()
        for index in group_indices(plan, group):
            if index not in done:
                yield index


def iter_groups(plan, skip_done=False):
    """The first block index of each progress group (the unit of work of restore tasks), lazily; with skip_done,
    only groups with a block not recorded done (one read per existing record)."""
    size, total, counts = group_size(plan), n_blocks(plan), block_counts(plan)
    if size == 1:
        yield from iter_blocks(plan, skip_done)
        return
    for group in range(n_groups(plan)):
        length = min(size, total - group * size)
        if skip_done and os.path.exists(marker_path(plan, group)) and len(done_in_group(plan, group)) >= length:
            continue
        yield tuple(int(i) for i in np.unravel_index(group * size, counts))


def count_done(plan) -> int:
    """Blocks recorded done, from the progress records present (time proportional to the records)."""
    total = 0
    for root, _, files in os.walk(plan.progress):
        for name in files:
            if name.isdigit():
                total += len(done_in_group(plan, int(name)))
    return total


def block_box(plan, index):
    """[(start, stop)] per axis of the region a block writes."""
    return list(grid_block(plan.shape, plan.block, index).write)


def mark_done(plan, index):
    """Record a block as finished (its marker file), after its chunks are written: they are fsynced first, so after
    an OS crash a marker never stands for data that did not reach the disk."""
    box = block_box(plan, index)
    for _, image_path, array_path in plan.outputs:
        sync_box(image_path, array_path, box)
    path = marker_path(plan, block_group(plan, index))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # One writer per group at a time in practice (its blocks run in order in one task); O_APPEND keeps a rare
    # duplicate run of the task harmless (a repeated line).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, ("_".join(map(str, index)) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
