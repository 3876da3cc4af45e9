"""Quality benchmark on real volumes: our models vs oracle Gaussian, BM4D+GAT, CARE and the default model, same crops.

    nice -n 10 python benchmarks/quality.py [--volumes rbc,cho,phantom] [--photons 3,10,30] [--iterations 2000]
        [--preset small-2d] [--patch 1 96 96] [--methods raw,gaussian,bm4d,care,regression,ddpm,ancestral,default]
        [--quick] [--out runs/quality] [--cluster local|cuda]

Per volume, a training part and a disjoint evaluation crop are written as OME-Zarr (tifffile → `volrestore convert`);
the crop is degraded with `volrestore degrade` at each photon level; our models are trained with `volrestore train`
on the training part and run with `volrestore restore`, exactly as a user would (commands are printed as they run).
Baselines that need no CLI (oracle Gaussian, BM4D) run in-process; CARE (CAREamics) runs in its own venv through
benchmarks/care_runner.py, because careamics pins a torch the project's environment must not get. Every method is
scored by volrestore.evaluation.metrics on the same crop against the clean crop. Everything is cached under --out keyed by its
parameters, so a rerun only computes what is missing. Writes OUT/results.md, OUT/results.json, OUT/quality.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from volrestore.evaluation import metrics
from volrestore.io import ngff
from volrestore.simulate import synthetic

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
READ = 1.5  # read noise, photons
# Training degradation of our models: photons log-uniform in [3, 30] per patch. Set RANGE_OK = False (or let the
# automatic fallback do it when the CLI rejects a range) to train at the fixed FALLBACK level instead.
TRAIN_DEGRADE = f"poisson:photons=3-30,read={READ}"
FALLBACK_DEGRADE = f"poisson:photons=10,read={READ}"
RANGE_OK = True
DIFFUSION_OBJECTIVE = None  # None: the preset's own (diffusion) objective
DEFAULT_PRESET, QUICK_PRESET = "tiny-2.5d", "tiny-2d"
SIGMAS = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
KS, QUICK_KS = (1, 4, 8), (2,)
ANCESTRAL_STEPS, QUICK_ANCESTRAL_STEPS = 200, 5
QUICK_PHOTONS, QUICK_ITERATIONS = "10", 20  # --quick: one level, a smoke test of every step, not of quality
DEFAULT_K, QUICK_DEFAULT_K = 4, 2
DEFAULT_TTA = 16  # default_tta: the shipped regression averaged over its 8 lateral flips/turns x z flip (2.5D)
RESTORE_WORKERS = 1  # the crops are one write-block each; a second worker would only compete for the 2 cores
CAREAMICS = "careamics==0.3.5"
# careamics 0.3.5 declares torch<2.14 / torchvision<=0.26, but the torch this machine serves is 2.14.1: careamics is
# installed without its deps and its other requirements separately, so pip never replaces these pins.
TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")
CARE_BATCH = 8  # CARE's U-Net has BatchNorm; CAREamics warns below 8. More data per step than ours: in CARE's favour.
# CARE's usual 3D / 2D patches. On a CPU its 3D steps are ~10x ours (batch 8 of 16x64x64 through a 3D U-Net).
CARE_PATCH_3D, CARE_PATCH_2D = (16, 64, 64), (128, 128)
QUICK_CARE_PATCH_3D, QUICK_CARE_PATCH_2D = (8, 32, 32), (64, 64)
CARE_EPOCHS, QUICK_CARE_EPOCHS = 10, 2  # validation / LR-plateau checks spread over the steps
CARE_COPIES = 8  # noisy copies of the training part (photons drawn as ours are) that CARE trains on
FIGURE = ("rbc", 10)  # volume and photon level of quality.png (else the first computed)

# Eval crops: ~65k voxels, the most a 2-core CPU affords at ~1900 network evaluations per voxel and photon level
# (K=1+4+8 at 20 steps, ancestral 200 x K=8, default K=4): measured on the shared box with tiny-2d, ~1.7e3 voxels/s
# per sample at 20 steps, the ancestral row alone is ~1 h per level there (minutes on a GPU). z >= 11 keeps the 3D
# SSIM window (11 taps) inside the crop; CHO has 5 planes, so its SSIM is the 2D mean over z.
RBC = DATA / "RBC_lattice.tif"  # (150, 118, 209) z, y, x lattice light-sheet
CHO = DATA / "Fluo-N3DH-CHO_02_img.tif"  # (20, 5, 443, 512) t, z, y, x
CROPS = {
    "rbc": {"train": (slice(0, 96),), "eval": (slice(112, 128), slice(40, 104), slice(80, 144))},
    "cho": {"train_t": range(0, 12), "t": 19, "eval": (slice(None), slice(208, 304), slice(336, 432))},
    # The same frames summed over 2 x 2 pixels (0.4 um): the 8-bit CHO reference is itself an acquisition of about 56
    # photons at its 99.9th percentile (metrics.shot_noise_photons), so "30 photons" degrades it only to an effective
    # 1 / (1/30 + 1/56) = 20 and a restoration is scored against a reference nearly as noisy as its input; binned, the
    # reference has ~4x the photons. The crop covers the unbinned eval crop's cells and their surroundings.
    "cho_bin2": {"train_t": range(0, 12), "t": 19, "bin": 2, "eval": (slice(None), slice(80, 176), slice(144, 240))},
    "phantom": {"train_seed": 8001, "train_shape": (32, 128, 128), "eval_seed": 8002, "eval_shape": (16, 64, 64)},
}
QUICK_CROPS = {
    "rbc": {"train": (slice(0, 48), slice(0, 64), slice(0, 96)),
            "eval": (slice(112, 128), slice(40, 88), slice(80, 128))},
    "cho": {"train_t": range(0, 2), "t": 19, "eval": (slice(None), slice(208, 272), slice(336, 400))},
    "cho_bin2": {"train_t": range(0, 2), "t": 19, "bin": 2, "eval": (slice(None), slice(96, 160), slice(160, 224))},
    "phantom": {"train_seed": 8001, "train_shape": (16, 64, 96), "eval_seed": 8002, "eval_shape": (16, 48, 48)},
}
METHODS = ("raw", "gaussian", "bm4d", "care", "regression", "finetune", "ddpm", "ancestral", "default",
           "default_tta")
EXTRA_METHODS = ("default_ddpm8", "default_1step")  # only when asked for
SHIPPED_ONLY = ("default_regression", "default_ddpm")  # one of the two runs "default" asks for
ORDER = ("raw", "gaussian", "bm4d", "care", "regression", "finetune", *(f"ddpm{k}" for k in sorted({*KS, *QUICK_KS})),
         "ancestral", "default", "default_ddpm", "default_ddpm8", "default_1step", "default_tta")


def key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


# Trained models and their restorations are also keyed by volrestore's source: a cached result of other code would
# silently report numbers the current code cannot reproduce.
CODE_KEY = hashlib.sha1(b"".join(f.read_bytes() for f in sorted((ROOT / "src" / "volrestore").rglob("*.py")))
                        ).hexdigest()[:10]
DEGRADE_KEY = hashlib.sha1((ROOT / "src" / "volrestore" / "simulate" / "degrade.py").read_bytes()).hexdigest()[:6]
CARE_RUNNER_KEY = hashlib.sha1((ROOT / "benchmarks" / "care_runner.py").read_bytes()).hexdigest()[:6]  # CARE's cache


def photon_range(spec: str) -> tuple[float, float]:
    """(lo, hi) of 'photons=LO-HI' in a degradation spec (lo = hi for a fixed level)."""
    lo, _, hi = re.search(r"photons=([^,]+)", spec).group(1).partition("-")
    return float(lo), float(hi or lo)


def sh(cmd: list[str], log: Path | None = None, check: bool = True) -> tuple[int, str, float]:
    """Run a command, printing it first; returns (rc, combined output, wall s). Output goes to `log` when given."""
    print("$ " + shlex.join(str(c) for c in cmd), flush=True)
    t0 = time.perf_counter()
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    out = p.stdout + p.stderr
    if log:
        log.write_text(out)
    lines = [ln for ln in out.splitlines() if ln.strip() and "dashboard" not in ln.lower()]
    tail = ([ln for ln in lines if ln.startswith("error:")]
            or ([ln.strip() for ln in lines if "Value error" in ln or ln.startswith("pydantic")][:1] if p.returncode
                else [])  # a validation error's first cause, not pydantic's link line
            or [ln for ln in lines if re.match(r"(wrote|restored|trained|\{)", ln) or "complete:" in ln] or lines[-1:])
    print("  " + (tail[-1] if tail else "") + f"  [{wall:.1f} s, rc {p.returncode}]", flush=True)
    if check and p.returncode:
        raise RuntimeError(tail[-1] if tail else f"rc {p.returncode}")
    return p.returncode, out, wall


def complete(path: Path) -> bool:
    try:
        return bool(ngff.read_info(path).complete)
    except Exception:
        return False


def read(path: Path) -> np.ndarray:
    return np.asarray(ngff.open_level(path, 0)[...], np.float64)


def to_zarr(array: np.ndarray, path: Path) -> Path:
    """tifffile-written stack → OME-Zarr through the CLI (what a user with a TIFF does)."""
    import tifffile

    if not complete(path):
        tif = path.with_suffix("").with_suffix(".tif")
        tifffile.imwrite(tif, array)
        sh(["volrestore", "convert", tif, path, "--overwrite", "--levels", "1"])
    return path


# ---- data ------------------------------------------------------------------------------------------------------

def prepare(name: str, crops: dict, work: Path) -> dict:
    """Clean training part and clean eval crop of one volume as OME-Zarr (cached by the crop constants)."""
    c = crops[name]
    d = work / f"{name}-{key(name, repr(c))}"
    d.mkdir(parents=True, exist_ok=True)
    train, ev = d / "clean_train.ome.zarr", d / "clean_eval.ome.zarr"
    if not (complete(train) and complete(ev)):
        if name == "phantom":
            tr = synthetic.phantom(c["train_shape"], seed=c["train_seed"])
            e = synthetic.phantom(c["eval_shape"], seed=c["eval_seed"])
        elif name == "rbc":
            import tifffile

            vol = tifffile.imread(RBC)
            tr, e = vol[c["train"]], vol[c["eval"]]
        elif name in ("cho", "cho_bin2"):
            import tifffile

            vol = tifffile.imread(CHO)
            if c.get("bin", 1) > 1:
                vol = bin_lateral(vol, c["bin"])
            # Training takes one time point per image: the training frames go side by side along y (a patch across a
            # seam sees two frames, ~patch/443 of patches), the eval frame is a later, unseen time point.
            tr = np.concatenate([vol[t] for t in c["train_t"]], axis=1)
            e = vol[c["t"]][c["eval"]]
        else:
            raise SystemExit(f"unknown volume {name!r}: use {', '.join(CROPS)}")
        to_zarr(np.ascontiguousarray(tr), train)
        to_zarr(np.ascontiguousarray(e), ev)
    return {"name": name, "dir": d, "train": train, "eval": ev}


def bin_lateral(vol: np.ndarray, n: int) -> np.ndarray:
    """Sum n x n pixel squares in the last two axes (the edge rows/columns that do not fill a square are dropped):
    the signal adds up n^2-fold, its shot noise only n-fold, as for a camera binning on chip. uint16 holds it."""
    y, x = (vol.shape[-2] // n) * n, (vol.shape[-1] // n) * n
    v = vol[..., :y, :x].astype(np.uint32).reshape(*vol.shape[:-2], y // n, n, x // n, n).sum(axis=(-3, -1))
    return v.astype(np.uint16)


def noisy(vol: dict, photons: float) -> Path:
    out = vol["dir"] / f"noisy_p{photons:g}-{DEGRADE_KEY}.ome.zarr"
    if not complete(out):
        sh(["volrestore", "degrade", vol["eval"], out, "--spec",
            f"poisson:photons={photons:g},read={READ},seed={100 + int(photons * 10)}", "--overwrite"])
    return out


def reference_intensity(clean: np.ndarray) -> float:
    """The photon reference `volrestore degrade` uses: the clean image's 99.9th percentile, its histogram rule."""
    return metrics.blockwise_percentiles(lambda: iter([clean]), q=(99.9,))[2][0]


