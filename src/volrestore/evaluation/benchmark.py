"""`volrestore benchmark`: bare-model vs end-to-end restore throughput, FLOP/s, memory and hours per TB, in one run."""

from __future__ import annotations

import itertools
import math
import os
import resource
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from volrestore.blockwise import blocks
from volrestore.blockwise import plan as planning
from volrestore.blockwise import restore as engine
from volrestore.io import ngff
from volrestore.model import nets
from volrestore.cluster.client import connect, is_gpu_cluster, task_resources
from volrestore.errors import UserError
from volrestore.model.diffusion import Schedule
from volrestore.model.diffusion_restorer import OPTIONS, default_steps, sampler_for
from volrestore.model.restorer import BuildRestorer, restorer_for

RESTORE_SAMPLES = OPTIONS["samples"]  # restore's default K
TB_VOXELS = 1e12 / 2  # voxels in a terabyte of uint16
# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s, matched as substrings of torch.cuda.get_device_name();
# the PCIe/NVL H100s come first because their names also contain "H100" but their clocks (peaks) are lower.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))

# Every field of the result (and of --json), with its meaning: the README and the test use this table.
FIELDS = {
    "preset": "network preset name",
    "params": "network parameters",
    "trained": "always false: the network is randomly initialised (speed does not depend on the weights)",
    "device": "cpu or cuda",
    "device_name": "CPU model or GPU name",
    "cluster": "Dask cluster spec of the end-to-end run (local: 1 worker process, 1 thread; cuda: one worker per GPU)",
    "workers": "Dask workers (GPUs on cuda) in the end-to-end run",
    "samples": "K samples averaged per tile",
    "sampler": "sampler name",
    "steps": "sampler steps (network evaluations per sample)",
    "compile": "whether the network ran under torch.compile",
    "shape": "generated volume shape (z, y, x), uint16",
    "voxels": "voxels in the volume",
    "tile": "tile shape per spatial axis of the volume (z 1 for a 2D model)",
    "overlap": "tile overlap per side (voxels)",
    "batch": "tiles per restorer call requested",
    "batch_settled": "tiles per call the end-to-end run settled on (lower than batch after GPU out-of-memory)",
    "block": "write-block shape of the end-to-end run",
    "tiles": "tiles in the grid (the bare pass computes each once)",
    "tile_recompute_factor": "tile computations of the end-to-end run / grid tiles (1: each tile once, blockwise.spill)",
    "bare_voxels_per_s": "volume voxels / seconds of the restorer called directly on every grid tile once, in the "
                         "engine's batches, on the same worker (mean of a pass before and one after the end-to-end run)",
    "bare_voxels_per_s_runs": "the two bare passes [before, after]",
    "e2e_voxels_per_s": "volume voxels / seconds of volrestore.restore's block phase (read, restore, blend, write)",
    "e2e_wall_s": "seconds of the whole restore() call (planning, output creation, blocks, completion)",
    "efficiency": "e2e_voxels_per_s / bare_voxels_per_s",
    "efficiency_per_worker": "efficiency / workers (1 = the engine costs nothing; bare runs on one worker)",
    "model_busy_share": "seconds inside model calls / (block-phase seconds x workers) in the end-to-end run",
    "evaluations_per_pass": "network evaluations of one bare pass, counted per sample (batch K counts K)",
    "flop_per_evaluation": "FLOP of one network evaluation of one sample on one tile (torch FlopCounterMode)",
    "flop_per_voxel": "evaluations_per_pass x flop_per_evaluation / voxels",
    "achieved_flop_per_s": "flop_per_voxel x bare_voxels_per_s (the network's achieved FLOP/s in the bare pass)",
    "e2e_flop_per_s": "flop_per_voxel x e2e_voxels_per_s",
    "peak_bf16_flop_per_s": "GPU's dense bf16 peak (null when unknown or on CPU)",
    "peak_share": "achieved_flop_per_s / peak_bf16_flop_per_s (null when the peak is unknown)",
    "hours_per_tb": "projected hours for a terabyte of uint16 (5e11 voxels) at e2e_voxels_per_s: "
                    "5e11 / e2e_voxels_per_s / 3600",
    "hours_per_tb_bare": "the same at bare_voxels_per_s",
    "default_samples": "K of `volrestore restore` with this model's defaults",
    "default_steps": "sampler steps of `volrestore restore` with this model's defaults",
    "hours_per_tb_default": "hours_per_tb scaled to restore's defaults for a diffusion model (default-diffusion): "
                            "x (default_samples x default_steps) / (samples x steps); time is linear in both",
    "hours_per_tb_regression": "hours_per_tb scaled to one network evaluation per tile (samples x steps = 1): "
                               "plain `restore IN OUT`, whose shipped default is the regression on the same net",
    "evaluations_per_voxel": "network evaluations each volume voxel passes through in a bare pass: "
                             "evaluations_per_pass x tile voxels / voxels (overlap and padding included)",
    "peak_rss_mib": "peak resident memory of the model worker process (MiB, ru_maxrss; the maximum over workers)",
    "peak_gpu_mib_bare": "torch.cuda.max_memory_allocated during a bare pass (MiB; null on CPU)",
    "peak_gpu_mib_e2e": "torch.cuda.max_memory_allocated during the end-to-end run, maximum over workers (MiB; null on CPU)",
    "seconds": "wall-clock seconds of the whole benchmark",
    "load_average": "the machine's 1-minute load average at the end (other work on it skews every number)",
}


