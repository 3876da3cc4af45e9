"""The training loop: AdamW, cosine LR with warm-up, EMA, per-iteration seeds (exact resume), DDP, validation."""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from volrestore.model import diffusion as dfn
from volrestore.model import nets
from volrestore.model import noise
from volrestore.model.checkpoint import Normalisation, load_checkpoint, save_checkpoint
from volrestore.config import TrainConfig
from volrestore.errors import UserError
from volrestore.evaluation.metrics import psnr_from_mse


# ---- the loop ----------------------------------------------------------------------------------------------------

def resolve_config(config: TrainConfig) -> TrainConfig:
    """The config with its preset loaded and every default taken from the preset's `train:` section."""
    preset = nets.load_preset(config.preset)
    t = preset.get("train", {})
    if not config.objective or config.objective == preset["objective"]:
        schedule = config.schedule or preset["schedule"]
    else:  # another objective than the preset's: its natural schedule
        schedule = config.schedule or ("edm" if config.objective == "edm" else "cosine")
    return config.model_copy(update={
        "preset": preset, "objective": config.objective or preset["objective"], "schedule": schedule,
        "iterations": config.iterations or t.get("iterations", 1000), "lr": config.lr or t.get("lr", 2e-4),
        "ema_decay": config.ema_decay or t.get("ema_decay", 0.999)})


def noise_schedule(config: TrainConfig) -> dfn.Schedule:
    """The config's noise schedule (edm or the paper's cosine)."""
    return dfn.Schedule(kind=config.schedule or "edm", T=config.T, s=config.s)


def _lr(cfg: TrainConfig, it: int) -> float:
    if it < cfg.warmup:
        return cfg.lr * (it + 1) / cfg.warmup
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (it - cfg.warmup) / max(1, cfg.iterations - cfg.warmup)))


def _seed(*ints) -> int:
    return int(noise.key(*ints)[0] % (2**63))


# Counter tags that keep the per-iteration random streams apart (noise.key also hashes the counter's length).
_DROPOUT, _SAMPLE = 1, 2


def train(batches: Callable[[int], tuple[np.ndarray, np.ndarray]], out, config: TrainConfig,
          normalisation: Normalisation, *, provenance: dict | None = None, resume: bool | str | Path = False,
          val: tuple[np.ndarray, np.ndarray] | None = None, device: str = "cpu",
          log: Callable[[dict], None] | None = None, init: str | Path | None = None) -> dict | None:
    """Train and write checkpoints to `out`; returns the final checkpoint dict (None on DDP ranks other than 0).

    `batches(iteration) -> (cond, target)` float32 (B, *spatial) in intensity units, plus photons (B,) at the
    reference intensity when `config.condition` is "photons" (`val` likewise). A function of the iteration
    rather than an iterator so that `resume` sees exactly the data a straight run would: together with per-iteration
    seeds for timesteps, noise and dropout, N + M iterations and N, then resume M, give identical weights.
    `resume`: True continues from `out` when it exists, a path continues from that checkpoint.
    `init`: a checkpoint whose EMA weights a fresh run starts from (fine-tuning); `config.init` must be its hash.

    Inside an initialised torch.distributed process group the net runs under DistributedDataParallel: rank r's
    `batches` must return samples [r·B, (r+1)·B) of the global batch. Timesteps and noise are keyed by each sample's
    global index, and DDP averages the ranks' mean-loss gradients, so N ranks of batch B follow 1 rank of batch N·B up
    to all-reduce rounding (dropout masks, when the preset has dropout, are the one thing that differs). Only rank 0
    validates, logs and writes checkpoints; the logged loss is the all-reduced global mean.
    """
    import torch.distributed as dist

    cfg = resolve_config(config)
    if cfg.condition == "photons" and cfg.objective != "regression":
        raise UserError("conditioning on the noise level is built for the regression objective: add --objective "
                        "regression")
    ddp = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    schedule = noise_schedule(cfg)
    state = _TrainState.begin(cfg, normalisation, out if resume is True else resume, device, init)
    # `state.net` keeps the plain module (its state_dict has no "module." prefix); `model` is what runs forward.
    model = state.net
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(state.net, device_ids=[torch.device(device).index or 0]
                                        if device.startswith("cuda") else None)
    ck, t0 = None, time.perf_counter()
    state.net.train()
    for it in range(state.start, cfg.iterations):
        loss = _step(state, model, cfg, schedule, batches(it), it, rank, device)
        if ddp:
            dist.all_reduce(loss)  # the global batch's mean loss, as one rank with the whole batch would log
            loss /= world
        if rank != 0:
            continue
        done = it + 1
        record = {"iteration": done, "loss": loss.item(), "lr": _lr(cfg, it),
                  "it_per_s": (done - state.start) / (time.perf_counter() - t0)}
        if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
            if val is not None:
                record["val_psnr"] = validate(state.ema, schedule, state.normalisation, *val[:2], seed=cfg.seed,
                                              photons=_photons(cfg, val))
            state.history.append(record)
            ck = save_checkpoint(out, state.checkpoint(cfg, schedule, provenance, done))
        if log:
            log(record)
    if rank != 0:
        return None
    return ck if ck is not None else load_checkpoint(out)


