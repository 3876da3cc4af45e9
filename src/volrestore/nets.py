"""Network presets (YAML) and the conditional U-Net built on MONAI's DiffusionModelUNet (2D or 3D)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
import yaml
from monai.networks.nets.diffusion_model_unet import DiffusionModelUNet, DiffusionUNetResnetBlock
from torch import nn

from .errors import UserError

OBJECTIVES = ("v", "eps", "regression")
_NET_KEYS = ("spatial_dims", "channels", "num_res_blocks", "attention_levels", "num_head_channels", "norm_num_groups")


def preset_names() -> list[str]:
    """Names of the presets shipped in volrestore/presets."""
    return sorted(p.name[:-5] for p in resources.files("volrestore").joinpath("presets").iterdir()
                  if p.name.endswith(".yaml"))


def load_preset(name_or_path: str | Path | dict) -> dict:
    """A preset as a dict: a shipped name (e.g. 'paper-2d'), a YAML path, or a dict (returned as a copy)."""
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
        cfg = dict(cfg or {}, name=cfg.get("name", Path(str(name_or_path)).stem))
    missing = [k for k in _NET_KEYS if k not in cfg]
    if missing or cfg["spatial_dims"] not in (2, 3):
        raise UserError(f"preset {cfg.get('name', '?')} needs keys {', '.join(_NET_KEYS)} with spatial_dims 2 or 3"
                        f"{' (missing ' + ', '.join(missing) + ')' if missing else ''}")
    cfg.setdefault("dropout", 0.0)
    cfg.setdefault("objective", "v")
    return cfg


class ConditionalUNet(nn.Module):
    """MONAI DiffusionModelUNet whose input is concat(condition, x_t) on channels (condition only for regression)."""

    def __init__(self, preset: dict, objective: str):
        super().__init__()
        if objective not in OBJECTIVES:
            raise UserError(f"unknown objective {objective!r}: use one of {', '.join(OBJECTIVES)}")
        self.spatial_dims = int(preset["spatial_dims"])
        self.size_multiple = 2 ** (len(preset["channels"]) - 1)
        self.objective = objective
        self.unet = DiffusionModelUNet(
            spatial_dims=self.spatial_dims,
            in_channels=1 if objective == "regression" else 2,
            out_channels=1,
            channels=tuple(preset["channels"]),
            num_res_blocks=preset["num_res_blocks"],
            attention_levels=tuple(preset["attention_levels"]),
            num_head_channels=preset["num_head_channels"],
            norm_num_groups=preset["norm_num_groups"],
        )
        if preset["dropout"]:
            _add_dropout(self.unet, float(preset["dropout"]))

    def forward(self, cond: torch.Tensor, x_t: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
        """cond, x_t: (B, 1, *spatial); t: 1-D (B,) float timesteps in [0, T] (a scalar is broadcast)."""
        t = torch.as_tensor(t, dtype=torch.float32, device=cond.device).reshape(-1).expand(cond.shape[0])
        x = cond if self.objective == "regression" else torch.cat([cond, x_t], dim=1)
        return self.unet(x, t)


def _add_dropout(unet: nn.Module, p: float) -> None:
    # MONAI's res block has no dropout argument; the paper's (Ho et al.) res block applies dropout right before its
    # second conv, so we put it exactly there. State-dict keys of conv2 move to conv2.1.*.
    for block in unet.modules():
        if isinstance(block, DiffusionUNetResnetBlock):
            block.conv2 = nn.Sequential(nn.Dropout(p), block.conv2)


def build(preset: str | Path | dict, objective: str | None = None) -> ConditionalUNet:
    """The network for a preset (name, YAML path or dict); objective defaults to the preset's."""
    cfg = load_preset(preset)
    return ConditionalUNet(cfg, objective or cfg["objective"])


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
