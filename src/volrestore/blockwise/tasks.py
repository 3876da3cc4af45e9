"""Block tasks run on the workers: restore one write-block (read, tile, batch, blend, write, mark) or check it for NaN/Inf."""

from __future__ import annotations

import itertools
import math
import sys
import threading
import time
from functools import lru_cache

import numpy as np
import zarr

from volrestore.blockwise import spill
from volrestore.blockwise.blocks import block_box, mark_done
from volrestore.io import ngff
from volrestore.io.storage import cast_rounded
from volrestore.model.restorer import restorer_for


@lru_cache(maxsize=16)
def open_array(run, path, array_path, mode):
    """Zarr arrays opened once per worker and run (the run id keeps a recreated output from hitting a stale handle)."""
    return zarr.open_group(path, mode=mode)[array_path]



def finite_block(plan, index):
    """('ok', 0) when the block's input is finite, else the first bad voxel's position (for the NaN pre-pass)."""
    box = block_box(plan, index)
    data = open_array(plan.run, plan.input, plan.input_array, "r")[tuple(slice(a, b) for a, b in box)]
    if np.isfinite(data).all():
        return "ok", 0
    bad = tuple(int(v) + a for v, (a, _) in zip(np.argwhere(~np.isfinite(data))[0], box))
    return f"first at voxel {dict(zip(plan.axes, bad))}", 0



def restore_block(plan, spec, index):
    """Read the input this block's tiles need, restore them in batches, blend, write whole chunks, mark done.

    Each tile is computed once per plan (blockwise.spill): this block computes the tiles it owns and any touching
    tile whose part no other block sent it, blends those and the received parts in the fixed global tile order,
    sends the parts of its own tiles that reach into other blocks, then marks itself done.
    Tiles are `plan.read_dtype` (blockwise.plan.input_precision): float32, or float64 for inputs float32 cannot
    hold (32/64-bit integers, float64) if the restorer `takes_float64` (identity: `--dtype input` then round-trips
    them bit-exactly); float32-only restorers get float32, recorded in provenance. Blending is float64 either way.
    Returns (status, voxels, {"batch": tiles per restorer call it settled on, "compute_s": seconds in the model,
    "tiles": tiles computed}).
    """
    box = block_box(plan, index)
    spatial, other = plan.spatial_axes, plan.other_axes
    lo, hi = [box[d][0] for d in spatial], [box[d][1] for d in spatial]
    n_vox = math.prod(b - a for a, b in box)
    if plan.mask is not None and not _has_foreground(plan, lo, hi):
        mark_done(plan, index)  # the outputs' fill value (0) stands for the skipped region
        spill.drop(plan, index)
        return "empty", n_vox, None

    grid = plan.grid
    outs = {name: open_array(plan.run, path, arr, "r+") for name, path, arr in plan.outputs}
    norm = grid.weight_sum(lo, hi)
    sent = spill.received(plan, index)
    tiles = _BlockTiles(plan, restorer_for(spec), index)
    spills: dict = {}
    touching = list(itertools.product(*grid.tiles_touching(lo, hi)))  # in the fixed global order
    owned = {t for t in touching if spill.owns(plan, index, t)}
    for fixed in itertools.product(*(range(*box[d]) for d in other)):  # each time point / channel separately
        tiles.start(fixed, [t for t in touching if t in owned or (fixed, t) not in sent])
        acc = {name: np.zeros([b - a for a, b in zip(lo, hi)]) for name in outs}
        # Tiles in the fixed global order, so each voxel's float64 sum is the same whichever block computes it.
        for t in touching:
            where_acc, where_tile = _overlap(grid, t, lo, hi)
            part = sent.pop((fixed, t), None)
            if part is None or t in owned:
                result = tiles.result(t)
                part = {name: result[name][where_tile] for name in outs}
                if t in owned:
                    _cut_spills(plan, index, fixed, t, result, spills)
            weights = grid.weights(t)[where_tile]
            for name in outs:
                acc[name][where_acc] += weights * part[name]
        where = _selection(plan, fixed, other, ((d, box[d]) for d in spatial))
        _write_outputs(plan, outs, acc, norm, where)
    spill.send(plan, index, spills)  # before the mark: a block recorded done has sent its parts
    mark_done(plan, index)
    spill.drop(plan, index)
    return "restored", n_vox, {"batch": tiles.batch, "compute_s": tiles.compute_s, "tiles": tiles.computed}


