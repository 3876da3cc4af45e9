"""Degradation model for making training pairs: PSF blur, lateral downsampling, Poisson photon noise, read noise."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage, signal

from .errors import UserError

GRAMMAR = ("poisson:photons=P[,read=R][,blur=PSF.tif|.npy][,down=D][,seed=S] "
           "e.g. poisson:photons=20,read=2,blur=psf.tif,down=2")


@dataclass(frozen=True)
class Degradation:
    """`photons`: mean photon count at the reference intensity (the clean image's 99.9th percentile unless given);
    `read`: Gaussian read-noise std in photons; `blur`: PSF file (normalised to sum 1; a 2D PSF blurs each z-slice);
    `down`: lateral (y, x) binning factor, the result is brought back onto the input grid by linear interpolation so
    the network always maps grid to grid; `seed`: with the caller's counter, fixes every random number."""

    photons: float
    read: float = 0.0
    blur: str | None = None
    down: int = 1
    seed: int = 0

    @classmethod
    def parse(cls, spec: str) -> "Degradation":
        kind, _, rest = spec.partition(":")
        kw = dict(item.partition("=")[::2] for item in rest.split(",") if item)
        try:
            if kind.strip() != "poisson" or not set(kw) <= {"photons", "read", "blur", "down", "seed"}:
                raise ValueError
            deg = cls(photons=float(kw["photons"]), read=float(kw.get("read", 0)), blur=kw.get("blur") or None,
                      down=int(kw.get("down", 1)), seed=int(kw.get("seed", 0)))
            if deg.photons <= 0 or deg.read < 0 or deg.down < 1:
                raise ValueError
        except (ValueError, KeyError):
            raise UserError(f"cannot parse degradation {spec!r}: expected {GRAMMAR}") from None
        if deg.blur and not Path(deg.blur).is_file():
            raise UserError(f"PSF file {deg.blur!r} of degradation {spec!r} not found: give an existing .tif or .npy")
        return deg

    def psf(self) -> np.ndarray | None:
        return None if self.blur is None else _load_psf(self.blur)

    def halo(self, ndim: int) -> tuple[int, ...]:
        """Voxels of context per side the blur needs (read them around a patch, then crop with `crop`)."""
        psf = self.psf()
        if psf is None:
            return (0,) * ndim
        half = [s // 2 for s in psf.shape]
        return tuple([0] * (ndim - len(half)) + half)

    def __call__(self, x: np.ndarray, counter: tuple[int, ...] = (), ref: float | None = None,
                 psf: np.ndarray | None = None) -> np.ndarray:
        """Degrade clean `x` (float, intensity units, last two axes y, x); returns float32 in the same units/shape."""
        x = np.asarray(x, dtype=np.float64)
        ref = float(np.percentile(x, 99.9)) if ref is None else float(ref)
        psf = self.psf() if psf is None else psf
        if psf is not None:
            if psf.ndim > x.ndim:
                raise UserError(f"PSF has {psf.ndim} dims but the image only {x.ndim}: use a {x.ndim}D PSF")
            psf = psf.reshape((1,) * (x.ndim - psf.ndim) + psf.shape)
            pad = [(s // 2, s - 1 - s // 2) for s in psf.shape]
            x = signal.fftconvolve(np.pad(x, pad, mode="reflect"), psf, mode="valid")
        shape = x.shape
        if self.down > 1:
            d = self.down
            pad = [(0, 0)] * (x.ndim - 2) + [(0, -s % d) for s in x.shape[-2:]]
            x = np.pad(x, pad, mode="reflect")
            x = x.reshape(*x.shape[:-2], x.shape[-2] // d, d, x.shape[-1] // d, d).mean(axis=(-3, -1))
        rng = np.random.default_rng([self.seed, *(int(c) & 0xFFFFFFFF for c in counter)])
        scale = self.photons / max(ref, 1e-12)
        counts = rng.poisson(np.clip(x, 0, None) * scale) + rng.normal(0.0, self.read, x.shape)
        y = counts / scale
        if self.down > 1:
            zoom = [1] * (y.ndim - 2) + [self.down, self.down]
            y = ndimage.zoom(y, zoom, order=1, mode="nearest", grid_mode=True)
            y = y[tuple(slice(0, s) for s in shape)]
        return y.astype(np.float32)


def crop(x: np.ndarray, halo: tuple[int, ...]) -> np.ndarray:
    return x[tuple(slice(h, x.shape[i] - h) for i, h in enumerate(halo))]


@lru_cache(maxsize=4)
def _load_psf(path: str) -> np.ndarray:
    if path.endswith(".npy"):
        psf = np.load(path)
    else:
        import tifffile

        psf = tifffile.imread(path)
    psf = np.squeeze(np.asarray(psf, dtype=np.float64))
    if psf.ndim not in (2, 3) or psf.sum() <= 0:
        raise UserError(f"PSF {path} must be a 2D or 3D image with positive sum")
    return psf / psf.sum()


def parse(spec: str) -> Degradation:
    return Degradation.parse(spec)