@dataclass
class _TrainState:
    """The weights, their EMA, the optimizer, the normalisation and the history of one training run."""

    net: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    normalisation: Normalisation
    start: int
    history: list

    @classmethod
    def begin(cls, cfg: TrainConfig, normalisation: Normalisation, source, device: str,
              init=None) -> "_TrainState":
        """Fresh weights from the seed, or the state of the checkpoint `source` when it exists (resume), else the EMA
        weights of the model `init` (fine-tuning: its optimizer state is not taken, Adam's moments start afresh; a
        diffusion model initialising a regression run gives its weights less the noisy sample's input, see
        nets.student_weights)."""
        with torch.random.fork_rng(devices=[]):  # initial weights from the seed, not from the caller's RNG state
            torch.manual_seed(_seed(cfg.seed, 0))
            net = nets.ConditionalUNet(cfg.preset, cfg.objective).to(device)
        ema = copy.deepcopy(net).eval().requires_grad_(False)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        state = cls(net, ema, opt, normalisation, 0, [])
        if source and Path(source).exists():
            ck = load_checkpoint(source, map_location=device)
            check_resumable(ck, cfg, source)
            net.load_state_dict(ck["model"])
            ema.load_state_dict(ck["ema"])
            if "optimizer" in ck:  # shipped checkpoints have none: continuing one starts Adam's moments afresh
                opt.load_state_dict(ck["optimizer"])
            state.normalisation = Normalisation.from_dict(ck["normalisation"])
            state.start, state.history = ck["iteration"], ck.get("history", [])
        elif init is not None:
            ck = load_checkpoint(init, map_location=device)
            if ck["hash"] != cfg.init:
                raise UserError(f"--init model {init} is not the one this run was started from (hash differs): "
                                "start again with --overwrite")
            weights = ck["ema"]  # the EMA weights are the model that restores
            if ck["objective"] != cfg.objective:  # a diffusion teacher starts its regression student (distill)
                weights = nets.student_weights(weights, cfg.preset)
            net.load_state_dict(weights)
            ema.load_state_dict(weights)
        return state

    def checkpoint(self, cfg: TrainConfig, schedule: dfn.Schedule, provenance, iteration: int) -> dict:
        return {"preset": cfg.preset, "objective": cfg.objective, "schedule": schedule.to_dict(),
                "normalisation": self.normalisation.to_dict(), "provenance": provenance or {}, "iteration": iteration,
                "condition": cfg.condition,
                "train_config": cfg.model_dump(exclude={"preset"}), "history": self.history,
                "model": self.net.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict()}


