"""`restore(...)`: plan write-blocks over the tile grid, run them in bounded waves on Dask, blend, write, resume."""

from __future__ import annotations

import math
import os
import time

import numpy as np

from volrestore.blockwise import spill
from volrestore.blockwise.blocks import (block_box, block_group, count_done, done_in_group, group_indices, group_size,
                                         iter_blocks, iter_groups, n_blocks)
from volrestore.blockwise.outputs import RunOutputs, input_fingerprints, std_path
from volrestore.blockwise.plan import Plan, Prepared, prepare
from volrestore.blockwise.runner import run_blockwise
from volrestore.blockwise.tasks import finite_block, restore_block
from volrestore.cluster.client import connect, task_resources
from volrestore.config import ModelRef, RestoreConfig
from volrestore.errors import UserError
from volrestore.io import ngff, pyramid
from volrestore.model import memory
from volrestore.model.restorer import BuildRestorer, RestorerSpec, restorer_for

# Block tasks per GPU worker at a time: each holds 1/BLOCKS_PER_GPU of the worker's GPU resource. While one block's
# tiles are on the GPU (only one model call per GPU at a time, see _compute_slot) the other task reads and decompresses
# its input or blends and writes its output, so the GPU does not wait for I/O. With the whole GPU=1 per task, the
# second worker thread would sit idle and reading would never overlap compute.
BLOCKS_PER_GPU = 2


def restore(input, output, model="default", level=0, tile=None, overlap=None, batch=4, seed=0, cluster="local",
            workers=None, resume=False, overwrite=False, mask=None, dtype="float32", nan="error", chunks=None,
            block=None, echo=print, progress=True, command=None, break_lock=False, **model_options) -> dict:
    """Restore an OME-Zarr image blockwise with a restorer on a Dask cluster; returns a summary dict.

    Everything is validated before anything is written. `model` is a name with options ("gaussian:sigma=2"), a
    checkpoint path or "default"; `model_options` are more of its options (samples, steps, std, ...; None = not
    given). `cluster` is "local", "cuda", "tcp://host:port", a jobqueue YAML, a Client or None (block tasks in
    threads of this process); `tile`, `chunks` and `block`
    are spatial sizes (z, y, x present) of the tiles, the output chunks and the write-blocks.
    """
    config = RestoreConfig.validated(
        input=str(input), output=str(output), model=ModelRef.parse(model, **model_options), level=level,
        tile=_listed(tile), overlap=overlap, batch=batch, seed=seed, mask=None if mask is None else str(mask),
        dtype=dtype, nan=nan, chunks=_listed(chunks), block=_listed(block), resume=resume, overwrite=overwrite)
    return run_restore(config, cluster, workers=workers, echo=echo, progress=progress, command=command,
                       break_lock=break_lock)


def _listed(values):
    return None if values is None else [int(v) for v in values]


def run_restore(config: RestoreConfig, cluster="local", *, workers=None, echo=print, progress=True,
                command=None, break_lock=False) -> dict:
    """Run a validated RestoreConfig under the output's lock: check the output, build the model on the workers,
    create the outputs, restore every block not yet done, verify that every block is recorded done, build the
    pyramids and mark the outputs complete (primary last; an --overwrite is swapped in only then)."""
    prepared = prepare(config)
    out_paths = [config.output] + ([std_path(config.output)] if "std" in prepared.spec.outputs else [])
    inputs = input_fingerprints(config)
    with RunOutputs(config, out_paths, prepared.parameters(), inputs, break_lock=break_lock) as outputs:
        if outputs.state == "complete":
            echo(f"{config.output} is already complete; nothing to do")
            total = n_blocks(prepared.plan)
            return {"blocks": total, "skipped": total, "restored": 0, "empty": 0}
        with connect(cluster, workers, echo=echo) as client:
            _build_on_workers(client, prepared.spec)  # a model that cannot load fails here, before anything is written
            _check_memory(client, prepared)  # so does a tile (or, on CPUs, a batch) that cannot fit
            if outputs.state is None:
                if config.nan == "error" and np.issubdtype(np.dtype(_input_dtype(prepared)), np.inexact):
                    _check_finite(client, prepared.plan, progress)
                _create_outputs(prepared, outputs, command, inputs)
            plan = _with_output_arrays(prepared.plan, prepared.spec, outputs)
            os.makedirs(plan.progress, exist_ok=True)
            summary = _restore_blocks(client, plan, prepared.spec, resumed=outputs.state is not None,
                                      progress=progress, echo=lambda n, total: echo(
                                          f"resuming {config.output}: {n} of {total} blocks already done, skipped"))
            outputs.verify_done(plan)
            for path in outputs.targets:
                pyramid.build_pyramid(path, client)
        outputs.complete(summary)
    oom = f" (from {prepared.plan.batch}: GPU out of memory)" if summary["batch"] < prepared.plan.batch else ""
    echo(f"restored {summary['restored']} blocks, {summary['empty']} empty (mask), {summary['skipped']} skipped "
         f"(resume); {summary['voxels_per_s']:.3g} voxels/s, batch {summary['batch']}{oom} -> {config.output}")
    return summary


