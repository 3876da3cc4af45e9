"""volrestore: restore large 3D fluorescence volumes in OME-Zarr with a conditional diffusion model on Dask.

The Python API: `open` and `write` (OME-Zarr <-> arrays), `restore`, `train`, `degrade` and `evaluate` (the CLI's
commands, same defaults). Scripts that use a local cluster (`cluster="local"`) must start it under
`if __name__ == "__main__":` (its worker processes re-import the script; see `restore`).
"""

from __future__ import annotations

import os

from volrestore.errors import UserError
from volrestore.provenance import __version__

# Axes of an array without names, by its number of dimensions (give `axes` for anything else).
AXES_BY_NDIM = {2: "yx", 3: "zyx", 4: "czyx", 5: "tczyx"}


def open(path, level: int = 0):  # noqa: A001 - mirrors xarray/zarr naming on purpose
    """Open an OME-Zarr image level as a lazy, dask-backed xarray.DataArray.

    dims are the axis names (t, c, z, y, x present), spatial coords are physical positions (voxel centres, their
    unit in the coordinate's attrs), `c` carries the channel names; nothing is read until the data is used.
    """
    from volrestore.io.ngff import open_image

    return open_image(_path(path, "path", "open"), level=level)


def write(data, path, *, axes=None, voxel_size=None, unit=None, translation=None, chunks=None, shards=None,
          version="0.5", levels=1, channel_names=None, overwrite=False):
    """Write an array or xarray.DataArray as a complete OME-Zarr image at `path`; returns its ImageInfo.

    - An xarray.DataArray gives its axes (dims), voxel size and translation (evenly spaced coords of z/y/x), the unit
      (a coord's attrs "units") and channel names (string coords of c); arguments given here take precedence.
    - A numpy array (or anything np.asarray takes) has axes by ndim: 2 yx, 3 zyx, 4 czyx, 5 tczyx, or `axes`.
    - `voxel_size`: one number or one per spatial axis (in axis order), in `unit` (NGFF name, e.g. "micrometer");
      default 1 per axis. `chunks`/`shards` are per axis (default: up to 64 on z and 256 on y/x; no shards);
      `levels` pyramid levels are built by 2x mean downsampling. The data is written from memory as a whole.
    """
    from volrestore.io.images import write_image as _write_image

    if isinstance(data, (str, os.PathLike)) and not isinstance(path, (str, os.PathLike)):
        raise UserError("write(data, path): give the array first, then the output path")
    path = _path(path, "path", "write")
    array, meta = _described(data, axes)
    names = meta["axes"]
    spatial = [a for a in names if a in "zyx"]
    scale = _per_spatial(voxel_size, names, spatial, "voxel_size") if voxel_size is not None else meta["scale"]
    shift = _per_spatial(translation, names, spatial, "translation") if translation is not None else meta["shift"]
    unit = unit or meta["unit"]
    from volrestore.io.ngff import AXIS_TYPES, Axis

    axis_objs = [Axis(a, AXIS_TYPES.get(a), unit if a in "zyx" else None) for a in names]
    return _write_image(path, array, axes=axis_objs, scale=scale, translation=shift, chunks=chunks, shards=shards,
                        version=version, n_levels=levels, channel_names=channel_names or meta["channels"],
                        overwrite=overwrite)


def write_image(path, data, **kwargs):
    """Write a numpy array as a complete OME-Zarr image (path first; see volrestore.io.images.write_image for the
    options). Kept for existing scripts: `write(data, path, ...)` also takes DataArrays, voxel sizes and units."""
    from volrestore.io.images import write_image as _write_image

    return _write_image(_path(path, "path", "write_image"), data, **kwargs)


