"""Pyramid levels from level 0: blockwise mean downsampling (integers rounded and clipped), one task per write-block."""

from __future__ import annotations

import numpy as np
import zarr

from volrestore.blockwise.blocks import grid_blocks, grid_size
from volrestore.blockwise.runner import run_blockwise
from volrestore.io.ngff import read_info


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
                      args=(str(path), src.path, dst.path, factors), window=window, progress=progress,
                      what=f"pyramid level {i + 1}", total=grid_size(dst.shape, block))


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
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        np.rint(acc, out=acc)
        np.clip(acc, info.min, info.max, out=acc)
    return acc.astype(dtype)