def _input_dtype(prepared: Prepared) -> str:
    return prepared.info.levels[prepared.config.level].dtype


def _create_outputs(prepared: Prepared, outputs: RunOutputs, command: str | None, inputs: dict) -> None:
    """Create the empty outputs with their provenance (complete=False, the input fingerprints); the primary last,
    as it holds the markers."""
    info, config, plan = prepared.info, prepared.config, prepared.plan
    lvl = info.levels[config.level]
    for name, path in zip(prepared.spec.outputs[::-1], outputs.targets[::-1]):
        ngff.create_image(
            path, shape=lvl.shape, dtype=plan.dtype if name == "mean" else "float32", axes=info.axes,
            scale=lvl.scale, translation=lvl.translation, chunks=prepared.chunks, shards=prepared.shards,
            version=info.version, n_levels=len(info.levels) - config.level, channel_names=info.channel_names,
            into_folder=path in outputs.made,
            provenance={"command": command or ngff.make_provenance()["command"],
                        "parameters": {**prepared.parameters(), "output": name}, "inputs": inputs},
        )


def _restore_blocks(client, plan: Plan, spec: RestorerSpec, *, resumed: bool, progress: bool, echo) -> dict:
    """Run restore_group over every progress group with blocks not done yet; the run's summary (counts, voxels/s,
    settled batch)."""
    total = n_blocks(plan)
    skipped = count_done(plan) if resumed else 0
    if resumed:
        echo(skipped, total)
    counts = {"restored": 0, "empty": 0, "voxels": 0, "compute_s": 0.0, "batch": plan.batch, "tiles": 0}

    def tally(index, result):
        for key in ("restored", "empty", "voxels", "compute_s", "tiles"):
            counts[key] += result[key]
        counts["batch"] = min(counts["batch"], result["batch"])

    t0 = time.perf_counter()
    gpu = (task_resources(client) or {}).get("GPU") if client is not None else None
    # One block per task: owners first (blockwise.spill), so each tile is computed once. Groups of a huge plan run
    # in C order: a group's blocks are consecutive along x (their parts pass within the task) and their lower y / z
    # neighbours ran rows earlier; a part not there yet is computed again, never missed.
    ordered = group_size(plan) == 1
    groups = spill.wave_order(plan, skip_done=resumed) if ordered else iter_groups(plan, skip_done=resumed)
    run_blockwise(client, restore_group, groups, args=(plan, spec), on_result=tally,
                  progress=progress, what="restoring", total=-(-(total - skipped) // group_size(plan)),
                  resources={"GPU": gpu / BLOCKS_PER_GPU} if gpu else None, key_prefix=f"restore-{plan.run}",
                  voxels=lambda _, result: result["voxels"],
                  after=(lambda index: spill.prerequisites(plan, index)) if ordered else None)
    seconds = time.perf_counter() - t0
    return {"blocks": total, "skipped": skipped, "restored": counts["restored"], "empty": counts["empty"],
            "seconds": round(seconds, 3), "voxels_per_s": counts["voxels"] / seconds if seconds > 0 else 0.0,
            "batch": counts["batch"], "compute_s": round(counts["compute_s"], 3), "tiles": counts["tiles"],
            "tile_recompute_factor": round(counts["tiles"] / plan.grid.n_tiles, 4) if not skipped else None}


def restore_group(plan: Plan, spec: RestorerSpec, first) -> dict:
    """Worker task: restore the blocks of the progress group starting at block `first` that are not recorded done,
    in order (one block unless the plan is huge, see blocks.group_size); their counts, voxels and settled batch."""
    group = block_group(plan, first)
    done = done_in_group(plan, group) if group_size(plan) > 1 else set()
    result = {"restored": 0, "empty": 0, "voxels": 0, "compute_s": 0.0, "batch": plan.batch, "tiles": 0}
    for index in group_indices(plan, group):
        if index in done:
            continue
        status, voxels, stats = restore_block(plan, spec, index)
        result[status] += 1
        if status == "restored":
            result["voxels"] += voxels
            result["compute_s"] += stats["compute_s"]
            result["tiles"] += stats["tiles"]
            result["batch"] = min(result["batch"], stats["batch"])
    return result


def _with_output_arrays(plan, spec, outputs: RunOutputs):
    arrays = tuple((name, os.path.abspath(path), ngff.read_info(path).levels[0].path)
                   for name, path in zip(spec.outputs, outputs.targets))
    return Plan(**{**plan.__dict__, "outputs": arrays, "progress": os.path.abspath(outputs.progress)})


def _build_on_workers(client, spec):
    try:
        if client is None:  # no cluster: block tasks are threads of this process, which builds the model once
            restorer_for(spec)
        else:
            client.register_plugin(BuildRestorer(spec))
    except Exception as exc:
        raise UserError(f"model {spec.name} could not be built on the workers: {type(exc).__name__}: {exc}") from None


def _check_memory(client, prepared: Prepared) -> None:
    """Measure one restorer call on a worker (model.memory.probe) and refuse a tile whose single-tile call cannot fit
    there, naming the largest that does. A batch that does not fit is refused on CPU workers, where running out of
    memory kills the worker; GPU workers halve it at run time instead (tasks._restore_batch)."""
    plan, spec = prepared.plan, prepared.spec
    if getattr(spec.restorer, "forward_bytes", None) is None:  # no network to measure: no round trip to a worker
        return
    tile = plan.grid.tile_shape
    res = task_resources(client) if client is not None else None
    measured = (memory.probe(spec, tile) if client is None else
                client.submit(memory.probe, spec, tile, pure=False, resources=res).result())
    gib = 2.0**30
    one_tile, per_call = memory.call_bytes(measured, tile), memory.call_bytes(measured, tile, plan.batch)
    where = f"{measured['device']} ({measured['capacity'] / gib:.1f} GiB usable per call)"
    if one_tile > measured["capacity"]:
        fits = memory.largest_tile(tile, measured, spec.size_multiple, plan.grid.axes[-1].overlap)
        advice = (f"use --tile {' '.join(map(str, fits))} or smaller (the largest that fits), or fewer --samples"
                  if fits else "use fewer --samples or a device with more memory")
        raise UserError(f"tile {'x'.join(map(str, tile))} needs {one_tile / gib:.1f} GiB per restorer call on the "
                        f"workers' {where}; {advice}")
    if per_call > measured["capacity"] and not res:
        raise UserError(f"--batch {plan.batch} needs {per_call / gib:.1f} GiB per restorer call on the workers' "
                        f"{where}; use --batch {memory.largest_batch(measured, tile)} or smaller")


def _check_finite(client, plan, progress):
    """Refuse NaN/Inf input before anything is written (one read pass over float inputs)."""

    def check(index, result):
        if result[0] != "ok":
            raise UserError(f"the input has NaN or Inf values ({result[0]}); clean it or pass --nan fill to use 0 there")

    run_blockwise(client, finite_block, iter_blocks(plan), args=(plan,), on_result=check, progress=progress,
                  what="checking for NaN/Inf", total=n_blocks(plan), key_prefix=f"finite-{plan.run}",
                  voxels=lambda index, _: math.prod(b - a for a, b in block_box(plan, index)))


