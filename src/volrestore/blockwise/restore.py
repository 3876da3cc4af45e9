"""`restore(...)`: plan write-blocks over the tile grid, run them in bounded waves on Dask, blend, write, resume."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import zarr
from distributed.diagnostics.plugin import WorkerPlugin

from volrestore.io import ngff
from volrestore.model import restorers
from volrestore.cluster.client import connect, task_resources
from volrestore.errors import UserError
from volrestore.blockwise.grid import Grid, validate_tile

PROGRESS_DIR = ".volrestore-progress"  # inside the output: one empty file per finished write-block
TASK_RETRIES = 2  # a block task that raises is retried this often, then the run stops naming the block
BLOCK_TARGET_STRIDES = 4  # auto write-blocks span ~4 tile strides per axis, so few tiles are computed twice
# Block tasks per GPU worker at a time: each holds 1/BLOCKS_PER_GPU of the worker's GPU resource. While one block's
# tiles are on the GPU (only one model call per GPU at a time, see _compute_slot) the other task reads and decompresses
# its input or blends and writes its output, so the GPU does not wait for I/O. With the whole GPU=1 per task, the
# second worker thread would sit idle and reading would never overlap compute.
BLOCKS_PER_GPU = 2


@dataclass(frozen=True)
class Plan:
    """Everything a block task needs besides its index (small, sent with each task)."""

    run: str  # unique per restore() call: keys worker-side caches of opened arrays
    input: str
    input_array: str
    outputs: tuple[tuple[str, str, str], ...]  # (restorer output name, image path, level-0 array path)
    progress: str
    axes: tuple[str, ...]
    shape: tuple[int, ...]
    block: tuple[int, ...]  # write-block size per axis (a multiple of the output chunk/shard)
    grid: Grid  # over the spatial axes
    seed: int
    batch: int
    dtype: str
    fill_nan: bool
    mask: tuple | None  # (path, array path, per-spatial-axis (offset, step) mapping image index -> mask index)


def std_path(output) -> str:
    """Where the per-voxel std goes: a sibling image, out.ome.zarr -> out.std.ome.zarr."""
    p = Path(output)
    for suffix in (".ome.zarr", ".zarr"):
        if p.name.endswith(suffix):
            return str(p.with_name(p.name[: -len(suffix)] + ".std" + suffix))
    return str(p.with_name(p.name + ".std"))


def restore(input, output, model="identity", level=0, tile=None, overlap=None, batch=4, seed=0, cluster="local",
            workers=None, resume=False, overwrite=False, mask=None, dtype="float32", nan="error", chunks=None,
            block=None, echo=print, progress=True, command=None, **model_options) -> dict:
    """Restore an OME-Zarr image blockwise with a restorer on a Dask cluster; returns a summary dict.

    Everything is validated before anything is written. `cluster` is "local", "tcp://host:port" or a Client;
    `chunks`/`block` are spatial sizes (z, y, x present) of the output chunks and of the write-blocks.
    """
    input, output = str(input), str(output)
    plan, spec, info, params = _prepare(input, output, model, level, tile, overlap, batch, seed, mask, dtype, nan,
                                        chunks, block, model_options)
    out_paths = [output] + ([std_path(output)] if "std" in spec.outputs else [])
    done_before = _check_output(output, out_paths, input, mask, params, resume, overwrite)
    if done_before == "complete":
        echo(f"{output} is already complete; nothing to do")
        return {"blocks": _n_blocks(plan), "skipped": _n_blocks(plan), "restored": 0, "empty": 0}

    with connect(cluster, workers, echo=echo) as client:
        _build_on_workers(client, spec)  # a model that cannot load fails here, before anything is written
        if done_before is None:
            if nan == "error" and np.issubdtype(np.dtype(info.levels[level].dtype), np.inexact):
                _check_finite(client, plan, progress)
            lvl = info.levels[level]
            for name, path in zip(spec.outputs[::-1], out_paths[::-1]):  # primary last: it holds the markers
                ngff.create_image(
                    path, shape=lvl.shape, dtype=plan.dtype if name == "mean" else "float32", axes=info.axes,
                    scale=lvl.scale, translation=lvl.translation, chunks=params["chunks_all"],
                    shards=params["shards"], version=info.version, n_levels=len(info.levels) - level,
                    channel_names=info.channel_names, overwrite=overwrite,
                    provenance={"command": command or ngff.make_provenance()["command"],
                                "parameters": {**params, "output": name}},
                )
        plan = _with_output_arrays(plan, spec, out_paths)
        os.makedirs(plan.progress, exist_ok=True)
        todo = _blocks(plan, skip_done=done_before is not None)
        total = _n_blocks(plan)
        skipped = sum(1 for _ in _done_blocks(plan)) if done_before is not None else 0
        if done_before is not None:
            echo(f"resuming {output}: {skipped} of {total} blocks already done, skipped")
        counts = {"restored": 0, "empty": 0}
        restored_vox, compute_s, settled = 0, 0.0, batch

        def tally(index, result):
            nonlocal restored_vox, compute_s, settled
            status, voxels, stats = result
            counts[status] += 1
            if status == "restored":
                restored_vox += voxels
                compute_s += stats["compute_s"]
                settled = min(settled, stats["batch"])

        t0 = time.perf_counter()
        gpu = (task_resources(client) or {}).get("GPU")
        _run_blocks(client, _restore_block, (plan, spec), todo, total - skipped, "restoring", progress, tally,
                    resources={"GPU": gpu / BLOCKS_PER_GPU} if gpu else None)
        seconds = time.perf_counter() - t0
        summary = {
            "blocks": total, "skipped": skipped, **counts, "seconds": round(seconds, 3),
            "voxels_per_s": restored_vox / seconds if seconds > 0 else 0.0,
            "batch": settled, "compute_s": round(compute_s, 3),
        }
        for path in out_paths:
            ngff.build_pyramid(path, client)
    for path in out_paths[1:] + out_paths[:1]:  # primary last: `complete` there means everything is there
        ngff.set_complete(path, True, extra={"summary": summary})
    shutil.rmtree(plan.progress, ignore_errors=True)
    oom = f" (from {batch}: GPU out of memory)" if settled < batch else ""
    echo(f"restored {summary['restored']} blocks, {summary['empty']} empty (mask), {skipped} skipped (resume); "
         f"{summary['voxels_per_s']:.3g} voxels/s, batch {settled}{oom} -> {output}")
    return summary


# ----------------------------------------------------------------------------------------------- planning


def plan(input, model="identity", level=0, tile=None, overlap=None, batch=4, seed=0, block=None, **model_options):
    """(Plan, RestorerSpec) that restore() would use for these arguments, validated, nothing written (benchmarks)."""
    plan_, spec, _, _ = _prepare(str(input), "", model, level, tile, overlap, batch, seed, None, "float32", "error",
                                 None, block, model_options)
    return plan_, spec


def _prepare(input, output, model, level, tile, overlap, batch, seed, mask, dtype, nan, chunks, block,
             model_options):
    """Validate all arguments and build the Plan and the parameters recorded for --resume."""
    if not isinstance(batch, int) or batch < 1:
        raise UserError(f"--batch must be a whole number >= 1, got {batch!r}")
    if not isinstance(seed, int):
        raise UserError(f"--seed must be a whole number, got {seed!r}")
    if dtype not in ("float32", "input"):
        raise UserError(f"--dtype must be float32 or input, got {dtype!r}")
    if nan not in ("error", "fill"):
        raise UserError(f"--nan must be error or fill, got {nan!r}")
    info = ngff.read_info(input)
    if not 0 <= level < len(info.levels):
        raise UserError(f"{input} has {len(info.levels)} level(s); choose --level from 0 to {len(info.levels) - 1}")
    spec = restorers.resolve(model, **model_options)
    options = dict(spec.options)
    if options.get("normalise") == "image" and options.get("input_range") is None:
        # The model adapts to this image's intensities: measure them once, record them (provenance, --resume).
        spec = restorers.resolve(model, **{**model_options, "normalise": "image",
                                           "input_range": _input_range(input, level)})
    lvl = info.levels[level]
    axes = tuple(info.axis_names)
    spatial = [a for a in axes if a in "zyx"]
    sp_idx = [axes.index(a) for a in spatial]
    sp_shape = [lvl.shape[i] for i in sp_idx]

    # Tile and overlap per spatial axis; a 2D restorer works slice-wise (z tile 1, no z overlap).
    r_axes = ["z", "y", "x"][3 - spec.spatial_dims :]
    if spec.spatial_dims == 3 and "z" not in spatial:
        raise UserError(f"model {spec.name} is 3D but {input} has no z axis; use a 2D model (e.g. dims=2)")
    if tile is None:  # an int for any model, or a per-axis tuple (a network's training patch)
        d = spec.default_tile
        tile = list(d) if isinstance(d, (tuple, list)) else [d] * spec.spatial_dims
    tile = [int(t) for t in tile]
    if spec.spatial_dims == 2 and len(tile) == 3:
        if tile[0] != 1:
            raise UserError(f"model {spec.name} is 2D: give --tile 1 Y X (or Y X), not a z size of {tile[0]}")
        tile = tile[1:]
    if len(tile) != spec.spatial_dims:
        raise UserError(f"--tile needs {spec.spatial_dims} sizes ({' '.join(a.upper() for a in r_axes)}), got {tile}")
    overlap = spec.default_overlap if overlap is None else int(overlap)
    for a, t in zip(r_axes, tile):
        validate_tile(a, t, overlap, spec.size_multiple, spec.name)
    by_axis = dict(zip(r_axes, tile))
    tiles = [by_axis.get(a, 1) for a in spatial]
    overlaps = [overlap if a in r_axes else 0 for a in spatial]
    multiples = [spec.size_multiple if a in r_axes else 1 for a in spatial]
    contexts = [spec.z_context if (a == "z" and spec.spatial_dims == 2) else 0 for a in spatial]
    grid = Grid.build(sp_shape, tiles, overlaps, multiples, contexts)

    # Output chunks (default: the input level's) and write-blocks (whole chunks/shards, never shared by two tasks).
    chunks_all = list(lvl.chunks)
    if chunks is not None:
        chunks = [int(c) for c in chunks]
        if len(chunks) != len(spatial) or any(c < 1 for c in chunks):
            raise UserError(f"--chunks needs {len(spatial)} positive sizes ({' '.join(spatial).upper()}), got {chunks}")
        for i, c in zip(sp_idx, chunks):
            chunks_all[i] = c
    shards = list(lvl.shards) if (lvl.shards and chunks is None and info.version == "0.5") else None
    unit = [min(u, n) for u, n in zip(shards or chunks_all, lvl.shape)]
    blk = list(unit)
    if block is None:
        for d, i in enumerate(sp_idx):
            ax = grid.axes[d]
            if ax.overlap:  # along axes without overlap tiles never straddle blocks: keep one unit
                target = min(lvl.shape[i], BLOCK_TARGET_STRIDES * ax.stride)
                blk[i] = max(1, -(-target // unit[i])) * unit[i]
    else:
        block = [int(b) for b in block]
        if len(block) != len(spatial) or any(b < 1 or b % unit[i] for b, i in zip(block, sp_idx)):
            raise UserError(f"--block needs {len(spatial)} sizes that are multiples of the output "
                            f"{'shards' if shards else 'chunks'} {[unit[i] for i in sp_idx]}, got {block}")
        for b, i in zip(block, sp_idx):
            blk[i] = b

    mask_plan = _mask_plan(mask, info, level, spatial, sp_idx) if mask is not None else None
    out_dtype = "float32" if dtype == "float32" else lvl.dtype
    params = {
        "input": str(Path(input).resolve()), "level": level, **spec.parameters, "tile": tiles,
        "overlap": overlap, "seed": seed, "dtype": out_dtype, "nan": nan,
        "mask": str(Path(mask).resolve()) if mask is not None else None,
        "chunks_all": chunks_all, "shards": shards, "block": blk, "outputs": list(spec.outputs),
    }
    plan = Plan(
        run=uuid.uuid4().hex, input=input, input_array=lvl.path, outputs=(), progress=os.path.join(output, PROGRESS_DIR),
        axes=axes, shape=tuple(lvl.shape), block=tuple(blk), grid=grid, seed=seed, batch=batch, dtype=out_dtype,
        fill_nan=nan == "fill", mask=mask_plan,
    )
    return plan, spec, info, json.loads(json.dumps(params))


def _input_range(path, level, max_voxels=20_000_000) -> tuple[float, float]:
    """(background, bright) intensities of an image level: the median, and the 99.9th percentile after a light
    in-plane smoothing (σ = 1 voxel) so noise does not inflate it; from evenly spaced whole planes (bounded reading)."""
    from scipy import ndimage

    array = ngff.open_level(path, level)
    names = ngff.read_info(path).axis_names
    plane_axes = [i for i, a in enumerate(names) if a in "yx"]
    plane = int(np.prod([array.shape[i] for i in plane_axes]))
    leading = [i for i, a in enumerate(names) if a not in "yx"]
    count = int(np.prod([array.shape[i] for i in leading])) if leading else 1
    step = max(1, -(-count * plane // max_voxels))
    raw, smooth = [], []
    for flat in range(0, count, step):
        index = [slice(None)] * len(names)
        for i, k in zip(leading, np.unravel_index(flat, [array.shape[i] for i in leading])):
            index[i] = int(k)
        values = np.nan_to_num(np.asarray(array[tuple(index)], np.float64))
        raw.append(values.ravel())
        smooth.append(ndimage.gaussian_filter(values, 1.0).ravel())
    background, bright = float(np.median(np.concatenate(raw))), float(np.percentile(np.concatenate(smooth), 99.9))
    if not bright > background:
        raise UserError(f"{path} has no bright structure above its background to normalise by; check the input")
    return background, bright


def _mask_plan(mask, info, level, spatial, sp_idx):
    """Map image voxel indices to mask voxel indices; the physical extents must match within one mask voxel."""
    minfo = ngff.read_info(mask)
    if [a for a in minfo.axis_names if a in "zyx"] != spatial:
        raise UserError(f"mask {mask} has spatial axes {minfo.spatial_axes}, the image {spatial}; give a matching mask")
    lvl, mlvl = info.levels[level], minfo.levels[0]
    mapping = []
    for a, i in zip(spatial, sp_idx):
        mi = minfo.axis_names.index(a)
        s, t, n = lvl.scale[i], lvl.translation[i], lvl.shape[i]
        ms, mt, mn = mlvl.scale[mi], mlvl.translation[mi], mlvl.shape[mi]
        lo, hi, mlo, mhi = t - s / 2, t + (n - 0.5) * s, mt - ms / 2, mt + (mn - 0.5) * ms
        if abs(lo - mlo) > ms * 1.001 or abs(hi - mhi) > ms * 1.001:
            raise UserError(
                f"mask {mask} covers {mlo:g}..{mhi:g} on {a} but the image covers {lo:g}..{hi:g}; "
                "give a mask of the same field of view (any pyramid level of it)"
            )
        mapping.append(((t - mt) / ms, s / ms))  # mask index of image voxel i = offset + i * step (rounded)
    return (mask, mlvl.path, tuple(mapping))


def _check_output(output, out_paths, input, mask, params, resume, overwrite):
    """None for a fresh output; "partial" to resume; "complete" when nothing is left. UserError when refused."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; give one of them")
    inputs = [input] + ([mask] if mask is not None else [])
    if resume and Path(output).exists():
        old = ngff.read_info(output)
        prev = (old.provenance or {}).get("parameters")
        if not isinstance(prev, dict):
            raise UserError(f"{output} was not written by volrestore restore; cannot resume it, choose another output")
        prev = {k: v for k, v in prev.items() if k != "output"}
        for key in sorted(set(prev) | set(params)):
            if prev.get(key) != params.get(key):
                raise UserError(f"cannot resume {output}: parameter {key} was {prev.get(key)!r}, now "
                                f"{params.get(key)!r}; rerun with the same value or use --overwrite")
        for path in out_paths[1:]:
            if not Path(path).exists():
                raise UserError(f"cannot resume {output}: its sibling {path} is missing; use --overwrite")
        return "complete" if old.complete else "partial"
    for path in out_paths:
        ngff.check_output_path(path, inputs=inputs, overwrite=overwrite)
    return None


