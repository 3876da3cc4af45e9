"""The diffusion model as a Restorer: load a checkpoint once per worker, restore tiles as the mean (and std) of K
samples."""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from volrestore.model import diffusion as dfn
from volrestore.model.blend import LATERAL, N_WEIGHTS, blend, has_planes, z_averaged
from volrestore.model import nets
from volrestore.model import noise
from volrestore.errors import UserError
from volrestore.cluster.client import deterministic_cuda, pin_torch_threads
from volrestore.config import ModelRef
from volrestore.model.restorer import RestorerSpec
from volrestore.model.checkpoint import Normalisation, load_checkpoint, model_from_checkpoint, schedule_of

OPTIONS = {"samples": 1, "sampler": None, "steps": None, "std": False, "normalise": None, "input_range": None,
           "noise": None, "tta": 1}
# Only for a model conditioned on the noise level (checkpoint "condition": "photons"): photons at the image's bright
# (normalisation) intensity, given by the user or measured by the engine (blockwise.plan); blind models record none.
PHOTONS = "photons"
# Only for one-pass (regression) models: the weights of the input and its smoothed copies added to the restoration
# (model.blend), chosen by the engine with SURE on sampled tiles unless given (blockwise.sure); recorded.
BLEND = "blend"
# Only with std (K >= 2 samples of a diffusion model): (factor, floor) that make the samples' spread s the estimated
# error of their mean, std = sqrt((factor s)² + floor²), fitted by the engine with SURE on sampled tiles unless given
# (blockwise.sure.std_scale); recorded. "off" (1, 0) writes the raw spread.
STD_SCALE = "std_scale"
# Options that change how the model runs, not what it computes: not recorded, never block --resume.
EXTRAS = {"device": "auto", "compile": False}
# normalise="model": the checkpoint's own percentile maps (the model was trained on data in these units);
# "image" (the shipped default model's choice): the image's (background, bright) intensities (`input_range`, measured
# by the engine: median, and 99.9th percentile after light smoothing) are matched affinely to the training target's
# 0.1/99.9 percentiles, the model runs in its training units, and the result is mapped back, so any camera gain or
# offset works. Matching the raw noisy percentiles instead lost 20 dB on the demo volume: noise inflates the tails.


# The shipped pair, trained by benchmarks/train_default_model.py on the same data and net: `default` restores with the
# regression (the posterior mean in one network evaluation: on held-out real data 0.3-0.8 dB above the diffusion
# model's K = 4 average, src/volrestore/models/README.md) unless a diffusion option asks for samples.
SHIPPED = {"default-diffusion": "default-diffusion.pt", "default-regression": "default-regression.pt"}
DIFFUSION_OPTIONS = ("samples", "sampler", "steps", "std")


def default_model_path(kind: str = "diffusion") -> Path:
    """Where a shipped model ("diffusion" or "regression") lies inside the package."""
    return _shipped_path(f"default-{kind}")


def _shipped_path(name: str) -> Path:
    return Path(str(resources.files("volrestore").joinpath("models", SHIPPED[name])))


def shipped_name(name: str, options: dict) -> str:
    """`default` -> default-diffusion when any of DIFFUSION_OPTIONS is given (K samples, their std, a sampler),
    else default-regression (when this install ships it); other names unchanged."""
    if name != "default":
        return name
    wants_samples = any(options.get(k) not in (None, False) for k in DIFFUSION_OPTIONS)
    if wants_samples or not default_model_path("regression").is_file():
        return "default-diffusion"
    return "default-regression"


def model_path(name: str) -> Path:
    """The checkpoint file a model name means: a shipped model's inside the package, else the path itself;
    UserError when there is none."""
    shipped = name in SHIPPED
    path = _shipped_path(name) if shipped else Path(name)
    if not path.is_file():
        raise UserError(f"model {name!r} not found" + (": this install ships no default model, pass --model CKPT.pt"
                                                       if shipped else ": give an existing .pt checkpoint"))
    return path


def own_normalise(name: str, ck: dict) -> str:
    """How checkpoint `ck` (of model `name`) maps intensities when not told: a checkpoint may name its own
    normalisation (the shipped model says "image"), so a copy of it given by path restores as `--model default` does;
    older checkpoints: "image" for the shipped ones, else "model"."""
    return ck.get("normalise") or ("image" if name in SHIPPED else "model")


