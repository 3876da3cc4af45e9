"""`restore(...)`: plan write-blocks over the tile grid, run them in bounded waves on Dask, blend, write, resume."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from volrestore.io import ngff, pyramid
from volrestore.cluster.client import connect, task_resources
from volrestore.errors import UserError
from volrestore.blockwise.blocks import done_markers, iter_blocks, n_blocks
from volrestore.blockwise.plan import Plan, Prepared, prepare
from volrestore.config import RESULT_FIELDS, ModelRef, RestoreConfig
from volrestore.model.restorer import BuildRestorer, RestorerSpec
from volrestore.blockwise.runner import run_blocks
from volrestore.blockwise.tasks import finite_block, restore_block

# Block tasks per GPU worker at a time: each holds 1/BLOCKS_PER_GPU of the worker's GPU resource. While one block's
# tiles are on the GPU (only one model call per GPU at a time, see _compute_slot) the other task reads and decompresses
# its input or blends and writes its output, so the GPU does not wait for I/O. With the whole GPU=1 per task, the
# second worker thread would sit idle and reading would never overlap compute.
BLOCKS_PER_GPU = 2


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

    Everything is validated before anything is written. `model` is a name with options ("gaussian:sigma=2"), a
    checkpoint path or "default"; `model_options` are more of its options (samples, steps, std, ...; None = not
    given). `cluster` is "local", "cuda", "tcp://host:port", a jobqueue YAML or a Client; `tile`, `chunks` and `block`
    are spatial sizes (z, y, x present) of the tiles, the output chunks and the write-blocks.
    """
    config = RestoreConfig.validated(
        input=str(input), output=str(output), model=ModelRef.parse(model, **model_options), level=level,
        tile=_listed(tile), overlap=overlap, batch=batch, seed=seed, mask=None if mask is None else str(mask),
        dtype=dtype, nan=nan, chunks=_listed(chunks), block=_listed(block), resume=resume, overwrite=overwrite)
    return run_restore(config, cluster, workers=workers, echo=echo, progress=progress, command=command)


def _listed(values):
    return None if values is None else [int(v) for v in values]


def run_restore(config: RestoreConfig, cluster="local", *, workers=None, echo=print, progress=True,
                command=None) -> dict:
    """Run a validated RestoreConfig: check the output, build the model on the workers, create the outputs, restore
    every block not yet done, build the pyramids and mark the outputs complete (primary last)."""
    prepared = prepare(config)
    out_paths = [config.output] + ([std_path(config.output)] if "std" in prepared.spec.outputs else [])
    done_before = _check_output(config, out_paths, prepared.parameters())
    plan = prepared.plan
    if done_before == "complete":
        echo(f"{config.output} is already complete; nothing to do")
        return {"blocks": n_blocks(plan), "skipped": n_blocks(plan), "restored": 0, "empty": 0}
    with connect(cluster, workers, echo=echo) as client:
        _build_on_workers(client, prepared.spec)  # a model that cannot load fails here, before anything is written
        if done_before is None:
            if config.nan == "error" and np.issubdtype(np.dtype(_input_dtype(prepared)), np.inexact):
                _check_finite(client, plan, progress)
            _create_outputs(prepared, out_paths, command)
        plan = _with_output_arrays(plan, prepared.spec, out_paths)
        os.makedirs(plan.progress, exist_ok=True)
        summary = _restore_blocks(client, plan, prepared.spec, resumed=done_before is not None, progress=progress,
                                  echo=lambda n, total: echo(f"resuming {config.output}: {n} of {total} blocks "
                                                             "already done, skipped"))
        for path in out_paths:
            pyramid.build_pyramid(path, client)
    for path in out_paths[1:] + out_paths[:1]:  # primary last: `complete` there means everything is there
        ngff.set_complete(path, True, extra={"summary": summary})
    shutil.rmtree(plan.progress, ignore_errors=True)
    oom = f" (from {config.batch}: GPU out of memory)" if summary["batch"] < config.batch else ""
    echo(f"restored {summary['restored']} blocks, {summary['empty']} empty (mask), {summary['skipped']} skipped "
         f"(resume); {summary['voxels_per_s']:.3g} voxels/s, batch {summary['batch']}{oom} -> {config.output}")
    return summary


