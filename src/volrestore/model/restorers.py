"""The Restorer interface, simple restorers (identity, gaussian, randcnn), `resolve(model)` and the per-worker cache."""

from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass

import numpy as np

from volrestore.model import noise
from volrestore.errors import UserError


class Restorer:
    """Restores a batch of tiles; see NOTES.md for the contract."""

    spatial_dims: int = 3
    size_multiple: int = 1
    outputs: tuple[str, ...] = ("mean",)
    # 2D restorers only: neighbouring z-slices on each side that come with every (1, Y, X) tile, as
    # tiles (B, 1 + 2·z_context, Y, X); the restorer returns (B, Y, X) for the centre slice (a 2.5D model).
    z_context: int = 0

    def __call__(self, tiles: np.ndarray, origins: list[tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
        raise NotImplementedError


@dataclass(frozen=True)
class RestorerSpec:
    """What a worker needs to build a restorer: small, hashable and picklable (tasks carry it, never a model).

    `factory` ("module:function") is called on the worker as factory(name, **options). The other fields let the
    client validate tiles and plan outputs without building the model.
    """

    name: str
    options: tuple[tuple[str, object], ...] = ()
    factory: str = "volrestore.model.restorers:build_simple"
    spatial_dims: int = 3
    size_multiple: int = 1
    outputs: tuple[str, ...] = ("mean",)
    default_tile: int | tuple[int, ...] = 64  # or per axis, e.g. a network's training patch
    default_overlap: int = 8
    z_context: int = 0  # see Restorer.z_context
    # Options that change nothing in the result (e.g. a test-only delay) and so never block --resume.
    volatile: tuple[str, ...] = ("sleep", "oom_at")

    def build(self) -> Restorer:
        """The restorer for this spec, created once per process and reused by every task."""
        restorer = _CACHE.get(self)
        if restorer is None:
            module, func = self.factory.split(":")
            restorer = getattr(importlib.import_module(module), func)(self.name, **dict(self.options))
            _CACHE[self] = restorer
        return restorer

    @property
    def parameters(self) -> dict:
        """The result-defining parameters, for provenance and the --resume check."""
        return {"model": self.name, **{k: v for k, v in self.options if k not in self.volatile}}


_CACHE: dict[RestorerSpec, Restorer] = {}


def parse_model(model: str) -> tuple[str, dict]:
    """'gaussian:sigma=2,dims=2' -> ('gaussian', {'sigma': 2, 'dims': 2}); values become int/float/bool when they look so."""
    name, _, rest = model.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UserError(f"model option {item!r} in {model!r} must look like key=value, e.g. gaussian:sigma=1.5")
        options[key.strip()] = _literal(value.strip())
    return name.strip(), options


def _literal(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# name -> (allowed options with defaults, spatial dims option allowed, size multiple)
_SIMPLE = {
    "identity": {"dims": 3, "sleep": 0.0, "oom_at": 0},
    "gaussian": {"dims": 3, "sigma": 1.0, "sleep": 0.0, "oom_at": 0},
    "randcnn": {"dims": 3, "width": 8, "init_seed": 0, "samples": 1, "std": False, "sleep": 0.0, "oom_at": 0},
}


def resolve(model: str, **options) -> RestorerSpec:
    """Turn --model NAME[:k=v,...] plus model options (None = not given) into a validated RestorerSpec."""
    name, inline = parse_model(model)
    given = {k: v for k, v in options.items() if v is not None}
    clash = sorted(set(inline) & set(given))
    if clash:
        raise UserError(f"model option {clash[0]} is given twice (in --model and as --{clash[0]}); give it once")
    merged = {**inline, **given}
    # Hook for the diffusion model (another module): a checkpoint path or the bundled 'default'.
    if name == "default" or name.endswith(".pt"):
        try:
            diffusion_restorer = importlib.import_module("volrestore.model.diffusion_restorer")
        except ImportError:
            raise UserError(f"model {name} needs the diffusion restorer, which this install lacks") from None
        return diffusion_restorer.resolve(name, **merged)
    if name not in _SIMPLE:
        raise UserError(f"unknown model {name!r}; use identity, gaussian, randcnn, default or a checkpoint .pt file")
    allowed = _SIMPLE[name]
    unknown = sorted(set(merged) - set(allowed))
    if unknown:
        raise UserError(f"model {name} does not take option {unknown[0]!r}; it takes {', '.join(allowed)}")
    opts = {**allowed, **merged}
    if opts["dims"] not in (2, 3):
        raise UserError(f"model {name}: dims must be 2 or 3, got {opts['dims']!r}")
    for key in ("sigma", "sleep"):
        if key in opts and not (isinstance(opts[key], (int, float)) and opts[key] >= 0):
            raise UserError(f"model {name}: {key} must be a number >= 0, got {opts[key]!r}")
    if not (isinstance(opts["oom_at"], int) and opts["oom_at"] >= 0):
        raise UserError(f"model {name}: oom_at must be a whole number >= 0, got {opts['oom_at']!r}")
    for key in ("width", "samples"):
        if key in opts and not (isinstance(opts[key], int) and opts[key] >= 1):
            raise UserError(f"model {name}: {key} must be a whole number >= 1, got {opts[key]!r}")
    if name == "randcnn" and opts["std"] and opts["samples"] < 2:
        raise UserError("model randcnn: std needs samples >= 2, e.g. --samples 4 --std")
    two_d = opts["dims"] == 2
    return RestorerSpec(
        name=name,
        options=tuple(sorted(opts.items())),
        spatial_dims=opts["dims"],
        size_multiple=2 if name == "randcnn" else 1,
        outputs=("mean", "std") if opts.get("std") else ("mean",),
        default_tile=256 if two_d else 64,
        default_overlap=32 if two_d else 8,
    )


def build_simple(name: str, **options) -> Restorer:
    return {"identity": Identity, "gaussian": Gaussian, "randcnn": RandCNN}[name](**options)


def _test_hooks(tiles, sleep, oom_at):
    """Test-only behaviour of the simple restorers: a delay (interruption tests) and, with oom_at = N > 0, torch's
    CUDA out-of-memory error for calls of N or more tiles (it can be raised on a CPU too: tests the batch halving)."""
    time.sleep(sleep)
    if oom_at and len(tiles) >= oom_at:
        import torch

        raise torch.cuda.OutOfMemoryError(f"test: {len(tiles)} tiles >= oom_at={oom_at}")


class Identity(Restorer):
    """Returns the tiles unchanged (optionally after a delay, to test interruption)."""

    def __init__(self, dims=3, sleep=0.0, oom_at=0):
        self.spatial_dims, self.sleep, self.oom_at = dims, sleep, oom_at

    def __call__(self, tiles, origins, seed):
        _test_hooks(tiles, self.sleep, self.oom_at)
        return {"mean": tiles.astype(np.float32, copy=True)}


class Gaussian(Restorer):
    """Gaussian smoothing of each tile (scipy)."""

    def __init__(self, dims=3, sigma=1.0, sleep=0.0, oom_at=0):
        self.spatial_dims, self.sigma, self.sleep, self.oom_at = dims, sigma, sleep, oom_at

    def __call__(self, tiles, origins, seed):
        from scipy.ndimage import gaussian_filter

        _test_hooks(tiles, self.sleep, self.oom_at)
        sigma = (0,) + (self.sigma,) * self.spatial_dims  # never blur across the batch axis
        return {"mean": gaussian_filter(tiles.astype(np.float32), sigma=sigma, mode="reflect")}


class RandCNN(Restorer):
    """A small random-init torch CNN with one down/up level, fed the tile and a per-tile seeded noise channel.

    Stands in for the diffusion network: torch compute, a size multiple, noise keyed by (seed, sample, origin),
    and K samples whose mean and std are returned.
    """

    size_multiple = 2

    def __init__(self, dims=3, width=8, init_seed=0, samples=1, std=False, sleep=0.0, oom_at=0):
        import torch
        from torch import nn

        # One thread per worker unless the cluster says otherwise: fixed thread count keeps results bitwise stable.
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        self.spatial_dims, self.samples, self.sleep, self.oom_at = dims, samples, sleep, oom_at
        self.outputs = ("mean", "std") if std else ("mean",)
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        pool = nn.AvgPool3d if dims == 3 else nn.AvgPool2d
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.net = nn.Sequential(
                conv(2, width, 3, padding=1), nn.GELU(), pool(2),
                conv(width, width, 3, padding=1), nn.GELU(),
                nn.Upsample(scale_factor=2, mode="nearest"),
                conv(width, 1, 3, padding=1),
            ).eval()
        self.torch = torch

    def __call__(self, tiles, origins, seed):
        torch = self.torch
        _test_hooks(tiles, self.sleep, self.oom_at)
        x = torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.float32))[:, None]
        # Per-tile scale (never per batch, so batching cannot change a tile's result): the net sees O(1) values.
        amax = np.abs(tiles).reshape(len(tiles), -1).max(axis=1)
        scale = torch.from_numpy(np.where(amax > 0, amax, 1).astype(np.float32)).reshape(-1, *[1] * (tiles.ndim))
        outs = []
        with torch.inference_mode():
            for s in range(self.samples):
                z = np.stack([noise.normal(tiles.shape[1:], seed, s, *o) for o in origins])[:, None]
                inp = torch.cat([x / scale, torch.from_numpy(z)], dim=1)
                outs.append((x + 0.1 * scale * self.net(inp))[:, 0].numpy())
        stack = np.stack(outs)
        result = {"mean": stack.mean(axis=0, dtype=np.float64).astype(np.float32)}
        if "std" in self.outputs:
            result["std"] = stack.std(axis=0, ddof=1, dtype=np.float64).astype(np.float32)
        return result