def default_sampler(ck: dict) -> str:
    """The default sampler of a checkpoint (sampler_for its schedule kind)."""
    return sampler_for(ck["schedule"].get("kind"))


def sampler_for(schedule_kind: str | None) -> str:
    """The paper's cosine/eps models: its 200-step ancestral sampler; EDM-trained models: DDIM (10 steps), the
    cheapest that matched 200 ancestral steps on benchmarks/sampler_study.py (K = 4: +0.14 dB, SSIM -0.003;
    DPM-Solver++ 2M, the earlier default, was 0.3 dB and 0.02 SSIM below it at 10-20 steps)."""
    return "ancestral" if schedule_kind == "cosine" else "ddim"


def default_steps(sampler: str, schedule: dfn.Schedule) -> int:
    """ancestral: all T steps of the paper's cosine schedule (or 200 Karras levels); the ODE solvers: few, measured in
    benchmarks/sampler_study.py (DDIM on EDM models: 10)."""
    if sampler == "ancestral":
        return schedule.T
    if sampler == "ddim":
        return 10 if schedule.kind == "edm" else 20
    return {"heun": 8}.get(sampler, 12)


def _check(objective: str, samples, sampler, steps, std):
    if sampler not in dfn.SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}: use one of {', '.join(dfn.SAMPLERS)}")
    whole = [isinstance(v, int) and v >= 1 for v in (samples, 1 if steps is None else steps)]
    if not all(whole):
        raise UserError(f"samples and steps must be whole numbers >= 1, got samples={samples!r}, steps={steps!r}")
    if std and objective == "regression":
        raise UserError("a regression model gives one deterministic answer and no std: drop --std or use a diffusion "
                        "model (--model default-diffusion for the shipped one)")
    if std and samples < 2:
        raise UserError("std needs samples >= 2, e.g. --samples 4 --std")


def resolve(ref: ModelRef) -> RestorerSpec:
    """Validate a checkpoint ('default' or a .pt path) and options on the client; the spec carries the content hash so
    a worker refuses a file that changed in between, and provenance names the exact model."""
    options = {k: v for k, v in ref.options.items() if v is not None}
    name = shipped_name(ref.name, options)
    unknown = sorted(set(options) - set(OPTIONS) - set(EXTRAS) - {PHOTONS, BLEND, STD_SCALE})
    if unknown:
        raise UserError(f"model {name} does not take option {unknown[0]!r}; it takes {', '.join([*OPTIONS, *EXTRAS])}")
    opts = {**OPTIONS, **{k: v for k, v in options.items() if k in OPTIONS}}
    extras = {**EXTRAS, **{k: v for k, v in options.items() if k in EXTRAS}}
    # absolute: workers of a batch cluster run elsewhere, and --resume from another folder names the same model
    path = model_path(name).resolve()
    ck = load_checkpoint(path)
    opts["normalise"] = opts["normalise"] or own_normalise(name, ck)
    if opts["normalise"] not in ("image", "model"):
        raise UserError(f"--normalise must be image or model, got {opts['normalise']!r}")
    if opts["input_range"] is not None:
        opts["input_range"] = tuple(float(v) for v in opts["input_range"])
    conditioned = ck.get("condition", "none") == "photons"
    if conditioned:
        opts[PHOTONS] = _photons(options.get(PHOTONS))
    elif options.get(PHOTONS) is not None:
        raise UserError(f"model {name} is blind to the noise level (it finds it in the image): drop --photons")
    if ck["objective"] == "regression":
        opts[BLEND] = _blend(options.get(BLEND))
    elif options.get(BLEND) not in (None, 0, 0.0, "0", "off") and not (
            isinstance(options.get(BLEND), (list, tuple)) and not any(options[BLEND])):
        raise UserError(f"--blend is for one-pass (regression) models; model {name} samples a diffusion model")
    opts["sampler"] = opts["sampler"] or default_sampler(ck)
    opts["noise"] = _noise_scheme(opts["noise"], extras["device"])
    _check(ck["objective"], opts["samples"], opts["sampler"], opts["steps"], opts["std"])
    if opts["std"]:
        opts[STD_SCALE] = _std_scale(options.get(STD_SCALE))
    elif options.get(STD_SCALE) is not None:
        raise UserError("--std-scale scales the std of the samples: add --std (and --samples K >= 2), or drop it")
    spatial_dims = int(ck["preset"]["spatial_dims"])
    _tta_transforms(opts["tta"], spatial_dims, int(ck["preset"].get("z_context", 0)))
    tile, overlap = DEFAULT_TILE[spatial_dims]
    return RestorerSpec(
        name=str(path),
        restorer=DiffusionRestorer,
        options=tuple(sorted({**opts, "model_hash": ck["hash"]}.items())),
        extras=tuple(sorted({**extras, "checkpoint_path": str(path)}.items())),
        spatial_dims=spatial_dims,
        size_multiple=nets.size_multiple(ck["preset"]),
        z_context=int(ck["preset"].get("z_context", 0)),
        outputs=("mean", "std") if opts["std"] else ("mean",),
        default_tile=tile,
        default_overlap=overlap,
    )


