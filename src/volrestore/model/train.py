"""Training: normalisation, patch sampling from array-likes, the loop (AdamW, cosine LR, EMA), checkpoints."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from volrestore.model import diffusion as dfn
from volrestore.model import nets
from volrestore.model import noise
from volrestore.simulate.degrade import Degradation, crop
from volrestore.blockwise.grid import reflect
from volrestore.errors import UserError

FORMAT = "volrestore-model"
FORMAT_VERSION = 2
# Format 1 (volrestore 0.1): MONAI U-Nets with GroupNorm, whose results depend on the tile; not loadable any more.
OLD_FORMATS = {1: "volrestore 0.1 (MONAI U-Net)"}


# ---- normalisation -----------------------------------------------------------------------------------------------

@dataclass
class Normalisation:
    """Percentiles (0.1, 99.9) of the training input and target mapped to (-1, 1), each with its own affine map (paired
    acquisitions may differ in gain). `clip`: the clamp for x0_hat, the normalised target range seen in training, so
    bright structures above the 99.9th percentile are not cut off as a fixed [-1, 1] would."""

    input: tuple[float, float]
    target: tuple[float, float]
    clip: tuple[float, float] = (-1.0, 1.0)

    @classmethod
    def fit(cls, cond: np.ndarray, target: np.ndarray, pct=(0.1, 99.9)) -> "Normalisation":
        lo_i, hi_i = (float(v) for v in np.percentile(cond, pct))
        lo_t, hi_t = (float(v) for v in np.percentile(target, pct))
        norm = cls((lo_i, max(hi_i, lo_i + 1e-6)), (lo_t, max(hi_t, lo_t + 1e-6)))
        t = norm.target_to_unit(np.array([target.min(), target.max()]))
        norm.clip = (min(-1.0, float(t[0])), max(1.0, float(t[1])))
        return norm

    @staticmethod
    def _fwd(x, lohi):
        return (x - lohi[0]) * (2.0 / (lohi[1] - lohi[0])) - 1.0

    def input_to_unit(self, x):
        return self._fwd(x, self.input)

    def target_to_unit(self, x):
        return self._fwd(x, self.target)

    def unit_to_target(self, y):
        return (y + 1.0) * ((self.target[1] - self.target[0]) / 2.0) + self.target[0]

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalisation":
        return cls(**{k: tuple(float(x) for x in v) for k, v in d.items()})


# ---- patches -----------------------------------------------------------------------------------------------------

class PatchSampler:
    """Random (cond, target) patch batches from array-likes of shape (z, y, x) or (y, x) with numpy slicing (numpy,
    zarr.Array, ...); only the patches' regions (plus the blur halo) are read.

    The last `val_fraction` of the y axis is held out for validation: training patches, and the context read around
    them for blurring, never touch it. Batches depend only on (seed, iteration), so a resumed run sees the same data.
    Augmentation: the 8 lateral dihedral transforms (4 rotations x flip; 2 rotations when y != x), and z flips in 3D.
    2D patches are single z-slices.
    Either `cond` (a registered low-quality image of the same shape) or `degrade` (made from the target) is needed.
    """

    def __init__(self, target, cond=None, *, degrade: Degradation | None = None, patch: tuple[int, ...],
                 batch: int, seed: int = 0, val_fraction: float = 0.1, ref: float | None = None, z_context: int = 0):
        if (cond is None) == (degrade is None):
            raise UserError("give either a paired input image or a degradation model, not both or neither")
        if cond is not None and tuple(cond.shape) != tuple(target.shape):
            raise UserError(f"input shape {tuple(cond.shape)} differs from target shape {tuple(target.shape)}: "
                            "register and crop them to the same grid")
        self.target, self.cond, self.degrade = target, cond, degrade
        self.ndim = len(target.shape)
        self.z_context = int(z_context) if self.ndim == 3 and len(patch) == 2 else 0
        self.patch = tuple(int(p) for p in patch)
        self.spatial_dims = len(self.patch)
        self.full = (1,) * (3 - self.spatial_dims) + self.patch if self.ndim == 3 else self.patch  # z, y, x extent
        self.batch, self.seed = int(batch), int(seed)
        shape = tuple(target.shape)
        if len(self.patch) > self.ndim or self.ndim not in (2, 3):
            raise UserError(f"a {len(self.patch)}D model needs a 3D image, this one has shape {shape}: use a 2D preset")
        if any(p > s for p, s in zip(self.full, shape)):
            raise UserError(f"patch {self.patch} does not fit into the volume of shape {shape}: use a smaller --patch")
        ny = shape[-2]
        self.y_split = ny - int(round(ny * val_fraction)) if val_fraction > 0 else ny
        if self.y_split < self.full[-2] or (val_fraction > 0 and ny - self.y_split < self.full[-2]):
            raise UserError(f"volume y size {ny} is too small for patch y {self.full[-2]} in both the training and "
                            f"the held-out validation region (val fraction {val_fraction}): use a smaller patch")
        # Photon budget reference: fixed for the volume so every patch sees the same noise level.
        self.ref = ref
        if degrade is not None and ref is None:
            self.ref = float(np.percentile(self._sample_voxels(target), 99.9))

    def _sample_voxels(self, arr, n=16):
        rng = np.random.default_rng([self.seed, 7])
        return np.concatenate([np.asarray(arr[self._region(rng, 0, self.y_split)]).ravel() for _ in range(n)])

    def _region(self, rng, y_lo, y_hi):
        starts = [int(rng.integers(0, s - p + 1)) for s, p in zip(self.target.shape, self.full)]
        starts[-2] = int(rng.integers(y_lo, y_hi - self.full[-2] + 1))
        return tuple(slice(a, a + p) for a, p in zip(starts, self.full))

    def _read(self, region, y_lo, y_hi, counter):
        target = np.asarray(self.target[region], dtype=np.float32)
        if self.cond is not None:
            return np.asarray(self.cond[region], dtype=np.float32), target
        # Read the blur context inside [y_lo, y_hi) and the volume; reflect where it would leave them.
        halo = self.degrade.halo(self.ndim)
        bounds = [(0, s) for s in self.target.shape]
        bounds[-2] = (y_lo, y_hi)
        big = tuple(slice(max(r.start - h, lo), min(r.stop + h, hi)) for r, h, (lo, hi) in zip(region, halo, bounds))
        pad = [(h - (r.start - b.start), h - (b.stop - r.stop)) for r, h, b in zip(region, halo, big)]
        clean = np.pad(np.asarray(self.target[big], dtype=np.float32), pad, mode="reflect")
        return crop(self.degrade(clean, counter, self.ref), halo), target

    def _draw(self, rng, y_lo, y_hi, counter, augment):
        region = self._region(rng, y_lo, y_hi)
        if self.z_context:
            # 2.5D: the slice's neighbours come along as condition channels, reflected at the volume's z ends as
            # the engine reflects them; the target stays the centre slice.
            z = region[0].start
            zs = reflect(np.arange(z - self.z_context, z + self.z_context + 1), self.target.shape[0])
            z_lo, z_hi = int(zs.min()), int(zs.max()) + 1
            cond, target = self._read((slice(z_lo, z_hi), *region[1:]), y_lo, y_hi, counter)
            cond, target = cond[zs - z_lo], target[z - z_lo].reshape(self.patch)
        else:
            cond, target = self._read(region, y_lo, y_hi, counter)
            cond, target = cond.reshape(self.patch), target.reshape(self.patch)
        if augment:
            square = self.patch[-1] == self.patch[-2]
            k, flip = int(rng.integers(4)) if square else 2 * int(rng.integers(2)), bool(rng.integers(2))
            cond, target = (np.rot90(a, k, axes=(-2, -1)) for a in (cond, target))
            if flip:
                cond, target = cond[..., ::-1], target[..., ::-1]
            if (self.spatial_dims == 3 or self.z_context) and rng.integers(2):  # z flips: the PSF is symmetric in z
                cond, target = cond[::-1], (target[::-1] if self.spatial_dims == 3 else target)
        return np.ascontiguousarray(cond), np.ascontiguousarray(target)

    def __call__(self, iteration: int, lo: int = 0, hi: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Samples lo..hi (default: all B) of the training batch for `iteration`: (cond, target), float32
        (hi - lo, *patch). A DDP rank takes its slice of the global batch, which is the same whoever reads it."""
        return self._batch(1, iteration, lo, self.batch if hi is None else hi)

    def _batch(self, stream: int, iteration: int, lo: int, hi: int, val: bool = False):
        y_lo, y_hi = (self.y_split, self.target.shape[-2]) if val else (0, self.y_split)
        # One generator per sample, keyed by its index in the global batch, so any slice of the batch can be drawn
        # alone (exact sharding across DDP ranks) and gives the same patches as drawing the whole batch.
        pairs = [self._draw(np.random.default_rng([self.seed, stream, iteration, b]), y_lo, y_hi,
                            (stream, iteration, b), not val) for b in range(lo, hi)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def validation(self, n: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """n fixed patches from the held-out region."""
        if self.y_split == self.target.shape[-2]:
            raise UserError("no validation region: set a validation fraction > 0")
        return self._batch(2, 0, 0, n, val=True)

    def fit_normalisation(self, n_batches: int = 4) -> Normalisation:
        """Percentile normalisation from a few training batches (never the validation region)."""
        batches = [self._batch(3, i, 0, self.batch) for i in range(n_batches)]
        return Normalisation.fit(np.concatenate([b[0].ravel() for b in batches]),
                                 np.concatenate([b[1].ravel() for b in batches]))


# ---- checkpoints -------------------------------------------------------------------------------------------------

def _content_hash(ck: dict) -> str:
    """sha256 over the weights (model and EMA) and all metadata; optimizer state excluded (it does not define the
    model)."""
    h = hashlib.sha256()
    meta = {k: v for k, v in ck.items() if k not in ("model", "ema", "optimizer", "hash")}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for part in ("model", "ema"):
        for name in sorted(ck[part]):
            h.update(name.encode())
            h.update(ck[part][name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path, ck: dict) -> dict:
    """Write `ck` with its format marker and content hash atomically; returns what was written."""
    ck = dict(ck, format=FORMAT, format_version=FORMAT_VERSION)
    ck["hash"] = _content_hash(ck)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ck, tmp)
    os.replace(tmp, path)  # atomic: an interrupted save never leaves a half-written checkpoint
    return ck


def load_checkpoint(path, map_location="cpu") -> dict:
    """A validated checkpoint dict; UserError when missing, not a volrestore model, or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model checkpoint {str(path)!r} not found: give a .pt file written by volrestore train")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:
        raise UserError(f"{path} is not a volrestore model or is corrupt: retrain or re-download it") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise UserError(f"{path} is not a volrestore model checkpoint (no '{FORMAT}' marker)")
    if ck.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer volrestore (format {ck['format_version']}): upgrade")
    if ck.get("format_version") in OLD_FORMATS:
        raise UserError(f"{path} is a format-{ck['format_version']} model of {OLD_FORMATS[ck['format_version']]}, "
                        "whose networks depend on the tile size: retrain it with this volrestore's `volrestore train` "
                        "or restore with volrestore 0.1.x")
    try:
        ok = _content_hash(ck) == ck.get("hash")
    except Exception:
        ok = False
    if not ok:
        raise UserError(f"{path} is corrupt (content hash mismatch): retrain or re-download it")
    return ck


def schedule_of(ck: dict) -> dfn.Schedule:
    return dfn.Schedule.from_dict(ck["schedule"])


def model_from_checkpoint(ck: dict, ema: bool = True) -> nets.ConditionalUNet:
    net = nets.ConditionalUNet(nets.load_preset(ck["preset"]), ck["objective"])
    net.load_state_dict(ck["ema" if ema else "model"])
    return net.eval()


# ---- the loop ----------------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Defaults of None come from the preset's `train:` section (then from the values noted)."""

    preset: str | dict = "tiny-2d"
    objective: str | None = None  # preset's (v)
    iterations: int | None = None
    lr: float | None = None
    weight_decay: float = 0.01  # torch's AdamW default, as the paper used AdamW without stating it
    warmup: int = 100  # linear LR warm-up iterations, then cosine decay to 0
    ema_decay: float | None = None
    checkpoint_every: int = 1000
    seed: int = 0
    schedule: str | None = None  # preset's: "edm" (log-normal sigma) or "cosine" (the paper's, uniform t)
    T: int = 200
    s: float = 0.008

    def noise_schedule(self) -> dfn.Schedule:
        return dfn.Schedule(kind=self.schedule or "edm", T=self.T, s=self.s)

    def resolved(self) -> "TrainConfig":
        preset = nets.load_preset(self.preset)
        t = preset.get("train", {})
        return TrainConfig(**{**asdict(self), "preset": preset,
                              "objective": self.objective or preset["objective"],
                              "schedule": self.schedule or (preset["schedule"] if not self.objective
                                                            or self.objective == preset["objective"]
                                                            else ("edm" if self.objective == "edm" else "cosine")),
                              "iterations": self.iterations or t.get("iterations", 1000),
                              "lr": self.lr or t.get("lr", 2e-4),
                              "ema_decay": self.ema_decay or t.get("ema_decay", 0.999)})


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
          log: Callable[[dict], None] | None = None) -> dict | None:
    """Train and write checkpoints to `out`; returns the final checkpoint dict (None on DDP ranks other than 0).

    `batches(iteration) -> (cond, target)` float32 (B, *spatial) in intensity units. A function of the iteration
    rather than an iterator so that `resume` sees exactly the data a straight run would: together with per-iteration
    seeds for timesteps, noise and dropout, N + M iterations and N, then resume M, give identical weights.
    `resume`: True continues from `out` when it exists, a path continues from that checkpoint.

    Inside an initialised torch.distributed process group the net runs under DistributedDataParallel: rank r's
    `batches` must return samples [r·B, (r+1)·B) of the global batch. Timesteps and noise are keyed by each sample's
    global index, and DDP averages the ranks' mean-loss gradients, so N ranks of batch B follow 1 rank of batch N·B up
    to all-reduce rounding (dropout masks, when the preset has dropout, are the one thing that differs). Only rank 0
    validates, logs and writes checkpoints; the logged loss is the all-reduced global mean.
    """
    import torch.distributed as dist

    cfg = config.resolved()
    ddp = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    schedule = cfg.noise_schedule()
    with torch.random.fork_rng(devices=[]):  # initial weights from the seed, not from the caller's RNG state
        torch.manual_seed(_seed(cfg.seed, 0))
        net = nets.ConditionalUNet(cfg.preset, cfg.objective).to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, history = 0, []
    source = out if resume is True else resume
    if source and Path(source).exists():
        ck = load_checkpoint(source, map_location=device)
        check_resumable(ck, cfg, source)
        net.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        normalisation = Normalisation.from_dict(ck["normalisation"])
        start, history = ck["iteration"], ck.get("history", [])
    # `net` keeps the plain module (its state_dict has no "module." prefix); `model` is what runs forward.
    model = net
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[torch.device(device).index or 0]
                                        if device.startswith("cuda") else None)

    def checkpoint(it):
        ck = {"preset": cfg.preset, "objective": cfg.objective, "schedule": schedule.to_dict(),
              "normalisation": normalisation.to_dict(), "provenance": provenance or {}, "iteration": it,
              "train_config": {k: v for k, v in asdict(cfg).items() if k != "preset"}, "history": history,
              "model": net.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict()}
        return save_checkpoint(out, ck)

    ck, t0 = None, time.perf_counter()
    net.train()
    for it in range(start, cfg.iterations):
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, it)
        cond, target = batches(it)
        cond = torch.from_numpy(_channels(normalisation.input_to_unit(cond), target)).float().to(device)
        x0 = torch.from_numpy(normalisation.target_to_unit(target)[:, None]).float().to(device)
        first = rank * x0.shape[0]  # global index of this rank's first sample
        sigma, eps = _sigmas_and_noise(schedule, cfg.seed, it, range(first, first + x0.shape[0]),
                                       tuple(x0.shape[1:]))
        with torch.random.fork_rng(devices=[device] if device.startswith("cuda") else []):
            torch.manual_seed(_seed(cfg.seed, it, _DROPOUT))  # dropout, per iteration so resume replays it
            loss = dfn.loss(model, x0, cond, schedule, cfg.objective, sigma, eps.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay = min(cfg.ema_decay, (1 + it) / (10 + it))  # short runs: let EMA follow early weights
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - decay)
        loss = loss.detach()
        if ddp:
            dist.all_reduce(loss)  # the global batch's mean loss, as one rank with the whole batch would log
            loss /= world
        if rank != 0:
            continue
        done = it + 1
        record = {"iteration": done, "loss": loss.item(), "lr": _lr(cfg, it),
                  "it_per_s": (done - start) / (time.perf_counter() - t0)}
        if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
            if val is not None:
                record["val_psnr"] = validate(ema, schedule, normalisation, *val, seed=cfg.seed)
            history.append(record)
            ck = checkpoint(done)
        if log:
            log(record)
    if rank != 0:
        return None
    return ck if ck is not None else load_checkpoint(out)


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
    mine = {"preset": config.preset, "objective": config.objective, "schedule": config.noise_schedule().to_dict()}
    theirs = {k: ck[k] for k in mine}
    if json.dumps(mine, sort_keys=True) != json.dumps(theirs, sort_keys=True):
        raise UserError(f"cannot resume {where}: it was trained with a different preset, objective or schedule")


