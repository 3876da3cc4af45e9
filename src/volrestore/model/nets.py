"""Network presets (YAML) and the conditional magnitude-preserving U-Net (EDM2-style, 2D or 3D): no layer computes
statistics over spatial positions, so a voxel's output depends only on its receptive field, never on the tile."""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from volrestore.errors import UserError

OBJECTIVES = ("edm", "v", "eps", "regression")
ARCH = "mp-unet"
_NET_KEYS = ("spatial_dims", "channels", "channel_mult", "num_blocks")
# Keys of the MONAI presets of volrestore 0.1 (and any layer that normalises over space or attends over the whole
# tile): their output depends on the tile's size and content, which breaks tiling, so they are refused by name.
_SPATIAL_STATISTICS = {"norm_num_groups": "GroupNorm", "attention_levels": "attention over the whole tile",
                       "num_head_channels": "attention over the whole tile"}
_SPATIAL_NORMS = ("group", "batch", "instance", "layer")


def preset_names() -> list[str]:
    """Names of the presets shipped in volrestore/presets."""
    return sorted(p.name[:-5] for p in resources.files("volrestore").joinpath("presets").iterdir()
                  if p.name.endswith(".yaml"))


def load_preset(name_or_path: str | Path | dict) -> dict:
    """A validated preset dict: a shipped name (e.g. 'paper-2d'), a YAML path, or a dict (returned as a copy)."""
    if isinstance(name_or_path, dict):
        cfg = dict(name_or_path)
    else:
        text, where = None, str(name_or_path)
        if where in preset_names():
            text = resources.files("volrestore").joinpath("presets", f"{where}.yaml").read_text()
            where = f"preset {where}"
        elif where.endswith((".yaml", ".yml")) and Path(where).is_file():
            text = Path(where).read_text()
        if text is None:
            raise UserError(f"unknown preset {where!r}: use one of {', '.join(preset_names())} or a YAML file path")
        try:
            cfg = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UserError(f"preset {where} is not valid YAML: {exc}") from None
        if not isinstance(cfg, dict):
            raise UserError(f"preset {where} must be a YAML mapping of network settings")
        # The preset's own name, or its file's name without .yaml (not Path.stem: "small-2.5d" has a dot).
        base = Path(str(name_or_path)).name
        cfg = dict(cfg, name=cfg.get("name", base.rsplit(".", 1)[0] if base.endswith((".yaml", ".yml")) else base))
    name = cfg.get("name", "?")
    for key, what in _SPATIAL_STATISTICS.items():
        if key in cfg:
            raise UserError(f"preset {name} asks for {what} ({key!r}): such layers use statistics over the whole tile, "
                            f"so results would depend on the tile size; remove {key!r} (volrestore's {ARCH} "
                            "normalises per voxel across channels only)")
    if str(cfg.get("norm", "pixel")).lower() in _SPATIAL_NORMS or str(cfg.get("attention", "none")) == "global":
        raise UserError(f"preset {name} asks for a spatial-statistics layer (norm={cfg.get('norm')!r}, attention="
                        f"{cfg.get('attention')!r}): only norm: pixel and attention: none are allowed, because "
                        "results must not depend on the tile size")
    if cfg.setdefault("arch", ARCH) != ARCH:
        raise UserError(f"preset {name}: unknown arch {cfg['arch']!r}; the only network is {ARCH!r}")
    missing = [k for k in _NET_KEYS if k not in cfg]
    if missing or cfg["spatial_dims"] not in (2, 3):
        raise UserError(f"preset {name} needs keys {', '.join(_NET_KEYS)} with spatial_dims 2 or 3"
                        f"{' (missing ' + ', '.join(missing) + ')' if missing else ''}")
    cfg.setdefault("dropout", 0.0)
    cfg.setdefault("z_context", 0)
    if cfg["z_context"] and cfg["spatial_dims"] != 2:
        raise UserError(f"preset {name}: z_context (neighbouring z-slices as input channels) is for 2D nets only")
    cfg.setdefault("objective", "edm")
    cfg.setdefault("schedule", "edm" if cfg["objective"] == "edm" else "cosine")
    return cfg


# ---- magnitude-preserving primitives (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
# Diffusion Models", section 2 and appendix B): each keeps unit-variance inputs at unit variance.