def _photons(value) -> float | None:
    if value is None:
        return None  # the engine measures it on the image
    try:
        photons = float(value)
    except (TypeError, ValueError):
        photons = float("nan")
    if not photons > 0 or math.isinf(photons):
        raise UserError(f"--photons must be a positive number (photons at the image's bright intensity), got {value!r}")
    return photons


def _std_scale(value) -> tuple[float, float] | None:
    """--std-scale as (factor, floor), std = sqrt((factor · spread)² + floor²): None (auto: the engine fits both on
    the image), off (1, 0: the raw spread), a factor, or both (as recorded; "FACTOR,FLOOR" on the command line)."""
    if value is None or value == "auto":
        return None
    if value == "off":
        return (1.0, 0.0)
    parts = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    try:
        pair = tuple(float(v) for v in parts) + ((0.0,) if len(parts) == 1 else ())
    except (TypeError, ValueError):
        pair = ()
    if len(pair) != 2 or not (pair[0] >= 0 and pair[1] >= 0 and any(pair)) or not all(map(math.isfinite, pair)):
        raise UserError(f"--std-scale must be auto, off, a positive factor or FACTOR,FLOOR (>= 0, not both 0), got "
                        f"{value!r}")
    return pair


def _blend(value) -> tuple[float, ...] | None:
    """--blend as the model.blend weights: None (auto: the engine chooses them), off, a share of the input in
    [0, 1], or all N_WEIGHTS weights (as recorded)."""
    if value is None or value == "auto":
        return None
    if value == "off":
        return (0.0,) * N_WEIGHTS
    if isinstance(value, (list, tuple)):
        weights = tuple(float(v) for v in value)
        if len(weights) == N_WEIGHTS and all(math.isfinite(v) for v in weights):
            return weights
        raise UserError(f"blend weights must be {N_WEIGHTS} finite numbers, got {value!r}")
    try:
        share = float(value)
    except (TypeError, ValueError):
        share = float("nan")
    if not 0.0 <= share <= 1.0:
        raise UserError(f"--blend must be auto, off or a share of the input between 0 and 1, got {value!r}")
    return (share,) + (0.0,) * (N_WEIGHTS - 1)


def _tta_transforms(count, spatial_dims: int, z_context: int) -> list:
    """The test-time transforms of `--tta count` (diffusion.symmetries): z flips exist for 3D and 2.5D nets only."""
    try:
        return dfn.symmetries(count, has_z=spatial_dims == 3 or z_context > 0)
    except ValueError as err:
        kind = "2.5D" if spatial_dims == 2 and z_context else f"{spatial_dims}D"
        raise UserError(f"--tta {count}: {err} for this {kind} model (8 lateral flips and turns"
                        f"{', x2 with z flips' if spatial_dims == 3 or z_context else ''})") from None


def _noise_scheme(choice, device: str) -> str:
    """The noise field's scheme (a result-defining option, so provenance names it): asked for (cells | voxel or a
    scheme's full name), else the one drawn where the network runs: numpy cells on a CPU, where they are 1.4-13x
    faster than the torch generator (benchmarks/README.md), Philox per voxel on a GPU."""
    if choice is None:
        on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        return noise.DEVICE_SCHEME if on_gpu else noise.SCHEME
    if choice not in noise.SCHEMES:
        raise UserError(f"noise must be cells or voxel (or {noise.SCHEME} / {noise.DEVICE_SCHEME}), got {choice!r}")
    return noise.SCHEMES[choice]