def run(preset="default", *, samples=1, steps=None, sampler=None, device="cpu", size=None, tile=None,
        overlap=None, batch=4, compile=False, cluster=None, workers=None, seed=0, workdir=None, echo=print) -> dict:
    """Benchmark a preset (random weights) on a generated volume; returns the FIELDS dict.

    `size`: (Z, Y, X) (default 64³ on CPU, 256³ on CUDA); `tile`: as restore's (None: the model's default);
    `cluster`: default "local" with 1 worker on CPU, "cuda" on CUDA (or a Client, reused as it is).
    """
    import torch

    t_start = time.perf_counter()
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no GPU is visible to this process; use --device cpu")
    cfg = nets.load_preset(default_preset() if preset == "default" else preset)
    sampler = sampler or sampler_for(cfg.get("schedule"))
    full_steps = default_steps(sampler, Schedule(kind=cfg["schedule"]))
    # On a CPU one step is measured unless asked (time is linear in steps; hours_per_tb_default scales it), so the
    # defaults finish in a few minutes on a laptop while still timing the model's real default tile.
    steps = steps or (1 if device == "cpu" else full_steps)
    shape = parse_size(size, None) if size is not None else default_size(cfg, device)
    if cluster is None:
        cluster, workers = ("cuda", workers) if device == "cuda" else ("local", workers or 1)
    with tempfile.TemporaryDirectory(prefix="volrestore-bench-", dir=workdir) as tmp:
        tmp = Path(tmp)
        src, norm = make_volume(tmp / "input.ome.zarr", shape, seed)
        ckpt, params = random_checkpoint(cfg, tmp / "random-init.pt", norm, seed)
        options = dict(samples=samples, sampler=sampler, steps=steps, device=device, compile=compile)
        plan, spec = planning.plan(src, ckpt, tile=tile, overlap=overlap, batch=batch, seed=seed, **options)
        with connect(cluster, workers, echo=lambda *_: None) as client:
            m = _measure(client, spec, plan, src, tmp / "output.ome.zarr", ckpt,
                         dict(tile=tile, overlap=overlap, batch=batch, seed=seed, **options))
    return _fields(cfg, params, device, cluster, m, plan, shape, batch=batch, samples=samples, sampler=sampler,
                   steps=steps, full_steps=full_steps, compile=compile, t_start=t_start)