# ---- scoring ---------------------------------------------------------------------------------------------------

def reference_noise(truth: np.ndarray) -> tuple[float, float]:
    """(photons of the reference's own shot noise at its 99.9th percentile, the PSNR its noise-free signal would
    score against it): a real "clean" crop is an acquisition, and no restoration that removes noise can score above
    that ceiling (its expected MSE is the reference's noise variance, from metrics.shot_noise_fit per voxel)."""
    gain, intercept = metrics.shot_noise_fit(truth)
    variance = np.clip(gain * ndimage.uniform_filter(truth, (1, 3, 3)) + intercept, 0, None).mean()
    _, scale = metrics.normalisation(truth)
    return (metrics.photons_at(gain, intercept, float(np.percentile(truth, 99.9))),
            metrics.psnr_from_mse(float(variance) / scale**2))


def score(pred: np.ndarray, truth: np.ndarray) -> dict:
    out = {"psnr": metrics.psnr(pred, truth)}
    if min(truth.shape) >= 2 * metrics.SSIM_MARGIN + 1:
        out["ssim"] = metrics.ssim(pred, truth)
    else:  # too few planes for the 11-tap 3D window: mean 2D SSIM over z, in the volume's percentile range
        off, scale = metrics.normalisation(truth)
        m = metrics.SSIM_MARGIN
        out["ssim"] = float(np.mean([metrics.ssim_map((p - off) / scale, (t - off) / scale)[m:-m, m:-m].mean()
                                     for p, t in zip(pred, truth)]))
    return out


