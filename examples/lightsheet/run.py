#!/usr/bin/env python
"""Lattice light-sheet walkthrough: fetch a real LLS7 stack, convert it to OME-Zarr, degrade it at two photon budgets,
restore it with the shipped default model, train a conditional diffusion model and a regression baseline on one part
of the stack, restore another part on a local Dask cluster (K samples + std), evaluate against the clean stack and
draw figures.

    python examples/lightsheet/run.py            # full run, < 30 min on a 2-core CPU; figures land next to this file
    python examples/lightsheet/run.py --quick    # CI: a crop, one budget (5 photons), 60 iterations: ~2 min

Every step is a `volrestore` command (printed as it runs) except the download and the crop into train/evaluation
regions, which are a few lines of Python below. Needs only `pip install -e .` (volrestore) and network access to PyPI.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Pinned download list (package==version, member inside the wheel, sha256 of the member): a copy of the
# RBC_lattice.tif line of the repository's shared/data/fetch-samples.sh, so this example works on its own.
# lls-core is GPL-3.0 and ships no separate data licence: the file is fetched at run time, never vendored.
PINS = {
    "RBC_lattice.tif": ("lls-core==2.2.3", "lls_core/sample/RBC_lattice.tif",
                        "6cb8ccde086454012096c8e3e4cf460ca5062a408240799f39c5f541f3f9f746"),
}

# The stack is a raw (not deskewed) stage-scan acquisition: 150 scan planes x 118 x 209 camera pixels.
# Its ImageJ metadata says spacing = 0.3 micron (the stage step between planes, along the scan direction; the
# Zeiss "ZAxisShear = Skew60" tag says the planes are sheared, so 0.3 um is NOT an orthogonal z spacing) and a
# pixel of 0.145 um (XResolution 6.8969 px/um = Zeiss Scaling|Distance 1.45e-7 m). `volrestore convert` reads
# both; we keep the acquisition grid (restoring before deskewing, where the noise is still independent per pixel).
EXPECTED_VOXEL = (0.3, 0.145, 0.145)

# Train on scan planes [0, 96), evaluate on [112, 150): a gap of 16 planes. The cells are sheared across ~30 planes,
# so a cell near the gap can have a sliver in both regions; the evaluation planes are never trained on. Evaluation
# region: planes [112, 144), y [16, 112) (the coverslip band below is nearly empty), x [0, 104). Tiles = the training
# patch (8 x 32 x 32), overlap 4: chosen when the tiny presets had GroupNorm, whose statistics over a tile shifted the
# output when tile and patch sizes differed (13.7 dB with 40 x 104 x 112 tiles against 27.4 dB with 8 x 32 x 32). The
# magnitude-preserving nets (issue 11) have no spatial statistics, so larger tiles would give the same values faster;
# the example keeps these so its recorded results stay comparable.
FULL = dict(train=(slice(0, 96), slice(None), slice(None)), eval=(slice(112, 144), slice(16, 112), slice(0, 104)),
            iterations=300, patch=(8, 32, 32), batch=4, samples=4, steps=6, val_fraction=0.3,
            tile=(8, 32, 32), overlap=4)
QUICK = dict(train=(slice(0, 48), slice(None), slice(None)), eval=(slice(112, 124), slice(40, 104), slice(100, 196)),
             iterations=60, patch=(8, 32, 32), batch=2, samples=2, steps=4, val_fraction=0.3,
             tile=(8, 32, 32), overlap=4, checkpoint_every=60)  # one validation (each costs ~10 iterations)
# Photons at the clean stack's 99.9th percentile (bright membrane ~ 1900 counts) plus Gaussian read noise (photons).
BUDGETS = {"p20": "poisson:photons=20,read=1", "p5": "poisson:photons=5,read=1"}
QUICK_BUDGETS = ("p5",)  # --quick: one budget (training is most of the time), the one the before/after figure shows
PRESET = "tiny-3d"


def log(msg: str) -> None:
    print(msg, flush=True)


def fetch(name: str, dest: Path) -> Path:
    """The pinned sample `name` in `dest` (downloaded from its wheel and sha256-checked unless a valid copy is there)."""
    from volrestore.io.samples import fetch_pinned

    return fetch_pinned(name, PINS[name], dest, log)


def vr(*args, capture=False) -> str:
    """Run one `volrestore` command, printed as a user would type it. It runs in this process (the same code path as
    the shell command, without paying Python/torch start-up for each of the ~25 commands)."""
    import contextlib
    import io

    from volrestore.cli import main as cli

    args = [str(a) for a in args]
    log("$ volrestore " + shlex.join(args))
    t0, buf, argv = time.perf_counter(), io.StringIO(), sys.argv
    sys.argv = ["volrestore", *args]  # provenance records the command line
    try:
        with contextlib.redirect_stdout(buf) if capture else contextlib.nullcontext():
            rc = cli.main(args, prog_name="volrestore", standalone_mode=False)
    except SystemExit as exc:
        rc = exc.code
    finally:
        sys.argv = argv
    if isinstance(rc, int) and rc:  # a UserError was printed as "error: ..." above
        raise SystemExit(f"volrestore {args[0]} failed (exit {rc})")
    log(f"  ({time.perf_counter() - t0:.1f} s)")
    return buf.getvalue()


def crop(src: Path, out: Path, region) -> None:
    """Write `region` (slices over all axes) of OME-Zarr src as a new OME-Zarr at its physical position."""
    from volrestore.io.images import crop_image

    crop_image(src, out, region)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="CI mode: a crop, one photon budget, few iterations and steps (~2 min)")
    ap.add_argument("--work", type=Path, help="scratch folder [examples/lightsheet/work or work-quick]")
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
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one torch thread per Dask worker process
    times, t_start = {}, time.perf_counter()

    def step(name):
        times[name] = round(time.perf_counter() - t_start - sum(times.values()), 1)

    # 1. Fetch and convert (voxel size from the file's ImageJ metadata; checked below).
    tif = fetch("RBC_lattice.tif", data)
    full = work / "rbc.ome.zarr"
    vr("convert", tif, full, "--chunks", 32, 128, 128, "--overwrite")
    info = json.loads(vr("info", full, "--json", capture=True))
    scale = info["levels"][0]["scale"]
    if any(abs(s - e) > 1e-3 for s, e in zip(scale, EXPECTED_VOXEL)):
        raise SystemExit(f"unexpected voxel size {scale} (expected {EXPECTED_VOXEL} um from the ImageJ metadata)")
    log(f"voxel size (z, y, x) = {[round(s, 4) for s in scale]} {info['axes'][0].get('unit')}")
    train_img, clean = work / "train.ome.zarr", work / "eval-clean.ome.zarr"
    crop(full, train_img, cfg["train"])
    crop(full, clean, cfg["eval"])
    step("fetch_convert")

    # 2. One shared local Dask cluster for every command (starting one per command costs ~10 s each).
    from contextlib import ExitStack

    from volrestore.cluster.client import connect

    cluster_scope = ExitStack()  # closes the client and its local cluster at the end
    client = cluster_scope.enter_context(connect("local", workers=a.workers, echo=lambda *_: None))
    address = client.scheduler.address
    log(f"local Dask cluster: {a.workers} worker processes, 1 thread each, at {address}")
    results = {"quick": a.quick, "config": {k: (str(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
               "voxel_size_um": scale, "budgets": {}, "machine": machine()}
    try:
        for tag in QUICK_BUDGETS if a.quick else BUDGETS:
            spec = BUDGETS[tag]
            d = work / tag
            d.mkdir(exist_ok=True)
            degraded = d / "degraded.ome.zarr"
            vr("degrade", clean, degraded, "--spec", f"{spec},seed=7", "--overwrite")
            # 3. Train the diffusion model and the regression baseline on the training planes (same data, seed,
            #    iterations), both at once, each on a one-worker cluster of its own (--quick: one after the other on
            #    the shared cluster).
            models = {o: d / f"{PRESET}-{o}.pt" for o in ("v", "regression")}
            train_all(spec, train_img, models, cfg, cluster=address if a.quick else None)
            step(f"{tag}_degrade_train")
            # 4. Restore the held-out planes on the Dask cluster.
            K = cfg["samples"]
            out = {name: d / f"{name}.ome.zarr" for name in
                   ("gaussian", "default", "regression", "diffusion_K1", f"diffusion_K{K}")}
            common = ["--cluster", address, "--overwrite", "--tile", *cfg["tile"], "--overlap", cfg["overlap"]]
            vr("restore", degraded, out["gaussian"], "--model", "gaussian:sigma=1", "--cluster", address, "--overwrite")
            # The shipped default model as a user without training data gets it: `restore IN OUT`, nothing trained
            # on this stack (its training used these RBC planes 0-95, never the evaluation planes).
            vr("restore", degraded, out["default"], "--cluster", address, "--overwrite")
            vr("restore", degraded, out["regression"], "--model", models["regression"], *common)
            vr("restore", degraded, out["diffusion_K1"], "--model", models["v"], "--samples", 1,
               "--steps", cfg["steps"], *common)
            vr("restore", degraded, out[f"diffusion_K{K}"], "--model", models["v"], "--samples", K,
               "--steps", cfg["steps"], "--std", *common)
            std = d / f"diffusion_K{K}.std.ome.zarr"
            step(f"{tag}_restore")
            # 5. Evaluate against the clean planes: every method, per-slice PSNR, Mood's test; calibration of std.
            methods = [degraded, out["gaussian"], out["default"], out["regression"], out["diffusion_K1"],
                       out[f"diffusion_K{K}"]]
            cmp = json.loads(vr("evaluate", "--compare", *methods, "--reference", clean,
                                "--figure", figs / f"rbc_{tag}_psnr.png", "--json", capture=True))
            cal = json.loads(vr("evaluate", out[f"diffusion_K{K}"], clean, "--std", std,
                                "--figure", figs / f"rbc_{tag}_calibration.png", "--json", capture=True))
            # 6. Figures: one contrast (the clean image's) for all panels; the std on its own.
            vr("figure", clean, degraded, out["gaussian"], out["default"], out["regression"], out["diffusion_K1"],
               out[f"diffusion_K{K}"], "--view", "slices",
               "--titles", f"clean,degraded ({tag[1:]} ph),gaussian s=1,shipped default,regression 300 its,"
                           f"diffusion K=1,DDPM-avg K={K}",
               "--out", figs / f"rbc_{tag}_slices.png")
            vr("figure", std, "--view", "slices", "--titles", f"std of K={K} samples",
               "--out", figs / f"rbc_{tag}_std.png")
            if tag == "p5":
                vr("figure", clean, degraded, out[f"diffusion_K{K}"], "--view", "ortho",
                   "--titles", f"clean (raw LLS7),degraded ({tag[1:]} photons),restored (DDPM-avg K={K})",
                   "--out", figs / "rbc_before_after.png")
            step(f"{tag}_evaluate_figures")
            results["budgets"][tag] = {
                "degradation": spec,
                "summary": {k: {m: v.get(m) for m in ("psnr", "ssim_3d", "nrmse", "slice_psnr_median")}
                            for k, v in cmp["summary"].items()},
                "moods_test": [r for r in cmp["moods_test"] if r["b"].startswith("diffusion_K")
                               or r["a"].startswith("diffusion_K")],
                "calibration_2std": cal["calibration_2std"],
                "train_history_last": {o: last_history(m) for o, m in models.items()},
            }
    finally:
        cluster_scope.close()
    times["total"] = round(time.perf_counter() - t_start, 1)
    results["seconds"] = times
    (figs / "results.json").write_text(json.dumps(results, indent=1))
    log(report(results))
    return results


def train_all(spec, target, models: dict, cfg: dict, cluster: str | None = None) -> None:
    """`volrestore train` for each objective, run concurrently as separate processes, each on its own one-worker local
    cluster (one shared cluster would queue both training tasks on the same worker). With `cluster` (--quick) they run
    one after the other on that cluster instead: a minute of iterations each does not pay for two more Python
    processes and local clusters (~15 s of CPU each)."""
    procs = []
    for objective, ck in models.items():
        args = ["train", "--target", target, "--degrade", f"{spec},seed=1", "--preset", PRESET,
                "--objective", objective, "--iterations", cfg["iterations"], "--patch", *cfg["patch"],
                "--batch", cfg["batch"], "--val-fraction", cfg["val_fraction"],
                "--checkpoint-every", cfg.get("checkpoint_every", max(cfg["iterations"] // 5, 1)), "--out", ck,
                "--overwrite", "--workers", 1]
        if cluster:
            vr(*args, "--cluster", cluster)
            continue
        args = [str(x) for x in args]
        log("$ volrestore " + shlex.join(args) + " &")
        procs.append(subprocess.Popen([sys.executable, "-m", "volrestore", *args]))
    if not procs:
        return
    t0 = time.perf_counter()
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"volrestore train failed (exit codes {codes})")
    log(f"  ({time.perf_counter() - t0:.1f} s for both)")


def last_history(path: Path) -> dict:
    from volrestore.model.checkpoint import load_checkpoint

    ck = load_checkpoint(path)
    h = ck["history"]
    return {"iterations": ck["iteration"], "loss": h[-1]["loss"] if h else None,
            "val_psnr": next((r["val_psnr"] for r in reversed(h) if r.get("val_psnr") is not None), None)}


def machine() -> dict:
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def report(r: dict) -> str:
    lines = [f"{'budget':8} {'method':16} {'PSNR dB':>8} {'SSIM 3D':>8} {'slice PSNR med':>15}"]
    for tag, b in r["budgets"].items():
        for name, s in b["summary"].items():
            lines.append(f"{tag:8} {name:16} {s['psnr']:8.2f} {s['ssim_3d'] or float('nan'):8.4f} "
                         f"{s['slice_psnr_median']:15.2f}")
        lines.append(f"{tag:8} calibration_2std of the K-sample std: {b['calibration_2std']:.3f}")
    lines.append("seconds: " + json.dumps(r["seconds"]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