def restore(input, output, model="default", *, level=0, tile=None, overlap=None, batch=4, seed=0, cluster="local",
            workers=None, resume=False, overwrite=False, mask=None, dtype="float32", nan="error", chunks=None,
            block=None, samples=None, sampler=None, steps=None, std=None, normalise=None, break_lock=False,
            progress=True, echo=print, **model_options) -> dict:
    """Restore the OME-Zarr image `input` into the OME-Zarr image `output` blockwise on Dask; a summary dict.

    `model`: "default" (the shipped diffusion model), a checkpoint .pt, "gaussian[:sigma=S]", "randcnn" or
    "identity" (a copy). `tile`, `chunks`, `block` are sizes per spatial axis (z y x present); `samples`, `sampler`,
    `steps`, `std` (also write OUT.std.ome.zarr), `normalise` and `model_options` are model options (None = the
    model's default). `cluster`: "local" (worker processes here: call it under `if __name__ == "__main__":`),
    "cuda", "tcp://host:port", a jobqueue YAML or a distributed.Client. `dtype="input"` writes the input's type.
    `resume` continues an interrupted run, `overwrite` replaces OUT, `break_lock` takes over a stale output lock.
    Results are bitwise reproducible for the same input, model, options, seed and tiles (see NOTES.md).
    """
    from volrestore.blockwise.restore import restore as _restore

    options = {"samples": samples, "sampler": sampler, "steps": steps, "std": std or None, "normalise": normalise}
    return _restore(_path(input, "input", "restore"), _path(output, "output", "restore"), model=model, level=level,
                    tile=tile, overlap=overlap, batch=batch, seed=seed, cluster=cluster, workers=workers,
                    resume=resume, overwrite=overwrite, mask=None if mask is None else _path(mask, "mask", "restore"),
                    dtype=dtype, nan=nan, chunks=chunks, block=block, echo=echo, progress=progress,
                    break_lock=break_lock, **{k: v for k, v in options.items() if v is not None}, **model_options)


def train(target, out, *, input=None, degrade=None, preset=None, init=None, iterations=None, patch=None, batch=None,
          val_fraction=0.1, objective=None, level=0, seed=0, lr=None, checkpoint_every=None, resume=False,
          overwrite=False, cluster="local", workers=1, progress=True, echo=print) -> dict:
    """Train a restoration model on OME-Zarr data and write the checkpoint `out` (.pt); a summary dict.

    Paired (`input`: a registered low-quality image of the target's grid) or from the clean `target` alone with a
    `degrade` spec ("poisson:photons=P[,read=R][,blur=PSF][,down=D]"). `preset`: a network preset name or YAML;
    `patch` (Z, Y, X), Z 1 for 2D presets; `batch` per worker; the last `val_fraction` of y is held out for
    validation. `workers` > 1 trains with DistributedDataParallel (global batch workers x batch). `init` ("default",
    "default-diffusion" or a .pt) fine-tunes that model instead of fresh weights of `preset` (default "tiny-2d").
    """
    from volrestore.model.trainjob import train_image

    return train_image(_path(target, "target", "train"), _path(out, "out", "train"),
                       input=None if input is None else _path(input, "input", "train"), degrade=degrade,
                       preset=preset if preset or init else "tiny-2d", init=init, iterations=iterations,
                       patch=None if patch is None else list(patch), batch=batch,
                       val_fraction=val_fraction, objective=objective, level=level, seed=seed, lr=lr,
                       checkpoint_every=checkpoint_every, resume=resume, overwrite=overwrite, cluster=cluster,
                       workers=workers, progress=progress, echo=echo)


def degrade(src, out, spec, *, level=0, dtype="float32", overwrite=False, cluster=None, workers=None, progress=True,
            echo=print) -> dict:
    """Write a degraded copy of the clean OME-Zarr image `src` (blur, binning, Poisson and read noise) to `out`.

    `spec`: "poisson:photons=P[,read=R][,blur=PSF.tif|.npy][,down=D][,seed=S]". The output keeps the input's pyramid
    levels (rebuilt from the degraded full resolution), chunks and shards. `cluster`: None runs in threads in this
    process; "local", "tcp://host:port" or a Client run on Dask. Returns {"output", "reference_intensity", "blocks"}.
    """
    from volrestore.simulate.degrade import degrade_image

    return degrade_image(_path(src, "src", "degrade"), _path(out, "out", "degrade"), spec, level=level, dtype=dtype,
                         overwrite=overwrite, cluster=cluster, workers=workers, progress=progress, echo=echo)


