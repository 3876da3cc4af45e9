"""Restorers without a trained model: identity, gaussian (a baseline) and randcnn (a random torch CNN that stands in
for the diffusion network when testing a cluster), with their option validation."""

from __future__ import annotations

import numpy as np

from volrestore.cluster.client import pin_torch_threads
from volrestore.config import ModelRef
from volrestore.errors import UserError
from volrestore.model import noise
from volrestore.model.restorer import RestorerSpec

# name -> (class, options with defaults)
OPTIONS = {
    "identity": {"dims": 3},
    "gaussian": {"dims": 3, "sigma": 1.0},
    "randcnn": {"dims": 3, "width": 8, "init_seed": 0, "samples": 1, "std": False},
}


def resolve(ref: ModelRef) -> RestorerSpec:
    """The validated spec of a simple restorer."""
    allowed = OPTIONS[ref.name]
    unknown = sorted(set(ref.options) - set(allowed))
    if unknown:
        raise UserError(f"model {ref.name} does not take option {unknown[0]!r}; it takes {', '.join(allowed)}")
    opts = {**allowed, **ref.options}
    check_options(ref.name, opts)
    two_d = opts["dims"] == 2
    return RestorerSpec(
        name=ref.name,
        restorer=CLASSES[ref.name],
        options=tuple(sorted(opts.items())),
        spatial_dims=opts["dims"],
        size_multiple=CLASSES[ref.name].size_multiple,
        outputs=("mean", "std") if opts.get("std") else ("mean",),
        default_tile=(256, 256) if two_d else (64, 64, 64),
        default_overlap=32 if two_d else 8,
    )


def check_options(name: str, opts: dict) -> None:
    """UserError for an option value the restorer cannot take."""
    if opts["dims"] not in (2, 3):
        raise UserError(f"model {name}: dims must be 2 or 3, got {opts['dims']!r}")
    if "sigma" in opts and not (isinstance(opts["sigma"], (int, float)) and opts["sigma"] >= 0):
        raise UserError(f"model {name}: sigma must be a number >= 0, got {opts['sigma']!r}")
    for key in ("width", "samples"):
        if key in opts and not (isinstance(opts[key], int) and opts[key] >= 1):
            raise UserError(f"model {name}: {key} must be a whole number >= 1, got {opts[key]!r}")
    if name == "randcnn" and opts["std"] and opts["samples"] < 2:
        raise UserError("model randcnn: std needs samples >= 2, e.g. --samples 4 --std")


class Identity:
    """Returns the tiles unchanged: rechunking or converting an image through the blockwise engine. It takes float64
    tiles (`takes_float64`: the engine reads 32/64-bit integer and float64 inputs so) and returns them as float64."""

    size_multiple, outputs, z_context, takes_float64 = 1, ("mean",), 0, True

    def __init__(self, dims=3):
        self.spatial_dims = dims

    def __call__(self, tiles, origins, seed):
        return {"mean": tiles.astype(np.float64 if tiles.dtype == np.float64 else np.float32, copy=True)}


class Gaussian:
    """Gaussian smoothing of each tile (scipy)."""

    size_multiple, outputs, z_context = 1, ("mean",), 0

    def __init__(self, dims=3, sigma=1.0):
        self.spatial_dims, self.sigma = dims, sigma

    def __call__(self, tiles, origins, seed):
        from scipy.ndimage import gaussian_filter

        sigma = (0,) + (self.sigma,) * self.spatial_dims  # never blur across the batch axis
        return {"mean": gaussian_filter(tiles.astype(np.float32), sigma=sigma, mode="reflect")}


class RandCNN:
    """A small random-init torch CNN with one down/up level, fed the tile and a per-tile seeded noise channel.

    Stands in for the diffusion network: torch compute, a size multiple, noise keyed by (seed, sample, origin),
    and K samples whose mean and std are returned.
    """

    size_multiple, z_context = 2, 0

    def __init__(self, dims=3, width=8, init_seed=0, samples=1, std=False):
        import torch
        from torch import nn

        pin_torch_threads()
        self.spatial_dims, self.samples = dims, samples
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


CLASSES = {"identity": Identity, "gaussian": Gaussian, "randcnn": RandCNN}
