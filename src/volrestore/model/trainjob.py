"""`volrestore train` on a Dask cluster: validate OME-Zarr training data, run the loop as worker tasks (DDP across
workers), stream progress to the client, write the checkpoint."""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

from volrestore.provenance import __version__
from volrestore.model import nets
from volrestore.io import ngff
from volrestore.cluster.client import connect, machine_cores, pin_torch_threads, task_resources
from volrestore.simulate.degrade import Degradation
from volrestore.errors import UserError
from volrestore.model.checkpoint import Normalisation, check_teacher, load_checkpoint
from volrestore.model.patches import PatchSampler
from volrestore.config import TrainConfig, TrainData
from volrestore.model.train import check_resumable, resolve_config, train

WORKER_WAIT_S = 120  # how long DDP waits for N suitable workers to join (jobqueue jobs may queue)
DDP_TIMEOUT_S = 600  # a rank stuck this long at a collective (a peer died) fails instead of hanging forever
PROGRESS_EVERY_S = 0.25  # rank 0 sends at most this often (and at every validation): events are cheap, not free
VAL_PATCHES = 8


def partial_path(out) -> Path:
    """Where rank 0 writes the periodic checkpoints that --resume continues from: next to `out`. The worker writes
    it, so the client only sees it on a filesystem shared with the workers."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


class SpatialView:
    """The spatial part (z, y, x or y, x) of one OME-Zarr level whose t / c axes have size 1, with numpy slicing read
    lazily from the zarr array underneath (what PatchSampler needs)."""

    def __init__(self, path: str, level: int):
        self.array = ngff.open_level(path, level)
        names = ngff.read_info(path).axis_names
        self.lead = tuple(0 for a in names if a not in "zyx")  # NGFF puts t, c before the spatial axes
        self.shape = tuple(self.array.shape[len(self.lead):])

    def __getitem__(self, region):
        return self.array[self.lead + tuple(region)]


def describe_image(path, level: int, role: str) -> dict:
    """Provenance of one training image; UserError for a bad level or several channels / time points."""
    info = ngff.read_info(path)
    ngff.check_level(info, level)
    lvl = info.levels[level]
    extra = {a.name: n for a, n in zip(info.axes, lvl.shape) if a.name not in "zyx" and n != 1}
    if extra:
        raise UserError(f"{role} {path} has {', '.join(f'{k}={v}' for k, v in extra.items())}: training uses one "
                        "channel and time point; write that one to its own OME-Zarr first")
    sp = [i for i, a in enumerate(info.axes) if a.name in "zyx"]
    return {"path": str(Path(path).resolve()), "level": level, "axes": [info.axes[i].name for i in sp],
            "shape": [lvl.shape[i] for i in sp], "voxel_size": [lvl.scale[i] for i in sp],
            "unit": [info.axes[i].unit for i in sp]}


@dataclass(frozen=True)
class Job:
    """Everything a rank needs; small and picklable (data are opened by path on the worker, never shipped)."""

    data: TrainData
    world: int
    config: TrainConfig
    normalisation: dict
    provenance: dict
    partial: str
    resume: str | None
    topic: str
    device: str = "cpu"
    init: str | None = None  # --init: a shipped model's name or an absolute .pt path, opened on the worker


def sampler_for(data: TrainData) -> PatchSampler:
    """The patch sampler over the OME-Zarr images `data` describes."""
    cond = SpatialView(data.input["path"], data.input["level"]) if data.input else None
    return PatchSampler(SpatialView(data.target["path"], data.target["level"]), cond,
                        degrade=Degradation.parse(data.degrade) if data.degrade else None,
                        patch=tuple(data.patch), batch=data.batch, seed=data.seed, val_fraction=data.val_fraction,
                        ref=data.photon_reference, z_context=data.z_context, z_strides=tuple(data.z_strides))


def train_image(target, out, *, input=None, degrade=None, preset=None, iterations=None, patch=None, batch=None,
                val_fraction=0.1, objective=None, level=0, seed=0, lr=None, noise_balance=0.0, checkpoint_every=None,
                z_strides=None, condition=None, init=None, resume=False, overwrite=False, cluster="local",
                workers=1, echo=print, progress=True, command=None, student=False, provenance=None) -> dict:
    """Train a model on OME-Zarr data through a Dask cluster and write the checkpoint `out`; returns a summary.

    Paired (`input` = a registered low-quality image) or self-supervised from a clean `target` with a `degrade`
    spec. `preset` names a new network; or `init` (a shipped model's name, `default` = the regression, or a .pt file)
    starts from that model's weights: fine-tuning it on this data, with its network, objective, schedule and
    noise-level condition, its intensity map carried over to this data's units (`_init_normalisation`), and by
    default a quarter of its learning rate. `patch` is (Z, Y, X) (Z 1 for a 2D preset) or the preset's own sizes.
    `batch` is per worker: with `workers` = N > 1 the loop runs under DDP on N distinct workers and the global batch
    is N·batch, so N workers train exactly what one worker with batch N·batch would. Everything is validated before
    the cluster starts; nothing is written on a UserError. `cluster` is a spec or a Client. `student`: `init` is a
    diffusion model whose one-evaluation regression student this run trains (model.distill); `provenance`: more
    fields recorded in the checkpoint's provenance.
    """
    out, workers = Path(out), 1 if workers is None else workers
    for name, value in (("--workers/--gpus", workers), ("--iterations", iterations), ("--batch", batch),
                        ("--checkpoint-every", checkpoint_every)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise UserError(f"{name} must be a whole number >= 1, got {value!r}")
    every = {"checkpoint_every": checkpoint_every} if checkpoint_every else {}
    if condition not in (None, "none", "photons"):
        raise UserError(f"--condition must be none or photons, got {condition!r}")
    if init is not None:
        init, recipe, init_norm = _init_model(init, preset, objective, condition, lr, student)
        preset_cfg = recipe["preset"]
    elif preset is None:
        raise UserError("give --preset NAME (a new network) or --init MODEL (fine-tune a trained one, e.g. default)")
    else:
        preset_cfg, recipe = nets.load_preset(preset), {"objective": objective, "condition": condition or "none",
                                                         "lr": lr}
    config = resolve_config(TrainConfig(iterations=iterations, seed=seed, noise_balance=noise_balance,
                                        **{**recipe, "preset": preset_cfg}, **every))
    condition = config.condition
    if config.objective not in nets.OBJECTIVES:
        raise UserError(f"unknown objective {config.objective!r}: use one of {', '.join(nets.OBJECTIVES)}")
    if condition == "photons" and (config.objective != "regression" or degrade is None):
        raise UserError("--condition photons trains a regression model on pairs made by --degrade (their noise level "
                        "is known): add --objective regression and --degrade SPEC")
    data, sampler = _training_data(target, input, degrade, level, preset_cfg, patch, batch, workers, val_fraction,
                                   seed, z_strides)
    source, start, norm = _resume_source(out, resume, overwrite, config, data)
    if source is None and init is not None:
        norm = _init_normalisation(*init_norm, target, level)
    elif source is None:
        norm = sampler.fit_normalisation()  # a few training batches on the client: the same for every rank
    provenance = {"version": __version__, "command": command or "", "data": data.model_dump(), "workers": workers,
                  **(provenance or {})}
    if init is not None:
        provenance["init"] = {"model": init, "hash": config.init}
    job = Job(data=data, world=workers, config=config, normalisation=norm.to_dict(), provenance=provenance,
              partial=str(partial_path(out).resolve()), resume=str(Path(source).resolve()) if source else None,
              topic=f"volrestore-train-{uuid.uuid4().hex}", init=init)
    return _train_on_cluster(job, out, start, cluster, echo, progress)


FINE_TUNE_LR = 0.25  # --init without --lr: this share of the initial model's peak learning rate


def _init_model(init: str, preset, objective, condition, lr, student=False) -> tuple[str, dict,
                                                                                    tuple[Normalisation, bool]]:
    """For `--init`: what the workers open (a shipped model's name, else the absolute path), the TrainConfig fields
    the model fixes (its network, objective, schedule, condition, hash) plus the learning rate, and its Normalisation
    with whether it restores with `normalise image`; UserError when an option given contradicts the model.
    `student`: the model is a diffusion teacher and the run trains its blind regression student on the same
    network (the objective becomes regression)."""
    from volrestore.model.diffusion_restorer import SHIPPED, model_path, own_normalise, shipped_name

    name = shipped_name(init, {})
    ck = load_checkpoint(model_path(name))
    theirs = {"--preset": ck["preset"].get("name"), "--objective": ck["objective"],
              "--condition": ck.get("condition", "none")}
    if preset is not None and nets.load_preset(preset) != ck["preset"]:
        raise UserError(f"--init {init} is a {theirs['--preset']} network, not {preset}: drop --preset (the initial "
                        "model fixes the network)")
    for flag, given in (("--objective", objective), ("--condition", condition)):
        if given is not None and given != theirs[flag]:
            raise UserError(f"--init {init} was trained with {flag} {theirs[flag]}: drop {flag} {given} or train "
                            "a new model with --preset")
    if student:
        check_teacher(ck, init)
        ck = {**ck, "objective": "regression", "condition": "none"}
    schedule = ck["schedule"]
    peak = lr or FINE_TUNE_LR * float((ck.get("train_config") or {}).get("lr") or
                                      ck["preset"].get("train", {}).get("lr", 2e-4))
    recipe = {"preset": ck["preset"], "objective": ck["objective"], "schedule": schedule["kind"],
              "T": schedule.get("T", 200), "s": schedule.get("s", 0.008), "condition": theirs["--condition"],
              "lr": peak, "init": ck["hash"]}
    return (name if name in SHIPPED else str(Path(name).resolve())), recipe, (
        Normalisation.from_dict(ck["normalisation"]), own_normalise(name, ck) == "image")


def _init_normalisation(norm: Normalisation, image: bool, target, level: int) -> Normalisation:
    """The initial model's intensity maps in this data's units, so fine-tuning starts where the model works. For a
    model that restores with `normalise image` (the shipped default: any gain and offset), the target's background and
    bright intensities, measured as restore measures an image's (blockwise.plan.input_range), are mapped onto its
    training units. The fine-tuned model then keeps this fixed map (`normalise model`, as any model trained on your
    data): the range measured per image depends on its content as well as its units (quality.py's CHO: median 6 in
    the training part, 25 in the evaluation crop), and mapping the fine-tuned model by it cost 2.3 dB at 3 photons.
    Other models keep their maps (they were trained on data in these units)."""
    if not image:
        return norm
    from volrestore.blockwise.plan import input_range

    low, high = input_range(target, level)
    gain = (high - low) / (norm.target[1] - norm.target[0])
    offset = low - gain * norm.target[0]

    def to_data(pair):
        return tuple(gain * v + offset for v in pair)
    return Normalisation(to_data(norm.input), to_data(norm.target), norm.clip)


def _training_data(target, input, degrade, level, preset: dict, patch, batch, workers, val_fraction, seed,
                   z_strides=None):
    """(TrainData, its PatchSampler) after checking the images against each other and the preset."""
    z_strides = _z_strides(z_strides, preset)
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if (input is None) == (degrade is None):
        raise UserError("give either --input LOW.ome.zarr (paired training) or --degrade SPEC, not both or neither")
    deg = Degradation.parse(degrade) if degrade else None
    tdesc = describe_image(target, level, "target")
    idesc = describe_image(input, level, "input") if input else None
    if idesc and (idesc["shape"], idesc["voxel_size"]) != (tdesc["shape"], tdesc["voxel_size"]):
        raise UserError(f"input {input} (shape {idesc['shape']}, voxel size {idesc['voxel_size']}) and target "
                        f"{target} (shape {tdesc['shape']}, voxel size {tdesc['voxel_size']}) differ: register "
                        "and resample them onto the same grid")
    dims, defaults = int(preset["spatial_dims"]), preset.get("train", {})
    if dims > len(tdesc["shape"]):
        raise UserError(f"preset {preset['name']} is 3D but {target} is 2D ({'x'.join(map(str, tdesc['shape']))}"
                        f"): use a 2D preset ({', '.join(n for n in nets.preset_names() if '2d' in n)})")
    patch = _patch_for(patch or defaults.get("patch") or ((8, 64, 64) if dims == 3 else (64, 64)), preset)
    batch = (batch or int(defaults.get("batch", 8))) * workers
    check_validation_split(tdesc["shape"][-2], patch[-2], val_fraction)
    sampler = PatchSampler(SpatialView(target, level), SpatialView(input, level) if input else None, degrade=deg,
                           patch=patch, batch=batch, seed=seed, val_fraction=val_fraction,
                           z_context=nets.z_context(preset), z_strides=z_strides)
    data = TrainData(target=tdesc, input=idesc, degrade=degrade, photon_reference=sampler.ref, patch=list(patch),
                     batch=batch, val_fraction=float(val_fraction), seed=seed, z_context=nets.z_context(preset),
                     z_strides=list(z_strides))
    return data, sampler


def _z_strides(strides, preset: dict) -> tuple[int, ...]:
    """--z-strides as a tuple, (1,) when not given; UserError for non-positive strides or a preset without z
    neighbours (only a 2.5D net sees other slices, so only its patches can take them further apart)."""
    if strides is None:
        return (1,)
    strides = tuple(strides)
    if not strides or any(not isinstance(s, int) or s < 1 for s in strides):
        raise UserError(f"--z-strides must be positive whole numbers such as 1,2,4,8, got {','.join(map(str, strides))}")
    if strides != (1,) and not nets.z_context(preset):
        raise UserError(f"--z-strides needs a 2.5D preset (one that sees neighbouring z-slices, e.g. small-2.5d); "
                        f"{preset['name']} has none")
    return strides


def check_validation_split(ny: int, patch_y: int, val_fraction: float) -> None:
    """UserError naming --val-fraction and the values that work when the held-out end of the y axis (the last
    round(ny * val_fraction) rows, as PatchSampler splits it) or the training part before it is shorter than a patch.
    A volume smaller than the patch itself is left to PatchSampler's message (use a smaller --patch)."""
    if val_fraction <= 0 or ny < patch_y:
        return
    val_rows = int(round(ny * val_fraction))
    fits = [k / 1000 for k in range(1, 1000) if min(round(ny * k / 1000), ny - round(ny * k / 1000)) >= patch_y]
    if val_rows >= patch_y and ny - val_rows >= patch_y:
        return
    if not fits:
        raise UserError(f"volume y size {ny} cannot hold both a training and a validation region of patch y "
                        f"{patch_y} (--val-fraction {val_fraction}): use --val-fraction 0 (no validation) or a "
                        "smaller --patch")
    if val_rows < patch_y:
        raise UserError(f"--val-fraction {val_fraction} holds out {val_rows} of the volume's {ny} y rows for "
                        f"validation, fewer than patch y {patch_y}: use --val-fraction {fits[0]:g} or more (up to "
                        f"{fits[-1]:g}), --val-fraction 0 (no validation) or a smaller --patch")
    raise UserError(f"--val-fraction {val_fraction} leaves {ny - val_rows} of the volume's {ny} y rows for "
                    f"training, fewer than patch y {patch_y}: use --val-fraction {fits[-1]:g} or less (from "
                    f"{fits[0]:g}), --val-fraction 0 (no validation) or a smaller --patch")


def _train_on_cluster(job: Job, out: Path, start: int, cluster, echo, progress) -> dict:
    """Run the job's ranks on the cluster and write the checkpoint atomically; the summary."""
    # A local cluster gets one worker per rank, each with its share of the cores for torch's threads.
    threads = max(1, machine_cores() // job.world)
    with connect(cluster, job.world, echo=echo, threads_per_worker=threads) as client:
        resources = task_resources(client)
        job = replace(job, device="cuda" if resources else "cpu",
                      provenance={**job.provenance, "device": "cuda" if resources else "cpu"})
        t0 = time.perf_counter()
        result = _run(client, job, resources, start, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(result.pop("checkpoint"))
    os.replace(tmp, out)  # atomic: `out` is either the old checkpoint or the new one
    summary = {"out": str(out), **result, "workers": job.world, "device": job.device,
               "seconds": round(time.perf_counter() - t0, 3), "preset": job.config.preset.get("name"),
               "init": job.provenance.get("init")}
    val = f", val PSNR {summary['val_psnr']:.2f} dB" if summary.get("val_psnr") is not None else ""
    echo(f"trained {summary['iteration']} iterations (loss {summary['loss']:.4g}{val}) on {job.world} "
         f"{job.device} worker(s) -> {out}")
    return summary


def _patch_for(patch, preset: dict) -> tuple[int, ...]:
    """The training patch per spatial axis of the preset's network: `--patch Z Y X` (Z 1 for a 2D preset)."""
    dims, multiple = int(preset["spatial_dims"]), nets.size_multiple(preset)
    patch = tuple(int(p) for p in patch)
    if dims == 2 and len(patch) == 3 and patch[0] == 1:
        patch = patch[1:]
    if len(patch) != dims or any(p < 1 or p % multiple for p in patch):
        shape = " ".join(map(str, patch))
        raise UserError(f"--patch {shape} does not fit preset {preset['name']}: give Z Y X "
                        f"{'with Z 1 ' if dims == 2 else ''}and sizes that are multiples of {multiple}")
    return patch


def _resume_source(out: Path, resume: bool, overwrite: bool, config: TrainConfig, data: TrainData):
    """(checkpoint path or None, its iteration, its Normalisation or None) after the output checks."""
    partial = partial_path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a checkpoint file name such as model.pt")
    if not resume:
        if overwrite:
            return None, 0, None
        for path, what in ((out, "exists"), (partial, "holds an interrupted run")):
            if path.exists():
                raise UserError(f"{path} {what}: pass --resume to continue training it or --overwrite to start over")
        return None, 0, None
    source = partial if partial.exists() else out if out.exists() else None
    if source is None:
        return None, 0, None  # nothing to continue: a fresh start, as train(resume=True) does
    ck = load_checkpoint(source)
    if (ck.get("train_config") or {}).get("init") != config.init:
        began = (ck.get("train_config") or {}).get("init")
        raise UserError(f"cannot resume {source}: it started from "
                        f"{'the model with hash ' + began[:12] if began else 'fresh weights'}, this run from "
                        f"{'the model with hash ' + config.init[:12] if config.init else 'fresh weights'}; resume "
                        "with the same --init, or train a new model with --overwrite or another --out")
    check_resumable(ck, config, source)
    if ck.get("condition", "none") != config.condition:
        raise UserError(f"cannot resume {source}: it was trained with --condition {ck.get('condition', 'none')}; "
                        "resume with that, or train a new model with --overwrite or another --out")
    theirs, mine = (ck.get("provenance") or {}).get("data") or {}, data.model_dump()
    # photon_reference is derived; a field older checkpoints lack has its default (their data had it too)
    changed = [k for k in mine if k != "photon_reference"
               and theirs.get(k, TrainData.model_fields[k].default) != mine[k]]
    if changed:  # resume replays the data by (seed, iteration): other data would silently break that
        raise UserError(f"cannot resume {source}: it was trained with different {', '.join(changed)}; train a new "
                        "model with --overwrite or another --out")
    if ck["iteration"] >= config.iterations:
        raise UserError(f"{source} has already trained {ck['iteration']} iterations: give --iterations above that")
    return source, ck["iteration"], Normalisation.from_dict(ck["normalisation"])


# ---- client side: pick workers, rendezvous, submit ranks, stream progress -------------------------------------------

def _run(client, job: Job, resources, start: int, progress: bool) -> dict:
    workers = _pick_workers(client, job.world, resources)
    rendezvous = None
    if job.world > 1:  # rank 0's host and a port free there, found by a small task on that very worker
        port = client.submit(_free_port, workers=[workers[0]], allow_other_workers=False, pure=False).result()
        rendezvous = f"{urlparse(workers[0]).hostname}:{port}"
    # retries=0: a retried rank would wait for peers of a process group that no longer exists.
    futures = [client.submit(_run_rank, job, rank, rendezvous, key=f"{job.topic}-rank{rank}", workers=[w],
                             allow_other_workers=False, resources=resources, pure=False, retries=0)
               for rank, w in enumerate(workers)]
    latest: dict = {}
    client.subscribe_topic(job.topic, lambda event: latest.update(event[1]))
    try:
        _follow(futures, workers, latest, job.config.iterations, start, progress)
        return futures[0].result()
    finally:
        client.unsubscribe_topic(job.topic)
        client.cancel([f for f in futures if not f.done()])


def _pick_workers(client, n: int, resources) -> list[str]:
    """n distinct worker addresses (GPU workers when the cluster has them), waiting up to WORKER_WAIT_S."""
    deadline = time.monotonic() + WORKER_WAIT_S
    while True:
        info = client.scheduler_info(n_workers=-1).get("workers", {})
        fit = sorted(a for a, w in info.items() if not resources or w.get("resources", {}).get("GPU"))
        if len(fit) >= n:
            return fit[:n]
        if time.monotonic() > deadline:
            kind = "GPU workers" if resources else "workers"
            raise UserError(f"training on {n} {kind} but the cluster has {len(fit)} after {WORKER_WAIT_S}s: use "
                            f"--workers/--gpus {max(len(fit), 1)} or a larger cluster")
        time.sleep(0.5)


def _follow(futures, workers, latest: dict, total: int, start: int, progress: bool) -> None:
    """Show a progress bar from rank 0's events until every rank has finished; one line for a failed rank."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("it"),
               TextColumn("{task.fields[stats]}"), TimeRemainingColumn()]
    # stderr: stdout carries results (--json) and redirected logs must not fill with bar frames
    with Progress(*columns, console=Console(stderr=True), disable=not progress, transient=False) as bar:
        task = bar.add_task("training", total=total, completed=start, stats="")
        while True:
            for rank, fut in enumerate(futures):
                if fut.status == "error":
                    exc = fut.exception()
                    if isinstance(exc, UserError):
                        raise exc
                    msg = str(exc).splitlines()[0] if str(exc) else ""
                    raise UserError(f"training failed on {workers[rank]} (rank {rank}): {type(exc).__name__}: "
                                    f"{msg}") from None
            if all(f.status == "finished" for f in futures):
                return
            if latest:
                rec = dict(latest)
                psnr = f"  val {rec['val_psnr']:.2f} dB" if "val_psnr" in rec else ""
                bar.update(task, completed=rec["iteration"],
                           stats=f"loss {rec['loss']:.4g}  {rec['it_per_s']:.2f} it/s{psnr}")
            time.sleep(0.2)


# ---- worker side ---------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class _Reporter:
    """rank 0's `log`: sends records as worker events (fire-and-forget, unlike a Queue put), throttled."""

    def __init__(self, topic: str):
        from distributed import get_worker

        self.worker, self.topic, self.last, self.val = get_worker(), topic, 0.0, {}

    def __call__(self, record: dict) -> None:
        if "val_psnr" in record:
            self.val = {"val_psnr": record["val_psnr"]}  # keep showing the last validation between checkpoints
        now = time.monotonic()
        if "val_psnr" in record or now - self.last >= PROGRESS_EVERY_S:
            self.worker.log_event(self.topic, {**self.val, **record})
            self.last = now


def _run_rank(job: Job, rank: int, rendezvous: str | None) -> dict | None:
    """One rank of the training: its slice of every global batch, read from the OME-Zarr on this worker. Rank 0
    returns the final checkpoint's bytes (and removes its partial file); other ranks return None."""
    import torch
    import torch.distributed as dist

    if job.device == "cpu":
        pin_torch_threads()
    if job.world > 1:
        if job.device == "cuda":
            torch.cuda.set_device(0)  # dask-cuda pins one GPU per worker: it is device 0 here
        dist.init_process_group("nccl" if job.device == "cuda" else "gloo", init_method=f"tcp://{rendezvous}",
                                rank=rank, world_size=job.world, timeout=timedelta(seconds=DDP_TIMEOUT_S))
    try:
        sampler = sampler_for(job.data)
        per = sampler.batch // job.world
        val = sampler.validation(VAL_PATCHES) if rank == 0 and job.data.val_fraction > 0 else None
        lo, hi = rank * per, (rank + 1) * per
        conditioned = job.config.condition == "photons"  # each patch's degradation level goes with it
        if conditioned and val:
            val = (*val, sampler.photons(0, 0, VAL_PATCHES, val=True))

        def batches(it):
            pair = sampler(it, lo, hi)
            return (*pair, sampler.photons(it, lo, hi)) if conditioned else pair
        init = None
        if job.init is not None and not job.resume:
            from volrestore.model.diffusion_restorer import model_path

            init = model_path(job.init)
        ck = train(batches, job.partial, job.config,
                   Normalisation.from_dict(job.normalisation), provenance=job.provenance,
                   resume=job.resume or False, val=val, device=job.device,
                   log=_Reporter(job.topic) if rank == 0 else None, init=init)
    finally:
        if job.world > 1:
            dist.destroy_process_group()
    if rank != 0:
        return None
    partial = Path(job.partial)
    data = partial.read_bytes()
    partial.unlink()  # the client writes --out from these bytes; nothing is left to resume from
    last = ck["history"][-1]
    return {"checkpoint": data, "iteration": ck["iteration"], "hash": ck["hash"], "loss": last["loss"],
            "val_psnr": last.get("val_psnr"), "it_per_s": last["it_per_s"]}