def _input_dtype(prepared: Prepared) -> str:
    return prepared.info.levels[prepared.config.level].dtype


def _create_outputs(prepared: Prepared, out_paths: list[str], command: str | None) -> None:
    """Create the empty outputs with their provenance (complete=False); the primary last, as it holds the markers."""
    info, config, plan = prepared.info, prepared.config, prepared.plan
    lvl = info.levels[config.level]
    for name, path in zip(prepared.spec.outputs[::-1], out_paths[::-1]):
        ngff.create_image(
            path, shape=lvl.shape, dtype=plan.dtype if name == "mean" else "float32", axes=info.axes,
            scale=lvl.scale, translation=lvl.translation, chunks=prepared.chunks, shards=prepared.shards,
            version=info.version, n_levels=len(info.levels) - config.level, channel_names=info.channel_names,
            overwrite=config.overwrite,
            provenance={"command": command or ngff.make_provenance()["command"],
                        "parameters": {**prepared.parameters(), "output": name}},
        )


def _restore_blocks(client, plan: Plan, spec: RestorerSpec, *, resumed: bool, progress: bool, echo) -> dict:
    """Run restore_block over every block not done yet; the run's summary (counts, voxels/s, settled batch)."""
    total = n_blocks(plan)
    skipped = sum(1 for _ in done_markers(plan)) if resumed else 0
    if resumed:
        echo(skipped, total)
    counts = {"restored": 0, "empty": 0}
    stats = {"voxels": 0, "compute_s": 0.0, "batch": plan.batch}

    def tally(index, result):
        status, voxels, block_stats = result
        counts[status] += 1
        if status == "restored":
            stats["voxels"] += voxels
            stats["compute_s"] += block_stats["compute_s"]
            stats["batch"] = min(stats["batch"], block_stats["batch"])

    t0 = time.perf_counter()
    gpu = (task_resources(client) or {}).get("GPU")
    run_blocks(client, restore_block, (plan, spec), iter_blocks(plan, skip_done=resumed), total - skipped, "restoring",
               progress, tally, resources={"GPU": gpu / BLOCKS_PER_GPU} if gpu else None)
    seconds = time.perf_counter() - t0
    return {"blocks": total, "skipped": skipped, **counts, "seconds": round(seconds, 3),
            "voxels_per_s": stats["voxels"] / seconds if seconds > 0 else 0.0, "batch": stats["batch"],
            "compute_s": round(stats["compute_s"], 3)}


def _check_output(config: RestoreConfig, out_paths: list[str], parameters: dict):
    """None for a fresh output; "partial" to resume; "complete" when nothing is left. UserError when refused."""
    output = config.output
    if config.resume and config.overwrite:
        raise UserError("--resume and --overwrite contradict each other; give one of them")
    inputs = [config.input] + ([config.mask] if config.mask is not None else [])
    if config.resume and Path(output).exists():
        old = ngff.read_info(output)
        prev = (old.provenance or {}).get("parameters")
        if not isinstance(prev, dict):
            raise UserError(f"{output} was not written by volrestore restore; cannot resume it, choose another output")
        for key in RESULT_FIELDS:
            if prev.get(key) != parameters.get(key):
                raise UserError(f"cannot resume {output}: parameter {key} was {prev.get(key)!r}, now "
                                f"{parameters.get(key)!r}; rerun with the same value or use --overwrite")
        for path in out_paths[1:]:
            if not Path(path).exists():
                raise UserError(f"cannot resume {output}: its sibling {path} is missing; use --overwrite")
        return "complete" if old.complete else "partial"
    for path in out_paths:
        ngff.check_output_path(path, inputs=inputs, overwrite=config.overwrite)
    return None


def _with_output_arrays(plan, spec, out_paths):
    arrays = tuple((name, path, ngff.read_info(path).levels[0].path) for name, path in zip(spec.outputs, out_paths))
    return Plan(**{**plan.__dict__, "outputs": arrays})


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

    run_blocks(client, finite_block, (plan,), iter_blocks(plan), n_blocks(plan), "checking for NaN/Inf", progress, check)


