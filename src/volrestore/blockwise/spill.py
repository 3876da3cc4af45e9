"""Tiles computed once per plan: which write-block owns a tile, the order that runs owners first, and the spill files
that carry an owned tile's output into the other blocks it overlaps."""

# Blended tiles straddle write-block borders. Computing every touching tile in every block ran those tiles in two (2D:
# up to four, 3D: up to eight) blocks: 1.36 times the tiles at the 2.5D default blocks, 1.30 in 3D. Instead each tile
# has one owner, the block holding its first in-volume voxel on every spatial axis, so a tile reaches only into
# blocks at or above its owner's index. The owner computes it, blends the part inside its own box and writes the
# parts inside the other blocks to OUT/.volrestore-spill/<consumer>/<owner>.npz (float values as the restorer returned
# them). A consumer blends its own and the received tiles in the fixed global tile order, exactly the float64 sum it
# would form had it computed them itself, so outputs stay bitwise equal to computing every touching tile. Any tile
# whose spill is missing (its owner ran later, was empty under a mask, or failed) is computed by the consumer: the
# files are a saving, never a requirement. The runner submits a block only after its owners (`prerequisites`) have
# ended, in wave order (blocks by the sum of their spatial indices), which keeps the spills that are alive at once to
# about two waves; a consumer deletes its folder once it is recorded done, and `complete` removes the rest.

from __future__ import annotations

import itertools
import os
import shutil
from typing import Iterator

import numpy as np

from volrestore.blockwise import blocks

SPILL_DIR = ".volrestore-spill"  # inside the output, beside the progress records


def spill_root(plan) -> str:
    """The folder of a run's spill files: beside its progress records."""
    return os.path.join(os.path.dirname(plan.progress), SPILL_DIR)


def _placed(index, axes, values) -> tuple[int, ...]:
    """`index` with its entries at positions `axes` replaced by `values`."""
    out = list(index)
    for d, v in zip(axes, values):
        out[d] = v
    return tuple(out)


def _flat(plan, index) -> int:
    return int(np.ravel_multi_index(tuple(index), blocks.block_counts(plan)))


def owner_along(plan, d: int, axis_grid, k: int) -> int:
    """Block index along plan axis `d` that owns tile `k` of `axis_grid`: the block of its first in-volume voxel."""
    return max(0, axis_grid.start(k)) // plan.block[d]


