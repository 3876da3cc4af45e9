"""Pyramid levels from level 0: blockwise mean downsampling (integers rounded and clipped), one task per write-block.

Once the levels are built the data is final, so build_pyramid also sets the omero display windows from the data
(per-channel 0.1/99.9 percentiles of a bounded sample of the smallest level).
"""

from __future__ import annotations

import os

import numpy as np
import zarr

from volrestore.blockwise.blocks import grid_blocks, grid_size
from volrestore.blockwise.runner import run_blockwise
from volrestore.io.ngff import read_info, set_omero_windows
from volrestore.io.storage import cast_rounded

WINDOW_PERCENTILES = (0.1, 99.9)
WINDOW_SAMPLE = 1 << 22  # voxels per channel read for the display window


def build_pyramid(path, client=None, window: int | None = None, progress: bool = False) -> None:
    """Fill levels 1..n-1 from level 0, level by level, on `client` (None: threads of this process).

    One task per write-block (shard, else chunk) of level i+1: it reads the matching region of level i, takes
    the mean over the factor-2 blocks and writes whole chunks, so no two tasks touch the same chunk. The blockwise
    runner keeps `window` tasks in flight, so huge volumes never build a huge graph.
    """
    info = read_info(path)
    for i in range(len(info.levels) - 1):
        src, dst = info.levels[i], info.levels[i + 1]
        factors = tuple(max(1, round(d / s)) for d, s in zip(dst.scale, src.scale))
        block = dst.shards or dst.chunks
        run_blockwise(client, _downsample_block, grid_blocks(dst.shape, block),
                      args=(os.path.abspath(path), src.path, dst.path, factors), window=window, progress=progress,
                      what=f"pyramid level {i + 1}", total=grid_size(dst.shape, block))
    if info.channel_names is not None:  # the image has omero metadata (volrestore writes it with channel names)
        set_omero_windows(path, display_windows(path))


def display_windows(path, level: int = -1, max_voxels: int = WINDOW_SAMPLE) -> list[dict]:
    """One omero window per channel (one in all without a c axis) from the data of `level` (default the smallest).

    start/end are the channel's 0.1/99.9 percentiles over at most `max_voxels` voxels (whole chunks spread evenly
    over the level when it is larger), ignoring NaN/inf; min/max stay the dtype range for integers and are the
    sample's range for floats. A constant channel gets a window one unit wide.
    """
    info = read_info(path)
    arr = zarr.open_group(str(path), mode="r")[info.levels[level].path]
    names = info.axis_names
    n_channels = arr.shape[names.index("c")] if "c" in names else 1
    windows = []
    for c in range(n_channels):
        values = _channel_sample(arr, names.index("c") if "c" in names else None, c, max_voxels)
        values = values[np.isfinite(values)]
        if values.size == 0:
            windows.append({})
            continue
        start, end = (float(v) for v in np.percentile(values, WINDOW_PERCENTILES))
        lo, hi = float(values.min()), float(values.max())
        if end <= start:
            start, end = (lo, hi) if hi > lo else (lo, lo + 1.0)
        window = {"start": start, "end": end}
        if not np.issubdtype(arr.dtype, np.integer):
            window.update(min=min(lo, start), max=max(hi, end))
        windows.append(window)
    return windows


def _channel_sample(arr, c_axis: int | None, c: int, max_voxels: int) -> np.ndarray:
    """The voxels of channel c (float64, flat): all of them when few enough, else evenly spread chunk-aligned
    regions (whole chunks, or parts of chunks when one chunk alone is over the budget)."""
    def channel(region):
        return tuple(slice(c, c + 1) if i == c_axis else s for i, s in enumerate(region))

    shape = [1 if i == c_axis else n for i, n in enumerate(arr.shape)]
    if int(np.prod(shape)) <= max_voxels:
        return np.asarray(arr[channel([slice(None)] * arr.ndim)], np.float64).ravel()
    chunks = [1 if i == c_axis else k for i, k in enumerate(arr.chunks)]
    while int(np.prod(chunks)) > max_voxels:  # a chunk alone is over the budget: sample parts of chunks
        chunks[int(np.argmax(chunks))] //= 2
    grid = [-(-n // k) for n, k in zip(shape, chunks)]
    n_pick = max(1, min(int(np.prod(grid)), max_voxels // int(np.prod(chunks))))
    picks = np.unique(np.linspace(0, int(np.prod(grid)) - 1, n_pick).round().astype(np.int64))
    parts = []
    for flat in picks:
        index = np.unravel_index(int(flat), grid)
        region = [slice(i * k, min((i + 1) * k, n)) for i, k, n in zip(index, chunks, shape)]
        parts.append(np.asarray(arr[channel(region)], np.float64).ravel())
    return np.concatenate(parts)


def _downsample_block(path, src_path, dst_path, factors, block) -> None:
    group = zarr.open_group(path, mode="r+")
    src, dst = group[src_path], group[dst_path]
    dsl = block.write_slices
    out = np.empty([s.stop - s.start for s in dsl], dst.dtype)
    # fill the block piece by piece, each piece reading about one source chunk, so a task holds one output
    # block plus one source chunk rather than the 2^d-times larger source region
    piece = [c // f if c % f == 0 else n for c, f, n in zip(src.chunks, factors, out.shape)]
    for p in np.ndindex(*[-(-n // s) for n, s in zip(out.shape, piece)]):
        local = tuple(slice(i * s, min((i + 1) * s, n)) for i, s, n in zip(p, piece, out.shape))
        ssl = tuple(slice((d.start + o.start) * f, min((d.start + o.stop) * f, n))
                    for d, o, f, n in zip(dsl, local, factors, src.shape))
        out[local] = downsample_mean(src[ssl], factors, tuple(o.stop - o.start for o in local), dst.dtype)
    dst[dsl] = out



def downsample_mean(data: np.ndarray, factors, out_shape, dtype) -> np.ndarray:
    """Mean over factor-sized blocks; at odd edges over the voxels present. Integers are rounded and clipped."""
    dtype = np.dtype(dtype)
    # float32 sums of <= 8 values of <= 16-bit integers are exact, so they give the float64 result in half the memory
    small_int = np.issubdtype(dtype, np.integer) and dtype.itemsize <= 2 and data.dtype.itemsize <= 2
    acc = np.zeros(out_shape, np.float32 if small_int else np.float64)
    for offset in np.ndindex(*factors):  # strided views: no copy of the source block
        view = data[tuple(slice(o, None, f) for o, f in zip(offset, factors))]
        acc[tuple(slice(0, n) for n in view.shape)] += view
    for i, (f, n) in enumerate(zip(factors, out_shape)):  # divide by the voxels present, axis by axis
        if f > 1:
            count = np.array([len(range(o, data.shape[i], f)) for o in range(f)])
            per = np.array([(count > k).sum() for k in range(n)], acc.dtype)
            acc /= per.reshape([-1 if j == i else 1 for j in range(acc.ndim)])
    return cast_rounded(acc, dtype)
