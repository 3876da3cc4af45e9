"""Whole in-memory arrays as complete OME-Zarr images (the public `volrestore.write_image`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from volrestore.io.ngff import ImageInfo, axis_name, create_image, open_level, read_info, set_complete
from volrestore.io.pyramid import build_pyramid


def write_image(path, data, *, axes="zyx", scale=None, translation=None, chunks=None, shards=None, version="0.5",
                n_levels=1, channel_names=None, provenance=None, overwrite=False) -> ImageInfo:
    """Write an in-memory array as a complete OME-Zarr image (with `n_levels` pyramid levels); its metadata.

    `axes` are names ("zyx", "czyx", ...) or Axis objects; `scale` defaults to 1 per axis and `chunks` to the
    array's shape capped at 64 on z and 256 on y and x.
    """
    data = np.asarray(data)
    axes = list(axes)
    names = [axis_name(a) for a in axes]
    if chunks is None:
        cap = {"z": 64, "y": 256, "x": 256}
        chunks = [min(n, cap.get(a, 1)) for n, a in zip(data.shape, names)]
    create_image(path, shape=data.shape, dtype=data.dtype, axes=axes, scale=scale or [1.0] * data.ndim,
                 translation=translation, chunks=chunks, shards=shards, version=version, n_levels=n_levels,
                 channel_names=channel_names, provenance=provenance, overwrite=overwrite)
    open_level(path, 0, mode="r+")[...] = data
    build_pyramid(path)  # with one level it only sets the display windows from the data
    set_complete(path)
    return read_info(path)


def crop_image(src, out, region) -> None:
    """Write `region` (a tuple of slices over all axes of level 0) of the OME-Zarr image `src` as the complete
    OME-Zarr image `out`, placed at its physical position (translation shifted by the region's start)."""
    info = read_info(src)
    level = info.levels[0]
    data = open_level(src, 0)[region]
    starts = [s.indices(n)[0] for s, n in zip(region, level.shape)]
    create_image(out, shape=data.shape, dtype=data.dtype, axes=info.axes, scale=level.scale,
                 translation=[t + i * s for t, i, s in zip(level.translation, starts, level.scale)],
                 chunks=[min(c, n) for c, n in zip(level.chunks, data.shape)], overwrite=True,
                 provenance={"command": f"crop of {Path(src).name}",
                             "parameters": {"region_start": starts}})
    open_level(out, 0, mode="r+")[...] = data
    set_complete(out)
