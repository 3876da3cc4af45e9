"""Degradation model for making training pairs: PSF blur, lateral downsampling, Poisson photon noise, read noise."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache, partial
from itertools import product
from pathlib import Path

import numpy as np
from scipy import ndimage, signal

from volrestore.config import resolved_path
from volrestore.errors import UserError
from volrestore.io.storage import cast_rounded

GRAMMAR = ("poisson:photons=P[,read=R][,blur=PSF.tif|.npy][,down=D][,seed=S] "
           "e.g. poisson:photons=20,read=2,blur=psf.tif,down=2; P and R may be ranges LO-HI (drawn per patch)")


@dataclass(frozen=True)
class Degradation:
    """`photons`: mean photon count at the reference intensity (the clean image's 99.9th percentile unless given);
    `read`: Gaussian read-noise std in photons; `blur`: PSF file (normalised to sum 1; a 2D PSF blurs each z-slice);
    `down`: lateral (y, x) binning factor, the result is brought back onto the input grid by linear interpolation so
    the network always maps grid to grid; `seed`: with the caller's counter, fixes every random number.
    `photons_max` / `read_max`: when set, each call draws its level from [photons, photons_max] (log-uniform) and
    [read, read_max] (uniform), so a model trained on such patches is blind to the noise level."""

    photons: float
    read: float = 0.0
    blur: str | None = None
    down: int = 1
    seed: int = 0
    photons_max: float | None = None
    read_max: float | None = None

    @classmethod
    def parse(cls, spec: str) -> "Degradation":
        kind, _, rest = spec.partition(":")
        kw = dict(item.partition("=")[::2] for item in rest.split(",") if item)
        try:
            if kind.strip() != "poisson" or not set(kw) <= {"photons", "read", "blur", "down", "seed"}:
                raise ValueError
            (p_lo, p_hi), (r_lo, r_hi) = _range(kw["photons"]), _range(kw.get("read", "0"))
            deg = cls(photons=p_lo, read=r_lo, blur=kw.get("blur") or None, down=int(kw.get("down", 1)),
                      seed=int(kw.get("seed", 0)), photons_max=p_hi, read_max=r_hi)
            if deg.photons <= 0 or deg.read < 0 or deg.down < 1 or (p_hi or p_lo) < p_lo or (r_hi or r_lo) < r_lo:
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

    def level(self, counter: tuple[int, ...] = ()) -> tuple[float, float]:
        """(photons, read noise) that the call with this counter draws (its fixed values when not ranges)."""
        return self._draw_level(self._rng(counter))

    def _rng(self, counter) -> np.random.Generator:
        return np.random.default_rng([self.seed, *(int(c) & 0xFFFFFFFF for c in counter)])

    def _draw_level(self, rng) -> tuple[float, float]:
        photons, read = self.photons, self.read
        if self.photons_max is not None:
            photons = float(np.exp(rng.uniform(np.log(self.photons), np.log(self.photons_max))))
        if self.read_max is not None:
            read = float(rng.uniform(self.read, self.read_max))
        return photons, read

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
        rng = self._rng(counter)
        photons, read = self._draw_level(rng)
        scale = photons / max(ref, 1e-12)
        counts = rng.poisson(np.clip(x, 0, None) * scale) + rng.normal(0.0, read, x.shape)
        y = counts / scale
        if self.down > 1:
            zoom = [1] * (y.ndim - 2) + [self.down, self.down]
            y = ndimage.zoom(y, zoom, order=1, mode="nearest", grid_mode=True)
            y = y[tuple(slice(0, s) for s in shape)]
        return y.astype(np.float32)


def _range(text: str) -> tuple[float, float | None]:
    """'20' -> (20, None); '3-30' -> (3, 30)."""
    lo, sep, hi = text.partition("-")
    return (float(lo), float(hi)) if sep else (float(lo), None)


def crop(x: np.ndarray, halo: tuple[int, ...]) -> np.ndarray:
    """x without `halo` voxels at both ends of each axis (undoes the context read for the blur)."""
    return x[tuple(slice(h, x.shape[i] - h) for i, h in enumerate(halo))]


@lru_cache(maxsize=4)
def _load_psf(path: str) -> np.ndarray:
    try:
        if path.endswith(".npy"):
            psf = np.load(path)
        else:
            import tifffile

            psf = tifffile.imread(path)
    except Exception as exc:  # noqa: BLE001 - any reader error means the file is not a PSF image
        raise UserError(f"cannot read the PSF {path} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                        "give a 2D/3D TIFF or .npy image") from None
    psf = np.squeeze(np.asarray(psf, dtype=np.float64))
    if psf.ndim not in (2, 3) or psf.sum() <= 0:
        raise UserError(f"PSF {path} must be a 2D or 3D image with positive sum")
    return psf / psf.sum()


def degrade_image(src, out, spec: str, *, level: int = 0, dtype: str = "float32", overwrite: bool = False,
                  command: str | None = None, cluster=None, workers: int | None = None, progress: bool = False,
                  echo=print) -> dict:
    """Write a degraded copy of an OME-Zarr image (for evaluation pairs), one task per output chunk (shard).

    Each output chunk (shard when the input is sharded NGFF 0.5) reads its region plus the blur/binning halo, so the
    result equals a whole-volume degradation except for the noise draws, which are keyed by (seed, block origin):
    the same spec and layout give the same bytes wherever the tasks run. Photons are set at the whole image's 99.9th
    percentile (from chunk histograms), as for a single volume. The output keeps the input's layout: its chunks and
    shards (y/x rounded to a multiple of the binning) and as many pyramid levels as the input has from `level` on,
    rebuilt from the degraded full resolution (degrading each input level would not give a consistent pyramid).
    `cluster`: None runs in threads here; "local", "tcp://host:port" or a Client run on Dask; `progress`: bars on
    stderr.
    """
    from volrestore.blockwise.blocks import grid_blocks, grid_size
    from volrestore.blockwise.runner import run_blockwise
    from volrestore.cluster.client import connect
    from volrestore.evaluation import metrics
    from volrestore.io import ngff, pyramid

    deg = Degradation.parse(spec)
    info = ngff.read_info(src)
    if not 0 <= level < len(info.levels):
        raise UserError(f"{src} has {len(info.levels)} level(s); choose --level below that")
    ngff.check_output_path(out, inputs=[src], overwrite=overwrite)
    if dtype not in ("float32", "input"):
        raise UserError(f"--dtype must be float32 or input, got {dtype!r}")
    names = info.axis_names
    spatial = tuple(i for i, n in enumerate(names) if n in "zyx")
    if deg.down > 1 and not {"y", "x"} <= set(names):
        raise UserError("down-sampling needs y and x axes in the image")
    psf = deg.psf()
    if psf is not None and psf.ndim > len(spatial):
        raise UserError(f"PSF has {psf.ndim} dims but the image only {len(spatial)}: use a {len(spatial)}D PSF")
    lvl = info.levels[level]
    chunks = _degrade_chunks(deg, names, lvl.chunks)
    shards = _degrade_shards(lvl.shards if info.version == "0.5" else None, chunks)
    unit = shards or chunks  # a task writes whole shards: two tasks never write into one shard
    out_dtype = np.dtype("float32" if dtype == "float32" else lvl.dtype)
    total = grid_size(lvl.shape, unit)
    parameters = {"input": str(src), "level": level, "degrade": spec, "dtype": dtype}
    at = {"src": resolved_path(src), "out": os.path.abspath(out)}  # what workers open: they start in other folders
    with connect(cluster, workers, echo=echo) as client:
        _, _, (ref,) = metrics.run_percentiles(partial(_read_block, at["src"], lvl.path),
                                               lambda: grid_blocks(lvl.shape, chunks), q=(99.9,), client=client,
                                               progress=progress, what="the clean image",
                                               total=grid_size(lvl.shape, chunks))
        ngff.create_image(out, shape=lvl.shape, dtype=out_dtype, axes=info.axes, scale=lvl.scale,
                          translation=lvl.translation, chunks=chunks, shards=shards, version=info.version,
                          n_levels=len(info.levels) - level, channel_names=info.channel_names,
                          provenance=ngff.make_provenance(parameters, command), overwrite=overwrite)
        job = DegradeJob(at["src"], lvl.path, at["out"], ngff.read_info(out).levels[0].path, deg, ref, spatial,
                         out_dtype.str)
        run_blockwise(client, degrade_block, grid_blocks(lvl.shape, unit, _degrade_halo(deg, names)), args=(job,),
                      progress=progress, what="degrading", total=total)
        pyramid.build_pyramid(out, client, progress=progress)
    ngff.set_complete(out)
    return {"output": str(out), "reference_intensity": ref, "blocks": total}


def _degrade_chunks(deg: Degradation, names, chunks) -> list[int]:
    """The output chunks: the input's, with y/x a multiple of the binning so bins stay on the global grid."""
    chunks = list(chunks)
    for i, n in enumerate(names):
        if n in "yx" and deg.down > 1:
            chunks[i] = max(deg.down, chunks[i] // deg.down * deg.down)
    return chunks


def _degrade_shards(shards, chunks) -> list[int] | None:
    """The output shards: the input's (None when it has none), each a whole number of the output chunks."""
    if not shards:
        return None
    return [max(1, -(-s // c)) * c for s, c in zip(shards, chunks)]


def _degrade_halo(deg: Degradation, names) -> list[int]:
    """Voxels read around a chunk per axis: the PSF's half size; binning needs whole neighbour bins to interpolate."""
    spatial = [i for i, n in enumerate(names) if n in "zyx"]
    halo = [0] * len(names)
    for i, h in zip(spatial, deg.halo(len(spatial))):
        halo[i] = -(-max(h, deg.down) // deg.down) * deg.down if names[i] in "yx" and deg.down > 1 else h
    return halo


@dataclass(frozen=True)
class DegradeJob:
    """What a degrade_block task needs besides its block (small, sent with each task)."""

    src: str
    src_array: str
    out: str
    out_array: str
    degradation: Degradation
    ref: float  # intensity that gets `photons` photons
    spatial: tuple[int, ...]  # the z/y/x axes; every other axis (t, c) is degraded index by index
    dtype: str


def degrade_block(job: DegradeJob, block) -> None:
    """Degrade one output chunk: read it with its halo, degrade each t/c volume, crop the halo, write the chunk."""
    import zarr

    region = np.asarray(_read_block(job.src, job.src_array, block), np.float64)
    lead = [i for i in range(region.ndim) if i not in job.spatial]
    inner = tuple(block.inner[i] for i in job.spatial)
    result = np.empty(block.shape, np.float64)
    for idx in product(*(range(region.shape[i]) for i in lead)):
        sel = [slice(None)] * region.ndim
        for i, k in zip(lead, idx):
            sel[i] = k
        # the noise of a chunk is keyed by its origin (and t/c index), never by where or when its task runs
        noisy = job.degradation(region[tuple(sel)], counter=block.origin + tuple(idx), ref=job.ref)
        result[tuple(sel)] = noisy[inner]
    zarr.open_group(job.out, mode="r+")[job.out_array][block.write_slices] = cast_rounded(result, job.dtype)


def _read_block(path, array_path, block) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_group(path, mode="r")[array_path][block.read_slices])