# ---- baselines in-process ------------------------------------------------------------------------------------------

def oracle_gaussian(x: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, str, float]:
    """Best σ by PSNR against the truth (no user could pick it this well): isotropic 3D and lateral-only."""
    best = None
    for kind in ("3D", "2D"):
        for s in SIGMAS:
            sigma = (s, s, s) if kind == "3D" else (0, s, s)
            t0 = time.perf_counter()
            y = ndimage.gaussian_filter(x, sigma)
            dt = time.perf_counter() - t0
            p = metrics.psnr(y, truth)
            if best is None or p > best[0]:
                best = (p, y, f"σ={s:g} {kind}", dt)
    return best[1], best[2], best[3]


def gat(z: np.ndarray, sigma: float) -> np.ndarray:
    # Generalized Anscombe transform for z = Poisson(λ) + N(0, σ²) in photon units (gain 1, no offset), Starck,
    # Murtagh & Bijaoui 1998 / Mäkitalo & Foi 2013 eq. (2): f(z) = 2·sqrt(max(z + 3/8 + σ², 0)); noise std ≈ 1.
    return 2.0 * np.sqrt(np.maximum(z + 3.0 / 8.0 + sigma**2, 0.0))


def inverse_gat(d: np.ndarray, sigma: float) -> np.ndarray:
    # Closed-form approximation of the exact unbiased inverse (Mäkitalo & Foi, IEEE TIP 22(1) 2013, eq. (21)):
    # I(D) = D²/4 + (1/4)√(3/2) D⁻¹ − (11/8) D⁻² + (5/8)√(3/2) D⁻³ − 1/8 − σ², clipped at 0. Below D ≈ 1 the series
    # turns upwards (its D⁻³ term), although the exact inverse there is 0, so D is floored at 1 first.
    d = np.maximum(d, 1.0)
    a = math.sqrt(1.5)
    return np.maximum(d**2 / 4 + a / 4 / d - 11 / 8 / d**2 + 5 * a / 8 / d**3 - 1 / 8 - sigma**2, 0.0)


def bm4d_gat(x: np.ndarray, photons: float, ref: float) -> np.ndarray:
    """BM4D on the variance-stabilised image: `volrestore degrade` draws Poisson(clean·P/ref) + N(0, read²) and
    divides by P/ref (no offset), so multiplying by that gain gives back photon units exactly."""
    import bm4d

    gain = photons / ref
    d = bm4d.bm4d(gat(x * gain, READ).astype(np.float32), 1.0)
    return inverse_gat(np.asarray(d, np.float64), READ) / gain


# ---- CARE (own venv) -------------------------------------------------------------------------------------------

def care_python(work: Path, install: bool) -> tuple[Path | None, str]:
    venv = work / "care-venv"
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([py, "-c", "import careamics"], capture_output=True).returncode == 0:
        return py, ""
    if not install:
        return None, "--quick does not install the CARE venv; run once without --quick"
    log = work / "care-venv-install.log"
    reqs = venv / "careamics-requirements.txt"
    print(f"creating {venv} for CAREamics (minutes; log {log})", flush=True)
    steps = [[sys.executable, "-m", "venv", venv],
             [py, "-m", "pip", "install", *TORCH_PINS],
             [py, "-m", "pip", "install", "--no-deps", CAREAMICS],
             [py, "-c", "import importlib.metadata as m, re, sys\n"
                        "for r in m.requires('careamics') or []:\n"
                        "    n = re.match(r'[A-Za-z0-9_.-]+', r).group().lower()\n"
                        "    if 'extra ==' not in r and n not in ('torch', 'torchvision'): print(r)\n"
                        f"print({TORCH_PINS[0]!r}); print({TORCH_PINS[1]!r})"],
             [py, "-m", "pip", "install", "-r", reqs]]
    with open(log, "w") as f:
        for i, cmd in enumerate(steps):
            shown = cmd if i != 3 else [py, "-c", "<careamics's requirements without torch/torchvision, plus the pins>"]
            print("$ " + shlex.join(str(c) for c in shown), flush=True)
            p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
            f.write(p.stdout + p.stderr)
            if p.returncode:
                last = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()][-1:] or [f"rc {p.returncode}"]
                return None, f"venv install failed: {last[0][:120]}"
            if i == 3:
                reqs.write_text(p.stdout)
    return py, ""


