"""Benchmark: peak memory of `volrestore convert` on a large 3D TIFF must stay far below the stack size.

Writes a uint16 stack plane by plane (so generating it is itself streaming), converts it in a child process and
reports the child's peak RSS increase over its RSS after imports. Goal: stack size / peak increase >= 8.

    python benchmarks/convert_memory.py --planes 1024 --height 1024 --width 1024   # 2 GiB stack
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

CHILD = r"""
import json, resource, sys, time
from volrestore.io.tiff import convert   # imports first, so the baseline includes them

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

base = rss()
t0 = time.perf_counter()
convert(sys.argv[1], sys.argv[2], chunks=json.loads(sys.argv[3]), n_levels=int(sys.argv[4]) or None)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
print(json.dumps({"baseline_rss": base, "peak_rss": peak, "seconds": seconds}))
"""


def write_stack(path, planes, height, width):
    """A textured, not very compressible stack, generated and written one plane at a time."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 4096, (height, width), dtype=np.uint16)

    def pages():
        for z in range(planes):
            yield np.roll(base, z, axis=1) + np.uint16(z % 64)

    tifffile.imwrite(path, pages(), shape=(planes, height, width), dtype=np.uint16,
                     bigtiff=planes * height * width * 2 > 3.5e9, metadata={"axes": "ZYX"})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--planes", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--chunks", type=int, nargs=3, default=[64, 256, 256], metavar=("Z", "Y", "X"))
    parser.add_argument("--levels", type=int, default=0, help="pyramid levels (0 = converter default)")
    parser.add_argument("--workdir", default=None, help="where to put the TIFF and the output (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src, out = Path(tmp) / "stack.tif", Path(tmp) / "stack.ome.zarr"
        t0 = time.perf_counter()
        write_stack(src, args.planes, args.height, args.width)
        gen_s = time.perf_counter() - t0
        stack = args.planes * args.height * args.width * 2
        proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), json.dumps(args.chunks),
                               str(args.levels)], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"conversion failed:\n{proc.stderr}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        increase = res["peak_rss"] - res["baseline_rss"]
        slab = args.chunks[0] * args.height * args.width * 2
        print(f"stack:            {args.planes}×{args.height}×{args.width} uint16 = {stack / 2**20:,.0f} MiB "
              f"(written in {gen_s:.1f} s)")
        print(f"chunks (z,y,x):   {args.chunks}; one z-slab = {slab / 2**20:,.0f} MiB")
        print(f"child RSS:        baseline {res['baseline_rss'] / 2**20:,.0f} MiB, "
              f"peak {res['peak_rss'] / 2**20:,.0f} MiB, increase {increase / 2**20:,.0f} MiB")
        print(f"conversion time:  {res['seconds']:.1f} s ({stack / 2**20 / res['seconds']:,.0f} MiB/s) "
              f"on {os.cpu_count()} CPU(s), incl. pyramid")
        print(f"stack / peak increase = {stack / increase:.1f}  (goal >= 8)")


if __name__ == "__main__":
    main()