def _fields(cfg, params, device, cluster, m, plan, shape, *, batch, samples, sampler, steps, full_steps, compile,
            t_start) -> dict:
    """The FLOP-counted, per-voxel report of one benchmark run (FIELDS), from _measure's readings."""
    before, after, summary, n_workers = m["before"], m["after"], m["summary"], m["workers"]
    flop, e2e_wall, rss, gpu_e2e = m["flop"], m["e2e_wall"], m["rss"], m["gpu_e2e"]
    voxels = math.prod(shape)
    bare = (before["voxels_per_s"] + after["voxels_per_s"]) / 2
    e2e = summary["voxels_per_s"]
    flop_per_voxel = before["evaluations"] * flop / voxels if before["evaluations"] is not None else None
    peak = peak_bf16(before["device_name"]) if device == "cuda" else None
    achieved = flop_per_voxel * bare if flop_per_voxel is not None else None
    return {
        "preset": cfg["name"], "params": params, "trained": False, "device": device,
        "device_name": before["device_name"], "cluster": cluster if isinstance(cluster, str) else cluster_name(cluster),
        "workers": n_workers, "samples": samples, "sampler": sampler, "steps": steps, "compile": compile,
        "shape": list(shape), "voxels": voxels, "tile": list(plan.grid.tile_shape), "overlap": plan.grid.axes[-1].overlap,
        "batch": batch, "batch_settled": summary["batch"], "block": list(plan.block), "tiles": before["tiles"],
        "tile_recompute_factor": summary["tiles"] / plan.grid.n_tiles,
        "bare_voxels_per_s": bare, "bare_voxels_per_s_runs": [before["voxels_per_s"], after["voxels_per_s"]],
        "e2e_voxels_per_s": e2e, "e2e_wall_s": e2e_wall, "efficiency": e2e / bare,
        "efficiency_per_worker": e2e / bare / n_workers,
        "model_busy_share": summary["compute_s"] / (summary["seconds"] * n_workers) if summary["seconds"] else None,
        "evaluations_per_pass": before["evaluations"], "flop_per_evaluation": flop, "flop_per_voxel": flop_per_voxel,
        "achieved_flop_per_s": achieved, "e2e_flop_per_s": flop_per_voxel * e2e if flop_per_voxel else None,
        "peak_bf16_flop_per_s": peak, "peak_share": achieved / peak if peak and achieved else None,
        "hours_per_tb": hours_per_tb(e2e), "hours_per_tb_bare": hours_per_tb(bare),
        "default_samples": RESTORE_SAMPLES, "default_steps": full_steps,
        "hours_per_tb_default": hours_per_tb(e2e) * RESTORE_SAMPLES * full_steps / (samples * steps),
        "hours_per_tb_regression": hours_per_tb(e2e) / (samples * steps),
        "evaluations_per_voxel": (before["evaluations"] * math.prod(plan.grid.tile_shape) / voxels
                                  if before["evaluations"] is not None else None), "peak_rss_mib": rss,
        "peak_gpu_mib_bare": before["peak_gpu_mib"], "peak_gpu_mib_e2e": max(gpu_e2e) if gpu_e2e else None,
        "seconds": time.perf_counter() - t_start, "load_average": os.getloadavg()[0],
    }