def _step(state: _TrainState, model, cfg: TrainConfig, schedule, batch, it: int, rank: int, device: str):
    """One optimizer step on iteration `it`'s batch; the (detached) mean loss of this rank."""
    for group in state.opt.param_groups:
        group["lr"] = _lr(cfg, it)
    cond, target = batch[:2]
    photons = _photons(cfg, batch)
    norm = state.normalisation
    cond = torch.from_numpy(_channels(norm.input_to_unit(cond), target)).float().to(device)
    x0 = torch.from_numpy(norm.target_to_unit(target)[:, None]).float().to(device)
    first = rank * x0.shape[0]  # global index of this rank's first sample
    sigma, eps = _sigmas_and_noise(schedule, cfg.seed, it, range(first, first + x0.shape[0]), tuple(x0.shape[1:]))
    with torch.random.fork_rng(devices=[device] if device.startswith("cuda") else []):
        torch.manual_seed(_seed(cfg.seed, it, _DROPOUT))  # dropout, per iteration so resume replays it
        # The centre channel is the slice being restored (a 2.5D condition carries its neighbours around it).
        weight = dfn.balance_weights(cond[:, cond.shape[1] // 2: cond.shape[1] // 2 + 1], x0, cfg.noise_balance)
        loss = dfn.loss(model, x0, cond, schedule, cfg.objective, sigma, eps.to(device), weight, photons)
    state.opt.zero_grad(set_to_none=True)
    loss.backward()
    state.opt.step()
    decay = min(cfg.ema_decay, (1 + it) / (10 + it))  # short runs: let EMA follow early weights
    with torch.no_grad():
        for pe, p in zip(state.ema.parameters(), state.net.parameters()):
            pe.lerp_(p, 1 - decay)
    return loss.detach()


def _photons(cfg: TrainConfig, batch) -> np.ndarray | None:
    """The batch's per-sample photons for a noise-conditioned run (None for a blind one)."""
    if cfg.condition != "photons":
        return None
    if len(batch) < 3:
        raise UserError("a model conditioned on the noise level needs each patch's photons: batches must give "
                        "(cond, target, photons)")
    return np.asarray(batch[2], np.float64)


def _channels(cond: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(B, C, *spatial): a plain condition gets its channel axis; a 2.5D one already has its slices there."""
    return cond[:, None] if cond.ndim == target.ndim else cond


def _sigmas_and_noise(schedule: dfn.Schedule, seed: int, it: int, samples: range,
                      shape: tuple) -> tuple[torch.Tensor, ...]:
    """sigma (B,) float64 and noise (B, *shape), each sample's from its own generator keyed by (seed, iteration,
    global sample index): the numbers a sample gets never depend on the batch size or on which DDP rank holds it."""
    sigma, eps = [], []
    for j in samples:
        g = torch.Generator().manual_seed(_seed(seed, it, _SAMPLE, j))
        sigma.append(schedule.train_sigmas(g, 1))
        eps.append(torch.randn(shape, generator=g))
    return torch.cat(sigma), torch.stack(eps)


def check_resumable(ck: dict, config: TrainConfig, where) -> None:
    """UserError unless checkpoint `ck` was trained with the (resolved) config's preset, objective and schedule."""
    mine = {"preset": config.preset, "objective": config.objective, "schedule": noise_schedule(config).to_dict()}
    theirs = {k: ck[k] for k in mine}
    if json.dumps(mine, sort_keys=True) != json.dumps(theirs, sort_keys=True):
        raise UserError(f"cannot resume {where}: it was trained with a different preset, objective or schedule")


def validate(net, schedule, norm: Normalisation, cond: np.ndarray, target: np.ndarray, seed: int = 0,
             steps: int = 10, photons=None) -> float:
    """PSNR (dB, over the target's 0.1-99.9 percentile range) of one DPM-Solver++ sample (regression: one pass)."""
    restored = predict(net, schedule, norm, cond, seed=seed, steps=steps, photons=photons)
    return psnr_from_mse(float(np.mean((restored - target) ** 2)), data_range=norm.target[1] - norm.target[0])


@torch.no_grad()
def predict(net, schedule, norm: Normalisation, cond: np.ndarray, *, seed: int = 0, sampler: str = "dpmpp2m",
            steps: int = 10, sample: int = 0, noise_fn=None, photons=None) -> np.ndarray:
    """One restoration of a batch (B, *spatial) in intensity units; noise keyed by (seed, sample, batch index, step)
    unless noise_fn is given; `photons` (scalar or (B,)) for a regression net conditioned on the noise level."""
    device = next(net.parameters()).device
    c = np.asarray(norm.input_to_unit(np.asarray(cond, np.float32)))
    c = torch.from_numpy(c[:, None] if c.ndim == net.spatial_dims + 1 else c).float().to(device)
    D = dfn.Denoiser(net, schedule, net.objective, clip=norm.clip, photons=photons)
    if net.objective == "regression":
        y = D(None, 0.0, c)
    else:
        nf = noise_fn or (lambda step, shp: torch.from_numpy(np.stack(
            [noise.normal(shp[1:], seed, sample, b, step) for b in range(shp[0])])).to(device))
        y = dfn.sample(D, c, schedule, nf, sampler, steps)
    return norm.unit_to_target(y[:, 0].float().cpu().numpy())