def blocks_along(plan, d: int, axis_grid, k: int) -> range:
    """Block indices along plan axis `d` that tile `k` reaches into (its owner first)."""
    first = owner_along(plan, d, axis_grid, k)
    end = min(axis_grid.start(k) + axis_grid.tile, plan.shape[d])
    return range(first, (end - 1) // plan.block[d] + 1)


def owns(plan, index, tile) -> bool:
    """Whether block `index` owns the tile (a tuple of per-spatial-axis tile indices)."""
    return all(owner_along(plan, d, ax, k) == index[d] for d, ax, k in zip(plan.spatial_axes, plan.grid.axes, tile))


def consumers(plan, index, tile) -> Iterator[tuple[int, ...]]:
    """The other blocks (same non-spatial indices as `index`) that an owned tile reaches into."""
    spatial = plan.spatial_axes
    ranges = [blocks_along(plan, d, ax, k) for d, ax, k in zip(spatial, plan.grid.axes, tile)]
    for combo in itertools.product(*ranges):
        if (other := _placed(index, spatial, combo)) != tuple(index):
            yield other


def prerequisites(plan, index) -> list[tuple[int, ...]]:
    """The blocks owning a tile that reaches into block `index` (besides itself): they should end before it starts."""
    box = blocks.block_box(plan, index)
    spatial = plan.spatial_axes
    ranges = []
    for d, ax in zip(spatial, plan.grid.axes):
        touching = ax.tiles_touching(*box[d])
        owners = {owner_along(plan, d, ax, k) for k in touching} if len(touching) else {index[d]}
        ranges.append(range(min(owners), index[d] + 1))
    placed = (_placed(index, spatial, combo) for combo in itertools.product(*ranges))
    return [other for other in placed if other != tuple(index)]


def linked_axes(plan) -> list[int]:
    """Plan axes along which a tile can reach into the next block: spatial axes with more than one block, unless
    their tiles do not overlap and every block border falls on a tile border."""
    linked = []
    for d, ax in zip(plan.spatial_axes, plan.grid.axes):
        aligned = ax.overlap == 0 and plan.block[d] % ax.tile == 0 and ax.start(0) == 0
        if plan.shape[d] > plan.block[d] and not aligned:
            linked.append(d)
    return linked


def wave_order(plan, skip_done=False) -> Iterator[tuple[int, ...]]:
    """Every block index, lazily, by the sum of its indices along the linked axes (a block's owners come in earlier
    waves; a 2.5D model's z blocks share waves, as its tiles never cross them), then in C order; with skip_done,
    those not recorded done (one progress record per block: plans of one block per group)."""
    counts = blocks.block_counts(plan)
    spatial = linked_axes(plan)
    other = [d for d in range(len(counts)) if d not in spatial]
    for wave in range(sum(counts[d] - 1 for d in spatial) + 1):
        for position in _with_sum([counts[d] for d in spatial], wave):
            for rest in itertools.product(*(range(counts[d]) for d in other)):
                index = _placed(_placed((0,) * len(counts), spatial, position), other, rest)
                if skip_done and os.path.exists(blocks.marker_path(plan, blocks.block_group(plan, index))):
                    continue
                yield index


def _with_sum(counts: list[int], total: int) -> Iterator[tuple[int, ...]]:
    """Index tuples (i_d in range(counts[d])) whose entries sum to `total`, in lexicographic order."""
    if len(counts) <= 1:
        if not counts and total == 0:
            yield ()
        elif counts and 0 <= total < counts[0]:
            yield (total,)
        return
    rest_max = sum(c - 1 for c in counts[1:])
    for i in range(max(0, total - rest_max), min(counts[0] - 1, total) + 1):
        for tail in _with_sum(counts[1:], total - i):
            yield (i, *tail)


def received(plan, index) -> dict:
    """{(fixed, tile): {output name: array}}: the parts of tiles other blocks computed for block `index`."""
    folder = os.path.join(spill_root(plan), str(_flat(plan, index)))
    parts = {}
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return parts
    for name in names:
        if not name.endswith(".npz"):  # a temporary file of a write in progress or cut by a crash
            continue
        with np.load(os.path.join(folder, name)) as f:
            for key in f.files:
                fixed, tile, output = _parse_key(key)
                parts.setdefault((fixed, tile), {})[output] = f[key]
    return parts


def send(plan, index, spills: dict) -> None:
    """Write {consumer: {(fixed, tile): {output name: array}}} as one file per consumer, each complete or absent
    (written under a temporary name, fsynced, renamed)."""
    owner = _flat(plan, index)
    for consumer, parts in spills.items():
        folder = os.path.join(spill_root(plan), str(_flat(plan, consumer)))
        arrays = {_key(fixed, tile, output): a for (fixed, tile), outs in parts.items() for output, a in outs.items()}
        tmp = os.path.join(folder, f".{owner}.tmp")
        try:
            os.makedirs(folder, exist_ok=True)
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(folder, f"{owner}.npz"))
        except FileNotFoundError:  # the consumer ran meanwhile (it computed these tiles) and removed its folder
            continue


def drop(plan, index) -> None:
    """Delete what other blocks sent to block `index` (after it is recorded done)."""
    shutil.rmtree(os.path.join(spill_root(plan), str(_flat(plan, index))), ignore_errors=True)


def _key(fixed, tile, output) -> str:
    return f"{'_'.join(map(str, fixed))}-{'_'.join(map(str, tile))}-{output}"


def _parse_key(key: str):
    fixed, tile, output = key.split("-", 2)
    ints = lambda s: tuple(int(v) for v in s.split("_")) if s else ()  # noqa: E731
    return ints(fixed), ints(tile), output