def _measure(client, spec, plan, src, out, ckpt, restore_kw: dict) -> dict:
    """Bare pass, end-to-end restore, bare pass again, FLOP count and memory, on the cluster's workers."""
    res = task_resources(client)
    # The bare passes run on a worker, through the restorer that worker keeps for the engine (BuildRestorer): same
    # process, threads, device and (compiled) model; the first pass also pays the warm-up and compilation.
    client.register_plugin(BuildRestorer(spec))
    before = client.submit(bare_pass, spec, plan, pure=False, resources=res).result()
    client.run(_reset_gpu_peak)
    t0 = time.perf_counter()
    summary = engine.restore(src, out, model=ckpt, cluster=client, progress=False, echo=lambda *_: None, **restore_kw)
    e2e_wall = time.perf_counter() - t0
    gpu_e2e = [m for m in client.run(_gpu_peak_mib).values() if m is not None]
    after = client.submit(bare_pass, spec, plan, warm_up=False, pure=False, resources=res).result()
    flop = client.submit(model_flop, spec, plan, pure=False, resources=res).result()
    return {"before": before, "after": after, "summary": summary, "e2e_wall": e2e_wall, "gpu_e2e": gpu_e2e,
            "flop": flop, "rss": max(client.run(_rss_mib).values()),
            "workers": len(client.scheduler_info(n_workers=-1)["workers"])}


def cluster_name(client) -> str:
    """What a given Client stands for: "cuda" for GPU clusters started by volrestore, else its scheduler address."""
    return "cuda" if is_gpu_cluster(client) else client.scheduler.address


def hours_per_tb(voxels_per_s: float) -> float:
    """Hours for a terabyte of uint16 (5e11 voxels) at this rate."""
    return TB_VOXELS / voxels_per_s / 3600 if voxels_per_s > 0 else math.inf