def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """x divided by its RMS over `dim` (all but dim 0 when None): per voxel across channels when dim=1."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU: SiLU scaled back to unit variance for unit-variance input."""
    return F.silu(x) / 0.596  # 0.596 = std of silu(N(0, 1))


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Magnitude-preserving blend (1-t)·a + t·b, rescaled to keep unit variance."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Magnitude-preserving concatenation along channels, weighting a and b by (1-t, t) with unit total variance."""
    na, nb = a.shape[1], b.shape[1]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=1)


class MPConv(nn.Module):
    """Convolution (or linear map with kernel 0) with forced weight normalisation: the stored weights are renormalised
    to unit norm per output channel at every training step, and the applied weights have norm 1/sqrt(fan_in)."""

    def __init__(self, cin: int, cout: int, kernel: int, dims: int):
        super().__init__()
        self.dims, self.kernel = dims, kernel
        self.weight = nn.Parameter(torch.randn(cout, cin, *([kernel] * dims if kernel else [])))

    def forward(self, x: torch.Tensor, gain=1.0) -> torch.Tensor:
        w = self.weight.to(torch.float32)
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = normalize(w) * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if not self.kernel:
            return x @ w.t()
        conv = F.conv2d if self.dims == 2 else F.conv3d
        return conv(x, w, padding=self.kernel // 2)


class MPFourier(nn.Module):
    """Fourier features of the noise level with fixed random frequencies and phases (unit variance)."""

    def __init__(self, channels: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * np.pi * torch.randn(channels, generator=g))
        self.register_buffer("phases", 2 * np.pi * torch.rand(channels, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.float32).ger(self.freqs) + self.phases
        return (y.cos() * np.sqrt(2)).to(x.dtype)


def _resample(x: torch.Tensor, mode: str, dims: int) -> torch.Tensor:
    # 2x box filter down, nearest up (EDM2's [1, 1] filter): both are local, so tiling stays exact on the grid.
    if mode == "down":
        return (F.avg_pool2d if dims == 2 else F.avg_pool3d)(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return x


class Block(nn.Module):
    """EDM2 residual block: encoder blocks pixel-normalise their input, the noise embedding scales the features."""

    def __init__(self, cin: int, cout: int, emb: int, dims: int, flavor: str, resample: str = "keep",
                 dropout: float = 0.0, res_balance: float = 0.3, clip_act: float = 256.0):
        super().__init__()
        self.flavor, self.resample, self.dims = flavor, resample, dims
        self.dropout, self.res_balance, self.clip_act = dropout, res_balance, clip_act
        self.out_channels = cout
        self.conv_res0 = MPConv(cout if flavor == "enc" else cin, cout, 3, dims)
        self.emb_linear = MPConv(emb, cout, 0, dims)
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res1 = MPConv(cout, cout, 3, dims)
        self.conv_skip = MPConv(cin, cout, 1, dims) if cin != cout else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = _resample(x, self.resample, self.dims)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm: per voxel across channels, never across space
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c.reshape(*c.shape, *([1] * self.dims)).to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        return mp_sum(x, y, self.res_balance).clip(-self.clip_act, self.clip_act)


class ConditionalUNet(nn.Module):
    """Magnitude-preserving U-Net whose input is concat(condition, c_in·x, ones) on channels (condition and ones only
    for regression); forward(cond, x | None, c_noise) returns the raw output F that diffusion.Denoiser preconditions.

    Levels: base `channels` × `channel_mult`; `num_blocks` blocks per encoder level, one more per decoder level,
    down/up-sampling blocks between levels, two blocks at the bottleneck; skips joined with mp_cat. Zero padding at
    the tile border is the only place a tile's extent enters, which the engine's overlap and reflection absorb.
    """

    def __init__(self, preset: dict, objective: str):
        super().__init__()
        if objective not in OBJECTIVES:
            raise UserError(f"unknown objective {objective!r}: use one of {', '.join(OBJECTIVES)}")
        dims = self.spatial_dims = int(preset["spatial_dims"])
        mult = [int(m) for m in preset["channel_mult"]]
        self.size_multiple = size_multiple(preset)
        self.objective = objective
        base, nb, drop = int(preset["channels"]), int(preset["num_blocks"]), float(preset["dropout"])
        cblock = [base * m for m in mult]
        cemb = base * int(preset.get("channel_mult_emb", 4))
        self.concat_balance = 0.5
        self.emb_fourier = MPFourier(base)
        self.emb_noise = MPConv(base, cemb, 0, dims)
        self.enc = nn.ModuleDict()
        self.z_context = z_context(preset)
        # condition (with its neighbouring z-slices for a 2.5D net) + x (not for regression) + a constant channel
        # that stands in for biases
        cout = (1 + 2 * self.z_context) + (0 if objective == "regression" else 1) + 1
        for level, ch in enumerate(cblock):
            if level == 0:
                self.enc["conv_in"] = MPConv(cout, ch, 3, dims)
                cout = ch
            else:
                self.enc[f"l{level}_down"] = Block(cout, cout, cemb, dims, "enc", "down", drop)
            for i in range(nb):
                self.enc[f"l{level}_block{i}"] = Block(cout, ch, cemb, dims, "enc", dropout=drop)
                cout = ch
        skips = [cblock[0]] + [b.out_channels for b in list(self.enc.values())[1:]]
        self.dec = nn.ModuleDict()
        for level, ch in reversed(list(enumerate(cblock))):
            if level == len(cblock) - 1:
                self.dec[f"l{level}_in0"] = Block(cout, cout, cemb, dims, "dec", dropout=drop)
                self.dec[f"l{level}_in1"] = Block(cout, cout, cemb, dims, "dec", dropout=drop)
            else:
                self.dec[f"l{level}_up"] = Block(cout, cout, cemb, dims, "dec", "up", drop)
            for i in range(nb + 1):
                self.dec[f"l{level}_block{i}"] = Block(cout + skips.pop(), ch, cemb, dims, "dec", dropout=drop)
                cout = ch
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.conv_out = MPConv(cout, 1, 3, dims)

    def forward(self, cond: torch.Tensor, x: torch.Tensor | None, c_noise) -> torch.Tensor:
        """cond: (B, 1 + 2·z_context, *spatial); x: (B, 1, *spatial), already scaled by c_in; c_noise: (B,) or a
        scalar."""
        c_noise = torch.as_tensor(c_noise, dtype=torch.float32, device=cond.device).reshape(-1)
        emb = mp_silu(self.emb_noise(self.emb_fourier(c_noise.expand(cond.shape[0]))))
        parts = [cond] if self.objective == "regression" else [cond, x]
        h = torch.cat([*parts, torch.ones_like(cond[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            h = block(h) if name == "conv_in" else block(h, emb)
            skips.append(h)
        for name, block in self.dec.items():
            if "_block" in name:
                h = mp_cat(h, skips.pop(), self.concat_balance)
            h = block(h, emb)
        return self.conv_out(h, gain=self.out_gain)


def receptive_radius(preset: dict) -> int:
    """Voxels on each side that can influence an output voxel (per axis, at full resolution): every 3-wide conv at
    level l adds 2^l, a down/up-sampling step up to 2^l more; the overlap of tiles should be close to this."""
    mult = preset["channel_mult"]
    nb = int(preset["num_blocks"])
    r = 1  # conv_in
    for level in range(len(mult)):
        s = 2**level
        r += 2 * nb * s + (2 * s + s if level else 0)  # encoder blocks; down block (2 convs + pooling phase)
        r += 2 * (nb + 1) * s + (4 * s if level == len(mult) - 1 else 2 * s + s)  # decoder blocks; bottleneck or up
    return r + 1  # conv_out


def size_multiple(preset: dict) -> int:
    """Tile and patch sizes must be multiples of this: one 2x down-sampling per level after the first."""
    return 2 ** (len(preset["channel_mult"]) - 1)


def z_context(preset: dict) -> int:
    """Neighbouring z-slices on each side a 2D net sees with its slice (0: plain 2D)."""
    return int(preset.get("z_context", 0))


def build(preset: str | Path | dict, objective: str | None = None) -> ConditionalUNet:
    """The network for a preset (name, YAML path or dict); objective defaults to the preset's."""
    cfg = load_preset(preset)
    return ConditionalUNet(cfg, objective or cfg["objective"])


def student_weights(teacher: dict, preset: dict) -> dict:
    """A diffusion net's state dict made into the regression net of the same preset (a distilled student's start):
    the input convolution loses the column that read the noisy sample x (the channels are condition, x, ones), the
    rest is shared. The noise embedding then always sees the blind regression's code 0."""
    state = dict(teacher)
    w = state["enc.conv_in.weight"]
    x_channel = 1 + 2 * z_context(preset)
    state["enc.conv_in.weight"] = torch.cat([w[:, :x_channel], w[:, x_channel + 1:]], dim=1)
    return state


def count_params(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters())
