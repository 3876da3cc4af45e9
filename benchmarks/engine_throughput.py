"""Restore-engine throughput and memory on this machine (a benchmark, not a test).

Reports, in one run:
1. pipeline efficiency for randcnn (torch, compute-dominated): output voxels/s of `restore` on 1 worker ÷ output
   voxels/s of the bare restorer over the same grid tiles once each, measured in that same worker process (1 torch
   thread) just before and just after the pipeline run, so both see the same machine load; the tile recompute
   factor (tiles computed / grid tiles: 1.0 since blocks pass the parts of straddling tiles, blockwise.spill) is
   printed next to it, with what it would be if every block computed every tile touching it;
2. 2-worker ÷ 1-worker throughput of the same run;
3. peak worker RSS (ru_maxrss) for a 64³ and a 1024³ uint16 volume written chunk by chunk (identity restorer,
   64³ chunks = write-blocks, so 4096 blocks pass through the bounded submission window; to keep the run short a
   1/16-resolution mask limits restoring to one octant, 512 blocks, the other 3584 are counted empty).

    python benchmarks/engine_throughput.py [--big 1024] [--width 24] [--workdir /tmp/vr-bench]
"""

import argparse
import itertools
import os
import shutil
import time
from pathlib import Path

import numpy as np

from volrestore.evaluation import benchmark
from volrestore.blockwise import plan as planning
from volrestore.blockwise import restore as engine
from volrestore.io import ngff
from volrestore.cluster.client import connect


def make_input(path, shape, chunks, dtype, fill, scale=1.0):
    """Create an OME-Zarr image and fill it chunk by chunk (never the whole volume in memory)."""
    ngff.create_image(path, shape=shape, dtype=dtype, axes=["z", "y", "x"], scale=[scale] * 3, chunks=chunks,
                      translation=[(scale - 1) / 2] * 3, overwrite=True)  # voxel centres as in a pyramid level
    arr = ngff.open_level(path, 0, mode="r+")
    for idx in itertools.product(*(range(-(-n // c)) for n, c in zip(shape, chunks))):
        sl = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(idx, chunks, shape))
        arr[sl] = fill(sl)
    ngff.set_complete(path)
    return str(path)


def run(src, out, workers, bare=False, **kw):
    """restore() on a fresh local cluster; with bare, also the bare restorer before and after it, on the worker."""
    if bare:
        plan, spec = planning.plan(src, kw["model"], tile=kw["tile"], overlap=kw["overlap"], batch=kw["batch"])
    with connect("local", workers=workers, echo=lambda *_: None) as client:
        before = client.submit(benchmark.bare_pass, spec, plan, pure=False).result() if bare else None
        summary = engine.restore(src, out, cluster=client, overwrite=True, progress=False, echo=lambda *_: None, **kw)
        after = client.submit(benchmark.bare_pass, spec, plan, pure=False).result() if bare else None
        rss = client.run(benchmark._rss_mib)
    return summary, max(rss.values()), (before, after), plan if bare else None


def _octant(sl, m):
    z, y, x = np.meshgrid(*(np.arange(s.start, s.stop) for s in sl), indexing="ij")
    return ((z < m // 2) & (y < m // 2) & (x < m // 2)).astype(np.uint8)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/vr-bench")
    ap.add_argument("--big", type=int, default=1024, help="side of the big volume for the RSS comparison")
    ap.add_argument("--width", type=int, default=24, help="randcnn width (compute per voxel)")
    ap.add_argument("--shape", type=int, nargs=3, default=[64, 256, 256])
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    # 1 + 2: randcnn efficiency and scaling
    shape, tile, overlap, batch = tuple(args.shape), [32, 32, 32], 4, 4
    rng = np.random.default_rng(0)
    src = make_input(work / "rc.ome.zarr", shape, (32, 64, 64), "float32",
                     lambda sl: rng.random(tuple(s.stop - s.start for s in sl), dtype=np.float32))
    opts = dict(model=f"randcnn:width={args.width}", tile=tile, overlap=overlap, batch=batch)
    s1, _, (before, after), plan = run(src, work / "o1.ome.zarr", 1, bare=True, **opts)
    s2, _, _, _ = run(src, work / "o2.ome.zarr", 2, **opts)
    block, n_tiles = list(plan.block), plan.grid.n_tiles
    bare0, bare1 = before["voxels_per_s"], after["voxels_per_s"]
    bare = (bare0 + bare1) / 2
    factor = s1["tiles"] / n_tiles  # 1.0: each tile once (blockwise.spill)
    before_spill = benchmark.recompute_factor(plan)  # every block computing every tile touching it
    print(f"randcnn width {args.width}, volume {shape}, tile {tile}, overlap {overlap}, batch {batch}, "
          f"write-block {block}, {n_tiles} grid tiles")
    print(f"  bare restorer      : {bare:,.0f} voxels/s (before {bare0:,.0f}, after {bare1:,.0f}; same worker)")
    print(f"  pipeline, 1 worker : {s1['voxels_per_s']:,.0f} voxels/s -> efficiency {s1['voxels_per_s'] / bare:.3f} "
          f"(tile recompute factor {factor:.3f}, {before_spill:.3f} if blocks did not pass tile parts; "
          f"efficiency x factor = {s1['voxels_per_s'] / bare * factor:.3f})")
    print(f"  pipeline, 2 workers: {s2['voxels_per_s']:,.0f} voxels/s -> 2/1 worker ratio "
          f"{s2['voxels_per_s'] / s1['voxels_per_s']:.3f}")

    # 3: peak worker RSS, small vs big volume, same chunks/blocks/tiles
    results = {}
    sides = (64, 256, args.big)  # 256³: a middle point shows whether RSS plateaus after the first blocks
    for side in sides:
        big = make_input(work / f"v{side}.ome.zarr", (side,) * 3, (64,) * 3, "uint16",
                         lambda sl: np.full(tuple(s.stop - s.start for s in sl), sl[0].start % 997, np.uint16))
        mask = None
        if side > 64:
            m = side // 16
            mask = make_input(work / "mask.ome.zarr", (m,) * 3, (m,) * 3, "uint8", lambda sl: _octant(sl, m), 16.0)
        t0 = time.perf_counter()
        summary, rss, _, _ = run(big, work / f"r{side}.ome.zarr", 2, model="identity", tile=[64, 64, 64], overlap=8,
                           block=[64, 64, 64], dtype="input", mask=mask)
        results[side] = rss
        print(f"  {side}^3 identity: {summary['blocks']} blocks ({summary['empty']} empty by mask), {summary['voxels_per_s']:,.0f} voxels/s, "
              f"peak worker RSS {rss:.0f} MiB ({time.perf_counter() - t0:.0f} s)")
        shutil.rmtree(work / f"v{side}.ome.zarr")
        shutil.rmtree(work / f"r{side}.ome.zarr")
    print(f"  load average during the run: {os.getloadavg()}")
    print(f"  peak worker RSS ratio {args.big}^3 / 64^3 = {results[args.big] / results[64]:.3f}, "
          f"{args.big}^3 / 256^3 = {results[args.big] / results[256]:.3f}")


if __name__ == "__main__":
    main()