def peak_bf16(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a known GPU, else None."""
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS if key in device_name), None)


def default_preset() -> dict:
    """The shipped default model's network preset: what `volrestore restore` runs by default."""
    from volrestore.model.checkpoint import load_checkpoint
    from volrestore.model.diffusion_restorer import default_model_path

    return dict(load_checkpoint(default_model_path())["preset"])


def default_size(cfg: dict, device: str) -> tuple[int, int, int]:
    """The default generated volume: on CPU exactly one default tile of the model (its core, tile - 2 x overlap per
    axis, so the one tile covers it with full context: 1 x 448 x 448 for 2D/2.5D, 32^3 for 3D), so the defaults
    finish in minutes on a laptop; on CUDA enough tiles to fill a GPU."""
    from volrestore.model.diffusion_restorer import DEFAULT_TILE

    if device == "cuda":
        return (16, 1024, 1024) if cfg["spatial_dims"] == 2 else (256, 256, 256)
    tile, overlap = DEFAULT_TILE[cfg["spatial_dims"]]
    core = tuple(t - 2 * overlap for t in tile)
    return (1, *core) if cfg["spatial_dims"] == 2 else core


def parse_size(size, default: int | None) -> tuple[int, int, int]:
    """The generated volume's (Z, Y, X): `size` as given (three positive whole numbers) or a cube of `default`."""
    dims = (default,) * 3 if size is None else tuple(size)
    if len(dims) != 3 or not all(isinstance(v, int) and v >= 1 for v in dims):
        raise UserError(f"--size needs three positive whole numbers Z Y X, e.g. 8 256 256; got {size!r}")
    return dims


# ----------------------------------------------------------------------------------------------- inputs


def make_volume(path, shape, seed=0):
    """A degraded synthetic uint16 OME-Zarr volume of `shape`; returns (path, normalisation fitted on it).

    The phantom is drawn at most 128 voxels per axis and mirrored out to the shape: its content does not change the
    speed, and drawing a big phantom would take longer than the benchmark.
    """
    from volrestore.simulate.degrade import Degradation
    from volrestore.simulate.synthetic import phantom
    from volrestore.model.checkpoint import Normalisation

    small = tuple(min(n, 128) for n in shape)
    clean = phantom(small, seed=seed)
    noisy = Degradation(photons=20, read=1, seed=seed)(clean)
    norm = Normalisation.fit(noisy * 1000 + 100, clean * 1000 + 100)
    reps = [(0, n - s) for n, s in zip(shape, small)]
    data = np.clip(np.rint(np.pad(noisy, reps, mode="symmetric") * 1000 + 100), 0, 65535).astype(np.uint16)
    ngff.create_image(path, shape=shape, dtype="uint16", axes=["z", "y", "x"], scale=[1.0] * 3,
                      chunks=[min(n, 64) for n in shape], overwrite=True)
    ngff.open_level(path, 0, mode="r+")[...] = data
    ngff.set_complete(path)
    return str(path), norm


def random_checkpoint(preset: dict, path, norm, seed=0):
    """A checkpoint of the preset's network with seeded random weights (untrained); returns (path, parameters)."""
    import torch

    from volrestore.model.diffusion import Schedule
    from volrestore.model.checkpoint import save_checkpoint

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nets.build(preset)
    state = net.state_dict()
    save_checkpoint(path, {
        "preset": preset, "objective": net.objective, "schedule": Schedule(kind=nets.load_preset(preset)["schedule"]).to_dict(),
        "normalisation": norm.to_dict(), "provenance": {"command": "volrestore benchmark (random weights)"},
        "iteration": 0, "train_config": {}, "history": [], "model": state, "ema": state, "optimizer": {},
    })
    return str(path), nets.count_params(net)


# ----------------------------------------------------------------------------------------------- measurements


def grid_tiles(plan):
    """Every tile of the plan's grid once, in the engine's global order."""
    return itertools.product(*map(range, plan.grid.counts))


def recompute_factor(plan) -> float:
    """Tile computations if every write-block computed every tile touching it / grid tiles: what blending tiles
    across blocks cost before owners sent their parts (blockwise.spill); restore's summary reports the real count."""
    calls = 0
    for index in blocks.iter_blocks(plan):
        lo = [i * b for i, b in zip(index, plan.block)]
        hi = [min(a + b, n) for a, b, n in zip(lo, plan.block, plan.shape)]
        calls += math.prod(len(r) for r in plan.grid.tiles_touching(lo, hi))
    return calls / plan.grid.n_tiles


def bare_pass(spec, plan, warm_up: bool = True) -> dict:
    """The restorer alone on every grid tile once, in batches of exactly plan.batch (padded as the engine does).

    Runs on a worker (the restorer cached there, its threads and device). Returns voxels/s over the volume, tiles,
    network evaluations counted per sample (None for restorers without a network) and peak GPU memory.
    """
    import zarr

    restorer = restorer_for(spec)
    data = np.asarray(zarr.open_group(plan.input, mode="r")[plan.input_array][...], dtype=np.float32)
    squeeze = restorer.spatial_dims < data.ndim
    grid = plan.grid

    def batches():
        tiles = grid_tiles(plan)
        while group := list(itertools.islice(tiles, plan.batch)):
            group += group[-1:] * (plan.batch - len(group))
            x = np.stack([data[np.ix_(*(ax.tile_index(k, 0) for ax, k in zip(grid.axes, t)))] for t in group])
            yield (x[:, 0] if squeeze and not restorer.z_context else x), [tuple(ax.start(k) for ax, k in zip(grid.axes, t)) for t in group]

    if warm_up:  # allocator, cuDNN autotuning, torch.compile; the pass after the end-to-end run needs none
        restorer(*next(batches()), plan.seed)
    _reset_gpu_peak()
    with _counting(restorer) as count:
        t0 = time.perf_counter()
        for tiles, origins in batches():  # cut from memory (a copy; no reading or decompression is timed here)
            restorer(tiles, origins, plan.seed)
        seconds = time.perf_counter() - t0
    return {"voxels_per_s": data.size / seconds, "seconds": seconds, "tiles": grid.n_tiles,
            "evaluations": count["samples"] if count else None, "peak_gpu_mib": _gpu_peak_mib(),
            "device_name": _device_name(restorer)}


def model_flop(spec, plan) -> int | None:
    """FLOP of one network evaluation of one sample on one tile, counted by torch's FlopCounterMode (on a worker)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    restorer = restorer_for(spec)
    net = getattr(restorer, "net", None)
    if not isinstance(net, torch.nn.Module):
        return None
    tile = plan.grid.tile_shape[-restorer.spatial_dims:]
    dev = next(net.parameters()).device
    x = torch.zeros((1, 1, *tile), device=dev)
    cond = torch.zeros((1, 1 + 2 * getattr(net, "z_context", 0), *tile), device=dev)  # 2.5D: neighbour slices too
    t = torch.full((1,), 100.0, device=dev)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter, \
            torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        net(cond, x, t)
    return int(counter.get_total_flops())


@contextmanager
def _counting(restorer):
    """Count network evaluations per sample through the restorer's denoiser (works with torch.compile too)."""
    denoiser = getattr(restorer, "denoiser", None)
    if denoiser is None:
        yield None
        return
    count, raw = {"samples": 0}, denoiser.raw

    def counted(x_t, t, cond):
        count["samples"] += cond.shape[0]
        return raw(x_t, t, cond)

    denoiser.raw = counted
    try:
        yield count
    finally:
        del denoiser.raw  # back to the class's method


def _device_name(restorer) -> str:
    import platform

    device = getattr(restorer, "device", None)
    if device is not None and getattr(device, "type", "") == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    from volrestore.cluster.client import machine_cores

    return f"{name} ({machine_cores()} cores visible)"


def _reset_gpu_peak():
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def _gpu_peak_mib():
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return None


def _rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ----------------------------------------------------------------------------------------------- report


def report(r: dict) -> str:
    """Human-readable summary of a result."""
    def si(v, unit):
        if v is None:
            return "n/a"
        for div, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(v) >= div:
                return f"{v / div:.3g} {p}{unit}"
        return f"{v:.3g} {unit}"

    peak = "" if r["peak_share"] is None else f" = {100 * r['peak_share']:.2f}% of the {si(r['peak_bf16_flop_per_s'], 'FLOP/s')} bf16 peak"
    gpu = "" if r["peak_gpu_mib_e2e"] is None else (f", GPU {r['peak_gpu_mib_bare']:.0f} MiB (bare) / "
                                                    f"{r['peak_gpu_mib_e2e']:.0f} MiB (end to end)")
    return "\n".join([
        f"preset {r['preset']} ({r['params'] / 1e6:.3g} M params, RANDOM weights: a speed test, not a restoration) on "
        f"{r['device']} ({r['device_name']}), cluster {r['cluster']} x{r['workers']}",
        f"  K={r['samples']} {r['sampler']} {r['steps']} steps, compile={r['compile']}, volume {r['shape']} uint16, "
        f"tile {r['tile']} overlap {r['overlap']} batch {r['batch']} (settled {r['batch_settled']}), block {r['block']}",
        f"  bare model   : {si(r['bare_voxels_per_s'], 'voxels/s')} over {r['tiles']} tiles "
        f"(passes {si(r['bare_voxels_per_s_runs'][0], '')}, {si(r['bare_voxels_per_s_runs'][1], '')})",
        f"  end to end   : {si(r['e2e_voxels_per_s'], 'voxels/s')} -> efficiency {r['efficiency']:.3f} "
        f"(tile recompute factor {r['tile_recompute_factor']:.3f}, model busy {r['model_busy_share'] or 0:.2f})",
        f"  network      : {si(r['flop_per_evaluation'], 'FLOP')} per evaluation, {si(r['flop_per_voxel'], 'FLOP')}/voxel, "
        f"achieved {si(r['achieved_flop_per_s'], 'FLOP/s')}{peak}",
        f"  projection   : {r['hours_per_tb']:.3g} h per TB of uint16 (bare model {r['hours_per_tb_bare']:.3g} h)",
        f"  memory       : worker peak RSS {r['peak_rss_mib']:.0f} MiB{gpu}; benchmark took {r['seconds']:.0f} s "
        f"(load average {r['load_average']:.2f})",
    ])