# Default tiles, chosen for throughput: the magnitude-preserving U-Net has no statistics over space, so a voxel's
# result depends only on its receptive field and tile size no longer changes quality (tests/test_tiling.py). The
# overlap covers the part of the receptive field that matters (the zero-padded tile edge); both are multiples of the
# net's size multiple so every tile starts on the same pooling phase of the global grid.
DEFAULT_TILE = {2: ((512, 512), 32), 3: ((64, 64, 64), 16)}


class DiffusionRestorer:
    """K samples per tile from the conditional model (DDPM-avg): returns their mean and, with std, their per-voxel
    standard deviation, in the training target's intensity units (equal to the input's for pairs made by degrade).

    steps=None: the sampler's default (`default_steps`).
    Regression checkpoints run one pass and ignore samples/sampler/steps.
    """

    def __init__(self, checkpoint_path, samples: int = 1, sampler: str | None = None, steps: int | None = None,
                 std: bool = False, device: str = "cpu", compile: bool = False, model_hash: str | None = None,
                 normalise: str = "model", input_range=None, noise: str = noise.SCHEME, tta: int = 1,
                 photons: float | None = None, blend=None, std_scale=None):
        ck = load_checkpoint(checkpoint_path)
        if model_hash is not None and ck["hash"] != model_hash:
            raise UserError(f"model {checkpoint_path} changed since the run was planned (hash differs): restart it")
        self.objective = ck["objective"]
        sampler = sampler or default_sampler(ck)
        _check(self.objective, samples, sampler, steps, std)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            pin_torch_threads()
        else:
            deterministic_cuda()
        self.device = torch.device(device)
        self.net = model_from_checkpoint(ck).to(self.device)
        self.spatial_dims, self.size_multiple = self.net.spatial_dims, self.net.size_multiple
        self.z_context = self.net.z_context
        self.schedule = schedule_of(ck)
        self.norm = Normalisation.from_dict(ck["normalisation"])
        self.gain, self.offset = 1.0, 0.0  # image units = gain · training units + offset
        if normalise == "image":
            if input_range is None:
                raise ValueError("normalise='image' needs the image's input_range (the engine measures it)")
            lo, hi = input_range
            t_lo, t_hi = self.norm.target
            self.gain = (hi - lo) / (t_hi - t_lo) if hi > lo else 1.0
            self.offset = lo - self.gain * t_lo
        if ck.get("condition", "none") == "photons" and photons is None:
            raise ValueError("a model conditioned on the noise level needs photons (the engine measures them)")
        # None here (a library caller) blends nothing; the engine always passes the weights it chose (blockwise.sure)
        self.blend = tuple(float(w) for w in blend) if blend is not None else (0.0,) * N_WEIGHTS
        # None here (a library caller) writes the raw spread; the engine passes the (factor, floor) it fitted or was given
        self.std_scale = (1.0, 0.0) if std_scale is None else tuple(float(v) for v in std_scale)
        self.hash = ck["hash"]
        self.regression = self.objective == "regression"
        self.samples = 1 if self.regression else samples
        self.sampler = sampler
        self.steps = steps or default_steps(sampler, self.schedule)
        self.outputs = ("mean", "std") if std else ("mean",)
        self.noise_scheme = _noise_scheme(noise, device)
        # bf16 autocast for the network only on CUDA; the sampler's state and arithmetic stay fp32.
        net = torch.compile(self.net) if compile else self.net  # recompiles per tile shape: keep tiles fixed
        self.denoiser = self.network_eval = dfn.Denoiser(net, self.schedule, self.objective, self.norm.clip,
                                                         autocast=self.device.type == "cuda", photons=photons)
        if tta > 1:  # --tta: every network evaluation averaged over flips and turns (tta evaluations each)
            z_dim = 1 if self.z_context else 2  # a 2.5D net's z is its condition channels; a 3D net's, spatial z
            self.denoiser = dfn.SymmetrisedDenoiser(self.denoiser, _tta_transforms(tta, self.spatial_dims,
                                                                                   self.z_context), z_dim)

    @torch.inference_mode()
    def forward_bytes(self, spatial: tuple[int, ...]) -> float:
        """Peak bytes one network evaluation of one sample allocates on a tile of `spatial` size (the restorer's
        axes; a 2D model's leading 1 is dropped): model.memory scales it to the real tile, samples and batch."""
        from volrestore.model import memory

        spatial = tuple(spatial)[-self.spatial_dims:]
        cond = torch.zeros((1, 1 + 2 * self.z_context, *spatial), device=self.device)
        x = None if self.regression else torch.zeros((1, 1, *spatial), device=self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.network_eval(x, 1.0, cond)
            return float(torch.cuda.max_memory_allocated(self.device) - before)
        with memory.LiveBytes() as meter:
            self.network_eval(x, 1.0, cond)
        return float(meter.peak)

    @torch.inference_mode()
    def __call__(self, tiles: np.ndarray, origins: list[tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
        c = self.z_context
        if c and tiles.ndim == self.spatial_dims + 1:  # a 2D image has no neighbouring slices: repeat the one
            tiles = np.repeat(np.asarray(tiles)[:, None], 1 + 2 * c, axis=1)
        if c and (tiles.ndim != 4 or tiles.shape[1] != 1 + 2 * c):
            raise ValueError(f"tiles {tiles.shape}: a 2.5D model needs (B, {1 + 2 * c}, Y, X)")
        spatial = tiles.shape[2:] if c else tiles.shape[1:]
        if len(spatial) != self.spatial_dims or any(s % self.size_multiple for s in spatial):
            raise ValueError(f"tiles {tiles.shape}: need (B, *spatial) with {self.spatial_dims} spatial sizes, each a "
                             f"multiple of {self.size_multiple}")
        unit = self.norm.input_to_unit((np.asarray(tiles, np.float64) - self.offset) / self.gain)
        if not c:
            unit = unit[:, None]  # (B, 1, *spatial): the condition's channel
        n, k = tiles.shape[0], self.samples
        # All tiles of the call with their K samples as one batch (tile-major), so a GPU sees B·K samples per forward.
        # A sample's float result depends on the batch's size but not on the other samples' values, and the engine
        # always calls with exactly --batch tiles: a tile's output does not depend on which tiles share its call.
        host = torch.from_numpy(unit).float()
        if self.device.type == "cuda":  # page-locked, so the copy is one DMA that does not stage through pageable memory
            host = host.pin_memory()
        cond = host.to(self.device, non_blocking=True).repeat_interleave(k, dim=0)
        if self.regression:
            x = self.denoiser(None, 0.0, cond)
        else:
            # One global field per (sample, step): overlapping tiles draw the same noise at a shared voxel.
            box = (1,) * (len(origins[0]) - self.spatial_dims) + tuple(spatial)

            def noise_fn(step, shape):
                if self.noise_scheme == noise.DEVICE_SCHEME:  # drawn on the network's device: nothing to copy
                    return torch.stack([noise.field_torch(origin, box, seed, sample, step, device=self.device)
                                        .reshape(shape[2:]) for origin in origins for sample in range(k)])[:, None]
                z = np.stack([noise.field(origin, box, seed, sample, step).reshape(shape[2:])
                              for origin in origins for sample in range(k)])
                return torch.from_numpy(z[:, None]).to(self.device)

            x = dfn.sample(self.denoiser, cond, self.schedule, noise_fn, self.sampler, self.steps)
        runs = self.norm.unit_to_target(x[:, 0].float().cpu().numpy().astype(np.float64)) * self.gain + self.offset
        runs = runs.reshape(n, k, *spatial)
        mean = runs.mean(axis=1)
        if any(self.blend):  # with the tile's own input voxels (a 2.5D tile's centre slice): model.blend
            own = np.asarray(tiles, np.float64)[:, c] if c else np.asarray(tiles, np.float64).reshape(mean.shape)
            planes = has_planes(c, self.spatial_dims) and any(self.blend[LATERAL:])  # the z candidates are weighted
            z = z_averaged(tiles, c).reshape(mean.shape) if planes else None
            mean = blend(mean, own, self.blend, z)
        mean = mean.astype(np.float32)
        if "std" in self.outputs:
            std = runs.std(axis=1, ddof=1)
            if self.std_scale != (1.0, 0.0):
                factor, floor = self.std_scale
                std = np.sqrt((factor * std) ** 2 + floor ** 2)
            std = std.astype(np.float32)
        return {"mean": mean, "std": std} if "std" in self.outputs else {"mean": mean}
