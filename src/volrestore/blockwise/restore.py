"""`restore(...)`: plan write-blocks over the tile grid, run them in bounded waves on Dask, blend, write, resume."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import numpy as np
from distributed.diagnostics.plugin import WorkerPlugin

from volrestore.io import ngff, pyramid
from volrestore.cluster.client import connect, task_resources
from volrestore.errors import UserError
from volrestore.blockwise.blocks import done_markers, iter_blocks, n_blocks
from volrestore.blockwise.plan import Plan, prepare
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

    Everything is validated before anything is written. `cluster` is "local", "tcp://host:port" or a Client;
    `chunks`/`block` are spatial sizes (z, y, x present) of the output chunks and of the write-blocks.
    """
    input, output = str(input), str(output)
    plan, spec, info, params = prepare(input, output, model, level, tile, overlap, batch, seed, mask, dtype, nan,
                                        chunks, block, model_options)
    out_paths = [output] + ([std_path(output)] if "std" in spec.outputs else [])
    done_before = _check_output(output, out_paths, input, mask, params, resume, overwrite)
    if done_before == "complete":
        echo(f"{output} is already complete; nothing to do")
        return {"blocks": n_blocks(plan), "skipped": n_blocks(plan), "restored": 0, "empty": 0}

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
        todo = iter_blocks(plan, skip_done=done_before is not None)
        total = n_blocks(plan)
        skipped = sum(1 for _ in done_markers(plan)) if done_before is not None else 0
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
        run_blocks(client, restore_block, (plan, spec), todo, total - skipped, "restoring", progress, tally,
                    resources={"GPU": gpu / BLOCKS_PER_GPU} if gpu else None)
        seconds = time.perf_counter() - t0
        summary = {
            "blocks": total, "skipped": skipped, **counts, "seconds": round(seconds, 3),
            "voxels_per_s": restored_vox / seconds if seconds > 0 else 0.0,
            "batch": settled, "compute_s": round(compute_s, 3),
        }
        for path in out_paths:
            pyramid.build_pyramid(path, client)
    for path in out_paths[1:] + out_paths[:1]:  # primary last: `complete` there means everything is there
        ngff.set_complete(path, True, extra={"summary": summary})
    shutil.rmtree(plan.progress, ignore_errors=True)
    oom = f" (from {batch}: GPU out of memory)" if settled < batch else ""
    echo(f"restored {summary['restored']} blocks, {summary['empty']} empty (mask), {skipped} skipped (resume); "
         f"{summary['voxels_per_s']:.3g} voxels/s, batch {settled}{oom} -> {output}")
    return summary


# ----------------------------------------------------------------------------------------------- planning


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


# ----------------------------------------------------------------------------------------------- running


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

    run_blocks(client, finite_block, (plan,), iter_blocks(plan), n_blocks(plan), "checking for NaN/Inf", progress, check)


# ----------------------------------------------------------------------------------------------- block tasks (workers)