def evaluate(pred, ref, *, mask=None, level=0, mode="percentile", std=None, per_slice_csv=None, cluster=None,
             workers=None, progress=False) -> dict:
    """Metrics of the restored image `pred` against the reference `ref` (OME-Zarr paths), computed blockwise.

    PSNR, SSIM (3D), NRMSE and MAE over the image and per-slice rows ("slices"); `mode` "percentile" maps the
    reference's 0.1-99.9 percentiles to [0, 1] ("raw": its min-max); `std` adds uncertainty calibration; `mask`
    restricts to voxels > 0. `cluster`: None runs in threads here, "local"/"tcp://..."/a Client on Dask.
    """
    from volrestore.evaluation.evaluate import evaluate as _evaluate

    return _evaluate(_path(pred, "pred", "evaluate"), _path(ref, "ref", "evaluate"),
                     mask=None if mask is None else _path(mask, "mask", "evaluate"), level=level, mode=mode,
                     std=None if std is None else _path(std, "std", "evaluate"), per_slice_csv=per_slice_csv,
                     cluster=cluster, workers=workers, progress=progress)


def _path(value, what: str, function: str) -> str:
    """`value` as a path string; a short UserError (never the value printed whole) for an array or other object."""
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    shape = getattr(value, "shape", None)
    kind = type(value).__name__ + (f" of shape {tuple(shape)}" if shape is not None else "")
    hint = " (write an array first with volrestore.write(array, 'in.ome.zarr'))" if shape is not None else ""
    raise UserError(f"{function}: {what} must be the path of an OME-Zarr image, got a {kind}{hint}")


def _described(data, axes) -> tuple:
    """(numpy array, {"axes", "scale", "shift", "unit", "channels"}) from a DataArray's dims/coords or a plain array."""
    import numpy as np

    dims = getattr(data, "dims", None)
    names = list(axes) if axes is not None else list(dims) if dims is not None else None
    array = np.asarray(data.data if dims is not None else data)
    if names is None:
        if array.ndim not in AXES_BY_NDIM:
            raise UserError(f"write: cannot tell the axes of a {array.ndim}D array; give axes='tczyx' (a subset)")
        names = list(AXES_BY_NDIM[array.ndim])
    names = [str(a) for a in names]
    if len(names) != array.ndim or not set(names) <= set("tczyx") or len(set(names)) != len(names):
        raise UserError(f"write: axes {''.join(names)!r} do not fit a {array.ndim}D array; give distinct names "
                        "from t, c, z, y, x, one per dimension")
    meta = {"axes": names, "scale": None, "shift": None, "unit": None, "channels": None}
    coords = getattr(data, "coords", None) if dims is not None else None
    if coords is not None:
        meta.update(_from_coords(coords, names, array.shape))
    return array, meta


def _from_coords(coords, names, shape) -> dict:
    """Voxel size, translation, unit and channel names from a DataArray's coords (evenly spaced z/y/x ones)."""
    import numpy as np

    scale, shift, unit, channels = [1.0] * len(names), [0.0] * len(names), None, None
    for i, name in enumerate(names):
        if name not in coords:
            continue
        values = np.asarray(coords[name].values)
        if name == "c" and values.dtype.kind in "UO":
            channels = [str(v) for v in values]
        if name not in "zyx" or values.dtype.kind not in "iuf" or len(values) == 0:
            continue
        steps = np.diff(values.astype(np.float64))
        if len(steps) and not np.allclose(steps, steps[0], rtol=1e-6, atol=0):
            raise UserError(f"write: coordinate {name} is not evenly spaced; OME-Zarr needs one voxel size per axis")
        scale[i] = float(steps[0]) if len(steps) else 1.0
        shift[i] = float(values[0])
        unit = unit or coords[name].attrs.get("units")
    return {"scale": scale, "shift": shift, "unit": unit, "channels": channels}


def _per_spatial(value, names, spatial, what) -> list[float]:
    """A per-axis list (1 / 0 on non-spatial axes) from one number or one per spatial axis."""
    values = [float(value)] * len(spatial) if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != len(spatial):
        raise UserError(f"write: {what} needs 1 or {len(spatial)} numbers ({' '.join(spatial)}), got {len(values)}")
    by_axis = dict(zip(spatial, values))
    default = 1.0 if what == "voxel_size" else 0.0
    return [by_axis.get(a, default) for a in names]


__all__ = ["UserError", "__version__", "degrade", "evaluate", "open", "restore", "train", "write", "write_image"]