class _BlockTiles:
    """The tiles one block computes, in batches of exactly the plan's --batch in global order, produced as the blend
    asks for them (at most one batch of results held); a GPU out-of-memory halves the batch and redoes the group."""

    def __init__(self, plan, restorer, index):
        self.plan, self.restorer, self.index = plan, restorer, index
        self.batch = min(plan.batch, _SETTLED_BATCH.get(plan.run, plan.batch))  # never retry a size that ran out here
        self.compute_s, self.computed = 0.0, 0
        self.squeeze = restorer.spatial_dims < len(plan.grid.axes)  # 2D restorer on a 3D volume: (1, Y, X) tiles

    def start(self, fixed, tiles: list) -> None:
        """Read the input the tiles of time point / channel `fixed` need (only theirs) and queue them."""
        self.fixed, self.queue, self.ready = fixed, iter(tiles), {}
        if not tiles:
            return
        grid, plan = self.plan.grid, self.plan
        self.read = [ax.read_range(range(min(t[d] for t in tiles), max(t[d] for t in tiles) + 1))
                     for d, ax in enumerate(grid.axes)]
        src = open_array(plan.run, plan.input, plan.input_array, "r")
        region = np.asarray(src[_selection(plan, fixed, plan.other_axes, zip(plan.spatial_axes, self.read))],
                            dtype=np.dtype(plan.read_dtype))
        self.region = np.nan_to_num(region, nan=0.0, posinf=0.0, neginf=0.0) if plan.fill_nan else region

    def result(self, tile) -> dict:
        """{output name: the tile's restored array} (computing the next batches until it is there)."""
        while tile not in self.ready:
            self._next_batch()
        return self.ready.pop(tile)

    def _next_batch(self) -> None:
        grid, batch = self.plan.grid, self.batch
        group = list(itertools.islice(self.queue, batch))
        if not group:
            raise RuntimeError("a tile was asked for that this block does not compute")
        data = np.stack([self.region[np.ix_(*(ax.tile_index(k, r[0]) for ax, k, r in zip(grid.axes, t, self.read)))]
                         for t in group])
        origins = [(*self.fixed, *(ax.start(k) for ax, k in zip(grid.axes, t))) for t in group]
        # Always call with exactly `batch` tiles (pad by repeating the last): a tile's result then never depends on
        # how many tiles its block has, which keeps outputs bitwise across output chunkings.
        pad = batch - len(group)
        data = np.concatenate([data, np.repeat(data[-1:], pad, axis=0)]) if pad else data
        origins = origins + [origins[-1]] * pad
        squeezed = data[:, 0] if self.squeeze and not self.restorer.z_context else data  # 2.5D: keep the z context
        result, seconds = _restore_batch(self.restorer, squeezed, origins, self.plan.seed, self.index, batch)
        self.compute_s += seconds
        if result is None:  # GPU out of memory: redo this group with half the batch, and keep that size
            self.batch //= 2
            _SETTLED_BATCH[self.plan.run] = min(self.batch, _SETTLED_BATCH.get(self.plan.run, self.batch))
            self.queue = itertools.chain(group, self.queue)
            return
        self.computed += len(group)
        for j, t in enumerate(group):
            self.ready[t] = {name: result[name].reshape(len(data), *grid.tile_shape)[j] for name in result}


def _cut_spills(plan, index, fixed, tile, result, spills) -> None:
    """Add the parts of an owned tile that lie in other blocks to `spills` ({consumer: {(fixed, tile): parts}})."""
    spatial = plan.spatial_axes
    names = [name for name, _, _ in plan.outputs]
    for consumer in spill.consumers(plan, index, tile):
        box = block_box(plan, consumer)
        where_tile = _overlap(plan.grid, tile, [box[d][0] for d in spatial], [box[d][1] for d in spatial])[1]
        spills.setdefault(consumer, {})[(fixed, tile)] = {name: np.ascontiguousarray(result[name][where_tile])
                                                         for name in names}


def _write_outputs(plan, outs: dict, acc: dict, norm, where) -> None:
    """Write each output's blended sum / summed weight into the block's region, integers rounded and clipped."""
    for name, arr in outs.items():
        arr[where] = cast_rounded(acc[name] / norm, plan.dtype if name == "mean" else "float32")


