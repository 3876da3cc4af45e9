"""Model checkpoints: the file format, its content hash, atomic save, validated load, the intensity Normalisation."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from volrestore.errors import UserError
from volrestore.model import diffusion as dfn
from volrestore.model import nets


FORMAT = "volrestore-model"



FORMAT_VERSION = 2



# Format 1 (volrestore 0.1): MONAI U-Nets with GroupNorm, whose results depend on the tile; not loadable any more.
OLD_FORMATS = {1: "volrestore 0.1 (MONAI U-Net)"}



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
    """The noise schedule a checkpoint was trained with."""
    return dfn.Schedule.from_dict(ck["schedule"])



def model_from_checkpoint(ck: dict, ema: bool = True) -> nets.ConditionalUNet:
    """The checkpoint's network (EMA weights unless ema=False), in eval mode."""
    net = nets.ConditionalUNet(nets.load_preset(ck["preset"]), ck["objective"])
    net.load_state_dict(ck["ema" if ema else "model"])
    return net.eval()


def check_teacher(ck: dict, teacher) -> None:
    """UserError unless the checkpoint `ck` (of the model named `teacher`) is a diffusion model a student can learn."""
    if ck["objective"] == "regression":
        raise UserError(f"the teacher {teacher} is a regression model, already one evaluation per voxel: distil a "
                        "diffusion model (e.g. default-diffusion)")