def care(vol: dict, photons: list[float], noisy_paths: dict, args, py: Path) -> dict:
    """Train CARE once per volume on CARE_COPIES noisy copies of the training part, predict every photon level."""
    train_clean = read(vol["train"]).astype(np.float32)
    p3, p2 = (QUICK_CARE_PATCH_3D, QUICK_CARE_PATCH_2D) if args.quick else (CARE_PATCH_3D, CARE_PATCH_2D)
    dims = 3 if train_clean.shape[0] >= p3[0] and read(vol["eval"]).shape[0] >= 8 else 2
    if args.care_dims:
        dims = args.care_dims
    want = p3 if dims == 3 else p2
    epochs = QUICK_CARE_EPOCHS if args.quick else CARE_EPOCHS
    extent = train_clean.shape[-dims:]
    patch = [2 ** int(math.log2(min(w, e))) for w, e in zip(want, extent)]  # CAREamics wants powers of 2
    patch[-2:] = [min(patch[-2:])] * 2  # ... and the same size in y and x (RBC's training part is 118 x 209)
    spec = TRAIN_DEGRADE if RANGE_OK else FALLBACK_DEGRADE
    tag = key(dims, args.iterations, patch, CARE_BATCH, CARE_COPIES, epochs, spec, CAREAMICS, TORCH_PINS, DEGRADE_KEY,
              CARE_RUNNER_KEY)
    d = vol["dir"] / f"care-{tag}"
    d.mkdir(exist_ok=True)
    outs = {p: d / f"pred_p{p:g}.npy" for p in photons}
    meta = d / "meta.json"
    info = json.loads(meta.read_text()) if meta.exists() else {}
    if all(o.exists() for o in outs.values()) and info:
        return {"outs": outs, **info}
    rng = np.random.default_rng(7)
    xs = []
    for i in range(CARE_COPIES):
        # The photon draw our training uses (log-uniform over the range, or the fixed fallback level).
        lo, hi = photon_range(spec)
        p = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        out = d / f"train_noisy_{i}.ome.zarr"
        if not complete(out):
            sh(["volrestore", "degrade", vol["train"], out, "--spec", f"poisson:photons={p:.4g},read={READ},seed={i}",
                "--overwrite"])
        xs.append(read(out).astype(np.float32))
    # One more copy (its own seed) is CAREamics's validation set (best-checkpoint choice, LR plateau): its own split
    # of patches off the training set fails on small volumes (it draws more patches than an image's grid holds).
    val = d / "val_noisy.ome.zarr"
    if not complete(val):
        sh(["volrestore", "degrade", vol["train"], val, "--spec",
            f"poisson:photons={math.sqrt(lo * hi):.4g},read={READ},seed={CARE_COPIES}", "--overwrite"])
    rows = slice(0, max(patch[-2], 256))  # a 256-row band is plenty to rank checkpoints
    np.save(d / "x.npy", np.stack(xs))
    np.save(d / "y.npy", np.stack([train_clean] * CARE_COPIES))
    np.save(d / "vx.npy", read(val).astype(np.float32)[..., rows, :][None])
    np.save(d / "vy.npy", train_clean[..., rows, :][None])
    cmd = [py, ROOT / "benchmarks" / "care_runner.py", "--train-x", d / "x.npy", "--train-y", d / "y.npy",
           "--val-x", d / "vx.npy", "--val-y", d / "vy.npy",
           "--dims", str(dims), "--patch", "x".join(map(str, patch)), "--batch", str(CARE_BATCH),
           "--steps", str(args.iterations), "--epochs", str(epochs), "--workdir", d / "work"]
    for p in photons:
        np.save(d / f"in_p{p:g}.npy", read(noisy_paths[p]).astype(np.float32))
        cmd += ["--predict", d / f"in_p{p:g}.npy", outs[p]]
    _, out, _ = sh(cmd, log=d / "care.log")
    res = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    info = {"dims": dims, "patch": patch, "train_s": res["train_s"], "steps": res["steps"],
            "predict_s": {f"{p:g}": s for p, s in zip(photons, res["predict_s"])}}
    meta.write_text(json.dumps(info))
    return {"outs": outs, **info}


# ---- ours (CLI) ------------------------------------------------------------------------------------------------