def validate(net, schedule, norm: Normalisation, cond: np.ndarray, target: np.ndarray, seed: int = 0,
             steps: int = 10) -> float:
    """PSNR (dB, over the target's 0.1-99.9 percentile range) of one DPM-Solver++ sample (regression: one pass)."""
    restored = predict(net, schedule, norm, cond, seed=seed, steps=steps)
    rng = norm.target[1] - norm.target[0]
    return float(10 * np.log10(rng**2 / np.mean((restored - target) ** 2)))


@torch.no_grad()
def predict(net, schedule, norm: Normalisation, cond: np.ndarray, *, seed: int = 0, sampler: str = "dpmpp2m",
            steps: int = 10, sample: int = 0, noise_fn=None) -> np.ndarray:
    """One restoration of a batch (B, *spatial) in intensity units; noise keyed by (seed, sample, batch index, step)
    unless noise_fn is given."""
    device = next(net.parameters()).device
    c = np.asarray(norm.input_to_unit(np.asarray(cond, np.float32)))
    c = torch.from_numpy(c[:, None] if c.ndim == net.spatial_dims + 1 else c).float().to(device)
    D = dfn.Denoiser(net, schedule, net.objective, clip=norm.clip)
    if net.objective == "regression":
        y = D(None, 0.0, c)
    else:
        nf = noise_fn or (lambda step, shp: torch.from_numpy(np.stack(
            [noise.normal(shp[1:], seed, sample, b, step) for b in range(shp[0])])).to(device))
        y = dfn.sample(D, c, schedule, nf, sampler, steps)
    return norm.unit_to_target(y[:, 0].float().cpu().numpy())