def _with_output_arrays(plan, spec, out_paths):
    arrays = tuple((name, path, ngff.read_info(path).levels[0].path) for name, path in zip(spec.outputs, out_paths))
    return Plan(**{**plan.__dict__, "outputs": arrays})


def _block_counts(plan):
    return [-(-n // b) for n, b in zip(plan.shape, plan.block)]


def _n_blocks(plan) -> int:
    return math.prod(_block_counts(plan))


def _marker(plan, index) -> str:
    """Marker file of a block: <progress>/<i0>_..._<in-2>/<in-1> (one folder per row keeps folders small)."""
    return os.path.join(plan.progress, "_".join(map(str, index[:-1])) or "0", str(index[-1]))


def _blocks(plan, skip_done=False):
    """Block indices in order, generated lazily (never a list of all blocks)."""
    for index in itertools.product(*map(range, _block_counts(plan))):
        if not (skip_done and os.path.exists(_marker(plan, index))):
            yield index


def _done_blocks(plan):
    for root, _, files in os.walk(plan.progress):
        yield from files


# ----------------------------------------------------------------------------------------------- running


def _run_blocks(client, fn, args, blocks, total, what, progress, on_result, resources=None):
    """Run fn(*args, index) for every block with a bounded number in flight; on_result(index, result) as each ends.

    A block that still fails after TASK_RETRIES retries (or kills its worker ALLOWED_FAILURES times) stops the run
    with a UserError naming it.
    """
    from distributed import as_completed
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    in_flight = max(4, 2 * sum(client.nthreads().values()))
    blocks = iter(blocks)
    futures = {}

    def submit(index):
        fut = client.submit(fn, *args, index, key=f"{fn.__name__}-{args[0].run}-{'.'.join(map(str, index))}",
                            retries=TASK_RETRIES, pure=False, resources=resources)
        futures[fut] = index
        return fut

    columns = [TextColumn(what), BarColumn(), MofNCompleteColumn(), TextColumn("blocks"),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task(what, total=total, rate="")
        queue = as_completed([submit(i) for i in itertools.islice(blocks, in_flight)])
        t0, voxels = time.perf_counter(), 0
        try:
            for fut in queue:
                index = futures.pop(fut)
                try:
                    result = fut.result()
                except Exception as exc:
                    msg = str(exc).splitlines()[0] if str(exc) else ""
                    raise UserError(f"block {index} failed while {what} after {TASK_RETRIES + 1} tries: "
                                    f"{type(exc).__name__}: {msg}") from None
                on_result(index, result)
                voxels += result[1]
                bar.update(task, advance=1, rate=f"{voxels / max(time.perf_counter() - t0, 1e-9):.3g} vox/s")
                for nxt in itertools.islice(blocks, 1):
                    queue.add(submit(nxt))
        finally:
            if futures:
                client.cancel(list(futures))


class BuildRestorer(WorkerPlugin):
    """Builds the restorer as each worker starts or joins (restarted ones too), so no task pays the model load."""

    idempotent = True

    def __init__(self, spec):
        self.spec = spec
        self.name = "volrestore-restorer-" + hashlib.sha1(repr(spec).encode()).hexdigest()[:16]

    def setup(self, worker):
        self.spec.build()


def _build_on_workers(client, spec):
    try:
        client.register_plugin(BuildRestorer(spec))
    except Exception as exc:
        raise UserError(f"model {spec.name} could not be built on the workers: {type(exc).__name__}: {exc}") from None


def _check_finite(client, plan, progress):
    """Refuse NaN/Inf input before anything is written (one read pass over float inputs)."""

    def check(index, result):
        if result[0] != "ok":
            raise UserError(f"the input has NaN or Inf values ({result[0]}); clean it or pass --nan fill to use 0 there")

    _run_blocks(client, _finite_block, (plan,), _blocks(plan), _n_blocks(plan), "checking for NaN/Inf", progress, check)


# ----------------------------------------------------------------------------------------------- block tasks (workers)


@lru_cache(maxsize=16)
def _array(run, path, array_path, mode):
    """Zarr arrays opened once per worker and run (the run id keeps a recreated output from hitting a stale handle)."""
    return zarr.open_group(path, mode=mode)[array_path]


def _box(plan, index):
    return [(i * b, min((i + 1) * b, n)) for i, b, n in zip(index, plan.block, plan.shape)]


def _finite_block(plan, index):
    box = _box(plan, index)
    data = _array(plan.run, plan.input, plan.input_array, "r")[tuple(slice(a, b) for a, b in box)]
    if np.isfinite(data).all():
        return "ok", 0
    bad = tuple(int(v) + a for v, (a, _) in zip(np.argwhere(~np.isfinite(data))[0], box))
    return f"first at voxel {dict(zip(plan.axes, bad))}", 0


def _restore_block(plan, spec, index):
    """Read the input this block's tiles need, restore them in batches, blend, write whole chunks, mark done.

    Returns (status, voxels, {"batch": tiles per restorer call it settled on, "compute_s": seconds in the model}).
    """
    box = _box(plan, index)
    spatial = [d for d, a in enumerate(plan.axes) if a in "zyx"]
    other = [d for d, a in enumerate(plan.axes) if a not in "zyx"]
    lo, hi = [box[d][0] for d in spatial], [box[d][1] for d in spatial]
    n_vox = math.prod(b - a for a, b in box)
    if plan.mask is not None and not _has_foreground(plan, lo, hi):
        _mark(plan, index)  # the outputs' fill value (0) stands for the skipped region
        return "empty", n_vox, None

    restorer = spec.build()
    grid = plan.grid
    tile_ranges = grid.tiles_touching(lo, hi)
    read = [ax.read_range(r) for ax, r in zip(grid.axes, tile_ranges)]
    src = _array(plan.run, plan.input, plan.input_array, "r")
    outs = {name: _array(plan.run, path, arr, "r+") for name, path, arr in plan.outputs}
    norm = grid.weight_sum(lo, hi)
    squeeze = restorer.spatial_dims < len(spatial)  # 2D restorer on a 3D volume: tiles are (1, Y, X) slices
    batch = min(plan.batch, _SETTLED_BATCH.get(plan.run, plan.batch))  # never retry a size that ran out here
    compute_s = 0.0

    for fixed in itertools.product(*(range(*box[d]) for d in other)):  # each time point / channel separately
        region = np.asarray(src[_selection(plan, fixed, other, zip(spatial, read))], dtype=np.float32)
        if plan.fill_nan:
            region = np.nan_to_num(region, nan=0.0, posinf=0.0, neginf=0.0)
        acc = {name: np.zeros([b - a for a, b in zip(lo, hi)]) for name in outs}
        # Tiles in the fixed global order, so each voxel's float64 sum is the same whichever block computes it.
        tiles = itertools.product(*tile_ranges)
        while group := list(itertools.islice(tiles, batch)):
            data = np.stack([region[np.ix_(*(ax.tile_index(k, r[0]) for ax, k, r in zip(grid.axes, t, read)))]
                             for t in group])
            origins = [(*fixed, *(ax.start(k) for ax, k in zip(grid.axes, t))) for t in group]
            # Always call with exactly `batch` tiles (pad by repeating the last): a tile's result then never
            # depends on how many tiles its block has, which keeps outputs bitwise across output chunkings.
            pad = batch - len(group)
            data = np.concatenate([data, np.repeat(data[-1:], pad, axis=0)]) if pad else data
            origins = origins + [origins[-1]] * pad
            squeezed = data[:, 0] if squeeze and not restorer.z_context else data  # 2.5D: keep the z context
            result, seconds = _restore_batch(restorer, squeezed, origins, plan.seed, index, batch)
            compute_s += seconds
            if result is None:  # GPU out of memory: redo this group with half the batch, and keep that size
                batch //= 2
                _SETTLED_BATCH[plan.run] = min(batch, _SETTLED_BATCH.get(plan.run, batch))
                tiles = itertools.chain(group, tiles)
                continue
            for name in outs:
                res = result[name].reshape(len(data), *grid.tile_shape)
                for j, t in enumerate(group):
                    _accumulate(acc[name], res[j], grid, t, lo, hi)
        for name, arr in outs.items():
            value = acc[name] / norm
            dtype = np.dtype(plan.dtype if name == "mean" else "float32")
            if np.issubdtype(dtype, np.integer):
                lim = np.iinfo(dtype)
                value = np.clip(np.rint(value), lim.min, lim.max)
            arr[_selection(plan, fixed, other, ((d, box[d]) for d in spatial))] = value.astype(dtype)
    _mark(plan, index)
    return "restored", n_vox, {"batch": batch, "compute_s": compute_s}


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


def _accumulate(acc, tile_out, grid, k, lo, hi):
    """acc[block ∩ tile] += weight * tile output (float64)."""
    starts = [ax.start(kk) for ax, kk in zip(grid.axes, k)]
    a = [max(l, s) for l, s in zip(lo, starts)]
    b = [min(h, s + ax.tile) for h, s, ax in zip(hi, starts, grid.axes)]
    if any(x >= y for x, y in zip(a, b)):
        return
    tsl = tuple(slice(x - s, y - s) for x, y, s in zip(a, b, starts))
    acc[tuple(slice(x - l, y - l) for x, y, l in zip(a, b, lo))] += grid.weights(k)[tsl] * tile_out[tsl]


def _has_foreground(plan, lo, hi) -> bool:
    path, array_path, mapping = plan.mask
    mask = _array(plan.run, path, array_path, "r")
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


def _mark(plan, index):
    path = _marker(plan, index)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w"):
        pass