def patch_for(vol: dict, args, preset=None) -> str:
    """The preset's patch, shrunk to the training part (multiples of the net's size multiple)."""
    if args.patch:
        return [int(v) for v in args.patch]
    from volrestore.model import nets

    cfg = nets.load_preset(preset or args.preset)
    levels = len(cfg["channel_mult"]) if "channel_mult" in cfg else len(cfg["channels"])
    m = 2 ** (levels - 1)
    dims = int(cfg["spatial_dims"])
    want = cfg.get("train", {}).get("patch") or ([16, 64, 64] if dims == 3 else [96, 96])
    extent = ngff.read_info(vol["train"]).levels[0].shape[-dims:]
    patch = [max(m, min(w, e) // m * m) for w, e in zip(want, extent)]
    return patch if dims == 3 else [1, *patch]


def default_preset() -> str:
    """The shipped default regression's network preset (what `train --init default` fine-tunes)."""
    from volrestore.model.checkpoint import load_checkpoint
    from volrestore.model.diffusion_restorer import default_model_path

    return load_checkpoint(default_model_path("regression"))["preset"]["name"]


def train_model(vol: dict, objective: str | None, args) -> tuple[Path, dict]:
    """Our model trained on the volume's training part: objective "finetune" starts from the shipped default
    regression (`train --init default`, its network), the others from fresh weights of --preset."""
    global RANGE_OK
    tune = objective == "finetune"
    preset = default_preset() if tune else args.preset
    for _ in range(2):
        spec = TRAIN_DEGRADE if RANGE_OK else FALLBACK_DEGRADE
        patch = patch_for(vol, args, preset)
        label = objective or "preset"
        parts = (preset, objective, args.iterations, patch, spec, CODE_KEY) + (
            (args.condition,) if args.condition != "none" and not tune else ())  # blind models' keys stay as they were
        out = vol["dir"] / f"model-{label}-{key(*parts)}.pt"
        meta = out.with_suffix(".json")
        if out.exists() and meta.exists():
            return out, json.loads(meta.read_text())
        cmd = ["volrestore", "train", "--target", vol["train"], "--degrade", spec,
               *(["--init", "default"] if tune else ["--preset", args.preset]),
               "--iterations", str(args.iterations), "--patch", *map(str, patch), "--val-fraction", "0", "--out", out,
               "--overwrite", "--cluster", args.cluster]
        if objective and not tune:
            cmd += ["--objective", objective]
        if args.condition != "none" and objective == "regression":
            cmd += ["--condition", args.condition]  # restore measures the level on each noisy input
        # --val-fraction 0: the evaluation crop is a separate, disjoint region; a held-out y band of the training
        # part would have to be a whole patch tall and would take most of these small volumes.
        rc, text, wall = sh(cmd, log=out.with_suffix(".log"), check=False)
        if rc and RANGE_OK and "photons" in text and ("parse" in text or "degradation" in text):
            print(f"  the CLI rejects a photon range: training at {FALLBACK_DEGRADE} instead", flush=True)
            RANGE_OK = False
            continue
        if rc:
            raise RuntimeError([ln for ln in text.splitlines() if ln.startswith("error:")][-1:] or f"train rc {rc}")
        info = {"train_s": wall, "degrade": spec, "patch": patch, "objective": label,
                "preset": f"default ({preset}) fine-tuned" if tune else args.preset}
        meta.write_text(json.dumps(info))
        return out, info
    raise RuntimeError("training failed")


def _share(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def std_scale_of(out: Path) -> list | None:
    """The (factor, floor) restore fitted to the samples' spread (recorded; None in outputs made before it existed,
    a single number in those of the first, factor-only version)."""
    from volrestore.io import ngff

    return ngff.read_info(str(out)).provenance["parameters"]["model"]["options"].get("std_scale")


def raw_spread(std: np.ndarray, scale) -> np.ndarray | None:
    """The samples' own spread behind a fitted std = sqrt((factor spread)² + floor²), `scale` = (factor, floor):
    inverted per voxel (exact where one tile covers it); None where the factor is 0 (the spread is gone)."""
    factor, floor = scale
    return np.sqrt(np.maximum(std ** 2 - floor ** 2, 0.0)) / factor if factor > 0 else None


def restore(noisy_path: Path, model: str, tag: str, *, samples=None, sampler=None, steps=None, std=False,
            cluster="local", tta=None, blend=None):
    """`volrestore restore`; returns (output path, std path or None, wall s), cached next to the input by tag."""
    out = noisy_path.parent / f"{noisy_path.name[:-len('.ome.zarr')]}-{tag}.ome.zarr"
    std_path = out.parent / out.name.replace(".ome.zarr", ".std.ome.zarr")
    meta = out.parent / (out.name + ".json")
    # a std written before the std was fitted on the image (no (factor, floor) recorded) is made again
    if not (complete(out) and meta.exists() and (not std or (complete(std_path) and
                                                             isinstance(std_scale_of(out), list)))):
        cmd = ["volrestore", "restore", noisy_path, out, "--model", model, "--overwrite", "--cluster", cluster]
        if cluster == "local":
            cmd += ["--workers", str(RESTORE_WORKERS)]
        for flag, v in (("--samples", samples), ("--sampler", sampler), ("--steps", steps), ("--tta", tta),
                        ("--blend", blend)):
            if v is not None:
                cmd += [flag, str(v)]
        if std:
            cmd.append("--std")
        _, _, wall = sh(cmd)
        meta.write_text(json.dumps({"wall_s": wall}))
    wall = json.loads(meta.read_text())["wall_s"]
    return out, (std_path if std else None), wall


# ---- run, tables, goals, figure -----------------------------------------------------------------------------------

def run_volume(name: str, args, crops, install_care: bool) -> dict:
    vol = prepare(name, crops, args.out)
    truth = read(vol["eval"])
    noisy_paths = {p: noisy(vol, p) for p in args.photons}
    tables = {f"{p:g}": [] for p in args.photons}
    ks = QUICK_KS if args.quick else KS
    kmax = max(ks)

    def add(p, method, label, path=None, pred=None, t=None, note="", std_path=None, failed=None):
        """One table row; `path` is where the figure finds the image (an OME-Zarr or .npy)."""
        row = {"method": method, "label": label, "note": note, "time_s": t}
        if failed:
            row["failed"] = failed
        else:
            pred = (read(path) if pred is None else pred).astype(np.float64)
            row.update(score(pred, truth))
            if std_path is not None:
                std, scale = read(std_path).astype(np.float64), std_scale_of(path)
                row["calibration"] = metrics.calibration(pred, std, truth)
                # the samples' raw spread as well (restore fitted the std with SURE)
                spread = raw_spread(std, scale)
                row["std_scale"] = list(scale)
                row["calibration_raw"] = None if spread is None else metrics.calibration(pred, spread, truth)
                row["std_path"] = str(std_path)
            row["path"] = str(path)
        tables[f"{p:g}"].append(row)
        print(f"  [{name} P={p:g}] {label}: " + (f"failed: {failed}" if failed else
              f"PSNR {row['psnr']:.2f} SSIM {row['ssim']:.4f}" + (
                  f" cal {row['calibration']:.3f} (raw spread {_share(row['calibration_raw'])}, std fit "
                  f"{row['std_scale']})"
                  if "calibration" in row else "")), flush=True)

    def cached(p, method, compute, params):
        """In-process baselines: result .npy + its note/time, keyed by the parameters that change it."""
        stem = vol["dir"] / f"p{p:g}-{method}-{key(params, DEGRADE_KEY)}"
        f, npy = stem.with_suffix(".json"), stem.with_suffix(".npy")
        if not (f.exists() and npy.exists()):
            pred, note, t = compute()
            np.save(npy, pred.astype(np.float32))
            f.write_text(json.dumps({"note": note, "time_s": t}))
        return npy, json.loads(f.read_text())

    ref = reference_intensity(truth)
    for p in args.photons:
        x = read(noisy_paths[p])
        if "raw" in args.methods:
            add(p, "raw", "raw (degraded input)", path=noisy_paths[p])
        for method, fn, params in (
                ("gaussian", lambda: oracle_gaussian(x, truth), SIGMAS),
                ("bm4d", lambda: _timed(lambda: bm4d_gat(x, p, ref), f"sigma 1 on GAT, gain P/ref = {p:g}/{ref:.4g}"),
                 READ)):
            if method in args.methods:
                npy, info = cached(p, method, fn, params)
                label = "oracle Gaussian" if method == "gaussian" else "BM4D + GAT"
                add(p, method, label, path=npy, pred=np.load(npy), t=info["time_s"], note=info["note"])

    runs = []  # (method, label, model objective, restore options)
    if "regression" in args.methods:
        runs.append(("regression", "ours regression", "regression", {}))
    if "finetune" in args.methods:
        runs.append(("finetune", "ours fine-tuned default (train --init default)", "finetune", {}))
    if "ddpm" in args.methods:
        for k in ks:
            runs.append((f"ddpm{k}", f"ours DDPM-avg K={k} (fast sampler)", DIFFUSION_OBJECTIVE,
                         {"samples": k, "std": k == kmax}))
    if "ancestral" in args.methods:
        steps = QUICK_ANCESTRAL_STEPS if args.quick else ANCESTRAL_STEPS
        runs.append(("ancestral", f"ours DDPM-avg K={kmax} ancestral {steps}", DIFFUSION_OBJECTIVE,
                     {"samples": kmax, "sampler": "ancestral", "steps": steps, "std": True}))
    models = {}
    for method, label, objective, opts in runs:
        obj = objective or "preset"
        if obj not in models:
            try:
                models[obj] = train_model(vol, objective, args)
            except Exception as exc:
                models[obj] = (None, str(exc)[:160])
        model, info = models[obj]
        for p in args.photons:
            if model is None:
                add(p, method, label, failed=f"training failed: {info}")
                continue
            try:
                tag = f"{method}-{key(model.name, opts)}"
                out, std_path, wall = restore(noisy_paths[p], str(model), tag, cluster=args.cluster, **opts)
                add(p, method, label, path=out, std_path=std_path, t=wall,
                    note=f"{info['preset']}, train {info['train_s']:.0f} s ({info['degrade'].split(',')[0]})")
            except Exception as exc:
                add(p, method, label, failed=str(exc)[:160])
    k = QUICK_DEFAULT_K if args.quick else DEFAULT_K
    # What `restore IN OUT` gives (the shipped regression), the shipped diffusion model's K-sample average and the
    # regression averaged over its flips and turns; "default" asks for the first two (the README's columns).
    shipped_runs = (("default", "regression", {}, "shipped default (regression)", {"default", "default_regression"}),
                    ("default_ddpm", "diffusion", {"samples": k}, f"shipped default-diffusion K={k}",
                     {"default", "default_ddpm"}),
                    ("default_tta", "regression", {"tta": DEFAULT_TTA},
                     f"shipped default (regression), --tta {DEFAULT_TTA}", {"default_tta"}),
                    # the diffusion model's K = 8 average and its one-evaluation answer: DDIM's single step from
                    # sigma_max is the denoiser's estimate of the posterior mean, what a distilled student would learn
                    ("default_ddpm8", "diffusion", {"samples": 8}, "shipped default-diffusion K=8",
                     {"default_ddpm8"}),
                    ("default_1step", "diffusion", {"steps": 1},
                     "shipped default-diffusion, 1 DDIM step (1 evaluation)", {"default_1step"}))
    from volrestore.model.diffusion_restorer import default_model_path

    for method, kind, opts, label, asked_by in shipped_runs:
        if not asked_by & set(args.methods):
            continue
        path = default_model_path(kind)
        if path.exists():
            h = hashlib.sha1(path.read_bytes()).hexdigest()[:10]
            for p in args.photons:
                try:
                    spread = opts.get("samples", 1) > 1  # the K samples' std: calibration and the figure's panel
                    out, std_path, wall = restore(noisy_paths[p], f"default-{kind}",
                                                  f"{method}-{key(h, opts, CODE_KEY)}", cluster=args.cluster,
                                                  std=spread, **opts)
                    add(p, method, label, path=out, t=wall, note="not trained on this volume", std_path=std_path)
                except Exception as exc:
                    add(p, method, label, failed=str(exc)[:160])
    # CARE last: our training finds out first whether the CLI takes a photon range, and CARE copies that.
    if "care" in args.methods:
        py, why = care_python(args.base, install_care)
        res = None
        if py is not None:
            try:
                res = care(vol, args.photons, noisy_paths, args, py)
            except Exception as exc:  # never let the baseline take the whole benchmark down
                why = f"failed: {str(exc)[:120]}"
        for p in args.photons:
            if res:
                add(p, "care", f"CARE (CAREamics {res['dims']}D)", path=res["outs"][p], pred=np.load(res["outs"][p]),
                    t=res["predict_s"][f"{p:g}"], note=f"train {res['train_s']:.0f} s, {res['steps']} steps, "
                                                     f"patch {'x'.join(map(str, res['patch']))}")
            else:
                add(p, "care", "CARE (CAREamics)", failed=f"unavailable ({why})")

    for rows in tables.values():
        rows.sort(key=lambda r: ORDER.index(r["method"]) if r["method"] in ORDER else len(ORDER))
    # The reference's own shot noise (inf for noiseless phantoms): a restoration is scored against it, noise and all.
    own, ceiling = reference_noise(truth) if name != "phantom" else (math.inf, math.inf)
    return {"dir": str(vol["dir"]), "shape": list(truth.shape), "reference_intensity": ref,
            "reference_photons": own, "reference_ceiling_psnr": ceiling, "tables": tables,
            "truth": str(vol["eval"]), "ssim_kind": "3D" if min(truth.shape) >= 11 else "2D mean over z"}


def _timed(fn, note):
    t0 = time.perf_counter()
    y = fn()
    return y, note, time.perf_counter() - t0


def markdown(results: dict) -> str:
    lines = []
    for name, r in results["volumes"].items():
        for p, rows in r["tables"].items():
            own = r.get("reference_photons", math.inf)
            ref_note = "" if math.isinf(own) else (
                f"; the reference itself ≈ {own:.0f} photons, so the input has ≈ {1 / (1 / float(p) + 1 / own):.1f} "
                f"photons of noise on the reference's signal, and that signal would score "
                f"{r.get('reference_ceiling_psnr', math.nan):.1f} dB")
            lines += [f"### {name} — {p} photons (crop {'×'.join(map(str, r['shape']))}, SSIM {r['ssim_kind']}"
                      f"{ref_note})", "",
                      "| method | PSNR dB | SSIM | time s | calibration | note |",
                      "| --- | ---: | ---: | ---: | ---: | --- |"]
            for row in rows:
                if "failed" in row:
                    lines.append(f"| {row['label']} | — | — | — | — | {row['failed']} |")
                    continue
                t = row.get("time_s")
                t = "—" if t is None else f"{t:.1f}" if t >= 1 else f"{t:.2f}"
                c = (f"{row['calibration']:.3f} (raw {_share(row['calibration_raw'])}, factor, floor {row['std_scale']})"
                     if "calibration" in row else "")
                lines.append(f"| {row['label']} | {row['psnr']:.2f} | {row['ssim']:.4f} | {t} | {c} | {row['note']} |")
            lines.append("")
    return "\n".join(lines)


def goals(results: dict, kmax: int) -> list[str]:
    out = []
    for name, r in results["volumes"].items():
        for p, rows in r["tables"].items():
            m = {row["method"]: row for row in rows if "failed" not in row}
            ran = {row["method"] for row in rows}
            k8, reg, tuned = m.get(f"ddpm{kmax}"), m.get("regression"), m.get("finetune")
            base = [m[b]["psnr"] for b in ("bm4d", "gaussian") if b in m]
            where = f"{name} P={p}"

            def check(text, margin, needs):
                if margin is None:  # silent unless all of its methods were asked for (then one of them failed)
                    if set(needs) <= ran:
                        out.append(f"n/a   {where}: {text} (a row failed)")
                else:
                    out.append(f"{'PASS' if margin >= 0 else 'MISS'}  {where}: {text} "
                               f"(margin {margin:+.4g})")

            bar = max(base) + 1 if len(base) == 2 else None
            kk = f"ddpm{kmax}"
            for row, lab, meth in ((reg, "regression", "regression"), (tuned, "fine-tuned", "finetune"),
                                   (k8, f"K={kmax}", kk)):
                check(f"{lab} PSNR ≥ max(BM4D, oracle Gaussian) + 1 dB",
                      row["psnr"] - bar if row and bar is not None else None, (meth,))
                check(f"{lab} PSNR ≥ CARE", row["psnr"] - m["care"]["psnr"] if row and "care" in m else None,
                      (meth, "care"))
            check(f"K={kmax} SSIM ≥ regression", k8["ssim"] - reg["ssim"] if k8 and reg else None,
                  (kk, "regression"))
            check(f"K={kmax} PSNR ≥ regression − 0.3 dB", k8["psnr"] - reg["psnr"] + 0.3 if k8 and reg else None,
                  (kk, "regression"))
            anc = m.get("ancestral")
            if k8 and anc:
                dp, ds = k8["psnr"] - anc["psnr"], k8["ssim"] - anc["ssim"]
                check(f"fast K={kmax} within 0.1 dB of ancestral (Δ {dp:+.3f} dB)", 0.1 - abs(dp), ())
                check(f"fast K={kmax} within 0.005 SSIM of ancestral (Δ {ds:+.4f})", 0.005 - abs(ds), ())
            else:
                check("fast sampler vs ancestral", None, (kk, "ancestral"))
            for row, lab, meth in ((k8, f"K={kmax} fast", kk), (anc, "ancestral", "ancestral")):
                c = row.get("calibration") if row else None
                check(f"{lab} calibration {'' if c is None else f'{c:.3f} '}in [0.90, 0.98]",
                      None if c is None else min(c - 0.90, 0.98 - c), (meth,))
            d = m.get("default")
            g = m.get("gaussian")
            if float(p) >= 10:
                check("default ≥ oracle Gaussian + 1 dB", d["psnr"] - g["psnr"] - 1 if d and g else None,
                      ("default",))
                check("default ≥ BM4D", d["psnr"] - m["bm4d"]["psnr"] if d and "bm4d" in m else None, ("default",))
            else:
                check("default ≥ oracle Gaussian", d["psnr"] - g["psnr"] if d and g else None, ("default",))
    return out


def figure(results: dict, path: Path, kmax: int) -> str | None:
    from volrestore.evaluation.figures import _pyplot

    vols = results["volumes"]
    name, p = FIGURE[0], f"{FIGURE[1]:g}"
    if name not in vols:
        name = next(iter(vols))
    if p not in vols[name]["tables"]:
        p = next(iter(vols[name]["tables"]))
    rows = {row["method"]: row for row in vols[name]["tables"][p] if "failed" not in row}
    truth = read(Path(vols[name]["truth"]))
    load = lambda f: np.load(f) if f.endswith(".npy") else read(Path(f))  # noqa: E731
    # The run's own DDPM-avg, else the shipped diffusion model's (its K in the title); methods the run did not
    # compute get no panel, except CARE and the DDPM-avg with its std (n/a: failed or not run).
    ddpm = next((m for m in (f"ddpm{kmax}", "default_ddpm8", "default_ddpm") if m in rows), f"ddpm{kmax}")
    shipped = ddpm.startswith("default")
    ddpm_title = (rows[ddpm]["label"].replace("default-diffusion", "DDPM-avg") + ", untrained" if shipped
                  else f"DDPM-avg K={kmax}")
    panels = [("raw", "raw"), ("BM4D", "bm4d"), ("CARE", "care"), ("regression", "regression"),
              ("fine-tuned default", "finetune"), (ddpm_title, ddpm), ("truth", None), ("std", "std")]
    panels = [(t, m) for t, m in panels if m in (None, "std", "care", ddpm) or m in rows]
    lo, hi = np.percentile(truth, (0.1, 99.9))
    plt = _pyplot()
    z, y = truth.shape[0] // 2, truth.shape[1] // 2
    fig, axes = plt.subplots(2, len(panels), figsize=(2.2 * len(panels), 2.2 * (1 + truth.shape[0] / truth.shape[1])
                                                        + 0.6), dpi=120,
                             gridspec_kw={"height_ratios": [truth.shape[1], max(truth.shape[0], 4)]})
    for j, (title, m) in enumerate(panels):
        if m is None:
            img, own = truth, False
        elif m == "std":
            sp = rows.get(ddpm, {}).get("std_path")
            img, own = (read(Path(sp)) if sp else None), True
        else:
            img, own = (load(rows[m]["path"]) if m in rows else None), False
        for i, view in enumerate(("z", "xz")):
            ax = axes[i, j]
            ax.set_xticks([]), ax.set_yticks([])
            if img is None:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
                continue
            sl = img[z] if view == "z" else img[:, y]
            vmin, vmax = (0, np.percentile(img, 99.5)) if own else (lo, hi)
            ax.imshow(sl, cmap="magma" if own else "gray", vmin=vmin, vmax=vmax, interpolation="nearest",
                      aspect="auto")
        label = title if m in (None, "std") or rows.get(m) is None else f"{title}\n{rows[m]['psnr']:.2f} dB"
        axes[0, j].set_title(label, fontsize=8)
    axes[0, 0].set_ylabel(f"z = {z}", fontsize=8)
    axes[1, 0].set_ylabel(f"xz, y = {y}", fontsize=8)
    fig.suptitle(f"{name}, {p} photons (shared contrast from the truth; std own scale)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"{name} P={p}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", default="rbc,cho,phantom")
    ap.add_argument("--photons", default=None, help=f"photon levels [3,10,30; quick {QUICK_PHOTONS}]")
    ap.add_argument("--iterations", type=int, default=None, help="training steps of ours and CARE [2000; quick 20]")
    ap.add_argument("--preset", default=None, help=f"our network preset [{DEFAULT_PRESET}; quick {QUICK_PRESET}]")
    ap.add_argument("--patch", nargs=3, type=int, default=None, metavar=("Z", "Y", "X"),
                    help="training patch of ours, e.g. 1 96 96 [the preset's, fitted]")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=",".join(METHODS) + f" (or {' / '.join(SHIPPED_ONLY)}: one of default's two; also "
                    f"{', '.join(EXTRA_METHODS)})")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny crops, one photon level, 20 iterations, K=2, "
                    "CARE only if its venv exists")
    ap.add_argument("--care-dims", type=int, choices=(2, 3), default=None,
                    help="CARE's network: 3D where the volume allows [default], 2D (what a 2-core CPU affords)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "quality")
    ap.add_argument("--cluster", default="local", help="volrestore train/restore --cluster (cuda on a GPU machine)")
    ap.add_argument("--condition", default="none", choices=("none", "photons"),
                    help="our regression told each patch's noise level in training, measured on the image at restore")
    args = ap.parse_args()
    args.photons = [float(p) for p in (args.photons or (QUICK_PHOTONS if args.quick else "3,10,30")).split(",")]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = sorted(set(args.methods) - set(METHODS) - set(SHIPPED_ONLY) - set(EXTRA_METHODS))
    if bad:
        raise SystemExit(f"unknown method(s) {', '.join(bad)}: use {', '.join(METHODS)}")
    args.iterations = args.iterations or (QUICK_ITERATIONS if args.quick else 2000)
    args.preset = args.preset or (QUICK_PRESET if args.quick else DEFAULT_PRESET)
    args.base = args.out  # the CARE venv lives here, shared by quick and full runs
    args.out = (args.out / "quick") if args.quick else args.out
    args.out.mkdir(parents=True, exist_ok=True)
    crops = QUICK_CROPS if args.quick else CROPS
    kmax = max(QUICK_KS if args.quick else KS)
    t0 = time.perf_counter()
    results = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "train_degrade": None, "volumes": {}}
    for name in [v.strip() for v in args.volumes.split(",") if v.strip()]:
        print(f"== {name}", flush=True)
        results["volumes"][name] = run_volume(name, args, crops, install_care=not args.quick)
    results["train_degrade"] = TRAIN_DEGRADE if RANGE_OK else FALLBACK_DEGRADE
    text = markdown(results)
    g = goals(results, kmax)
    results["goals"] = g
    results["seconds"] = time.perf_counter() - t0
    shown = figure(results, args.out / "quality.png", kmax)
    report = (f"# Quality benchmark\n\nPreset {args.preset}, {args.iterations} iterations, training degradation "
              f"{results['train_degrade']}{'' if args.condition == 'none' else f' (regression told the level: {args.condition})'}; eval: poisson photons {args.photons} read {READ}. CARE: CAREamics "
              f"{CAREAMICS.split('==')[1]}, {args.iterations} steps of batch {CARE_BATCH} on {CARE_COPIES} noisy "
              f"copies of the same training part. Time: restore wall (CLI incl. ~5-10 s cluster start-up) or "
              f"in-process seconds.\n\n{text}\n## Goals\n\n"
              + "\n".join(f"- {line}" for line in g) + f"\n\nFigure: quality.png ({shown}).\n")
    (args.out / "results.md").write_text(report)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    print("\n" + report)
    print(f"wrote {args.out / 'results.md'}, results.json, quality.png ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