def _restore_batch(restorer, data, origins, seed, index, batch):
    """One restorer call, one per GPU at a time -> (result, seconds); result None when it ran out of GPU memory and
    a smaller batch is left to try."""
    try:
        with _compute_slot():
            t0 = time.perf_counter()
            return restorer(data, origins, seed), time.perf_counter() - t0
    except _oom_errors() as exc:
        if batch == 1:
            raise RuntimeError(f"GPU out of memory on block {index} even with batch 1 ({type(exc).__name__}); use "
                               "a smaller --tile, fewer --samples, or a GPU with more memory") from None
    _free_gpu_memory()  # here, not in `except`: the exception's traceback still holds the failed call's tensors
    return None, 0.0



# Per worker process: the batch each run settled on after a GPU out-of-memory, so later blocks start there.
_SETTLED_BATCH: dict[str, int] = {}



_SLOTS_LOCK = threading.Lock()



_GPU_SLOTS: dict[int, threading.BoundedSemaphore] = {}



def _oom_errors() -> tuple:
    """torch's CUDA out-of-memory error class, if torch is loaded (a restorer that never imported it cannot raise it)."""
    torch = sys.modules.get("torch")
    return (torch.cuda.OutOfMemoryError,) if torch is not None else ()



def _free_gpu_memory():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()  # hand cached blocks back so the smaller batch can allocate



def _compute_slot():
    """At most one restorer call per GPU of this worker at a time; no limit on CPU workers.

    GPU workers run 2 threads (cluster.py): while one block's tiles are on the GPU, the other thread reads and
    decompresses its block and blends/writes its results. Letting both threads run the model at once would only
    make them compete for GPU memory (twice the activations) without more throughput. The lock is per model call,
    not per block, so the GPU never idles while a thread accumulates a finished batch. Results are unchanged: each
    call is the same call, only its start time moves.
    """
    from contextlib import nullcontext

    try:
        from distributed import get_worker

        gpus = int(get_worker().state.total_resources.get("GPU", 0))
    except ValueError:  # not inside a Dask worker (a direct call)
        gpus = 0
    if gpus < 1:
        return nullcontext()
    with _SLOTS_LOCK:
        return _GPU_SLOTS.setdefault(gpus, threading.BoundedSemaphore(gpus))



def _selection(plan, fixed, other, spatial_ranges):
    """Index tuple: one time point/channel on the other axes, [a, b) ranges on the spatial ones."""
    sel = [None] * len(plan.axes)
    for d, v in zip(other, fixed):
        sel[d] = v
    for d, (a, b) in spatial_ranges:
        sel[d] = slice(a, b)
    return tuple(sel)



def _overlap(grid, k, lo, hi):
    """(slices into the block's box [lo, hi), slices into tile k) of their intersection (a tile that touches the
    box: tiles_touching)."""
    starts = [ax.start(kk) for ax, kk in zip(grid.axes, k)]
    a = [max(l, s) for l, s in zip(lo, starts)]
    b = [min(h, s + ax.tile) for h, s, ax in zip(hi, starts, grid.axes)]
    return (tuple(slice(x - l, y - l) for x, y, l in zip(a, b, lo)),
            tuple(slice(x - s, y - s) for x, y, s in zip(a, b, starts)))



def _has_foreground(plan, lo, hi) -> bool:
    path, array_path, mapping = plan.mask
    mask = open_array(plan.run, path, array_path, "r")
    msp = [d for d, a in enumerate(_mask_axes(plan.run, path)) if a in "zyx"]
    sel = [slice(None)] * mask.ndim
    for d, (off, step), l, h in zip(msp, mapping, lo, hi):
        # Mask voxels overlapping the block's physical extent (voxel i spans i-0.5..i+0.5): conservative at edges.
        a = math.floor(off + (l - 0.5) * step + 0.5)
        b = math.ceil(off + (h - 0.5) * step - 0.5) + 1
        sel[d] = slice(max(0, min(a, mask.shape[d] - 1)), max(1, min(b, mask.shape[d])))
    return bool(np.any(mask[tuple(sel)]))



@lru_cache(maxsize=16)
def _mask_axes(run, path):
    return tuple(ngff.read_info(path).axis_names)
