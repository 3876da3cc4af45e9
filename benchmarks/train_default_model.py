"""Reproduce the shipped default models (src/volrestore/models/default-diffusion.pt and default-regression.pt): blind
2.5D magnitude-preserving U-Nets, the same net, data and budget with the EDM or the regression objective, trained on
synthetic phantoms plus one real lattice light-sheet volume; the CHO nuclei volume is kept out entirely.

    bash ../shared/data/fetch-samples.sh data                     # real volumes (sha256-checked), git-ignored
    python benchmarks/train_default_model.py --data data           # -> runs/default_model/default-diffusion.pt
    python benchmarks/train_default_model.py --data data --objective regression \
        --out runs/default_model/default-regression.pt             # v2: 5000 iterations each
    python benchmarks/train_default_model.py --finish --out OUT    # each (v2 as shipped: EMA weights, no optimizer)
    python benchmarks/train_default_model.py --data data [--objective regression --out OUT] --resume --iterations 11000
                                                                   # v3: Adam restarted, z strides from 6000; copy
                                                                   # both into src/volrestore/models/

Blind to the noise level: every patch gets its own photon budget (log-uniform 1-100 photons at the bright end) and
read noise (0.5-3 photons). Any intensity units: each volume is put into reference units (its median -> 0, its
lightly smoothed 99.9th percentile -> 1), which is exactly what `--normalise image` (the default model's) measures
on a user's image, so camera gain and offset drop out. Deterministic given the script (batches are a pure function
of the iteration), checkpointed every 250 iterations, so an interrupted run can be shipped or continued (--resume).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from volrestore.config import TrainConfig
from volrestore.evaluation import metrics
from volrestore.model import nets
from volrestore.simulate import synthetic
from volrestore.model import checkpoint
from volrestore.model import patches
from volrestore.model import train
from volrestore.simulate.degrade import Degradation

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SEEDS = tuple(range(1000, 1012))  # evaluation uses phantom seeds < 1000 (tests) or >= 8000 (benchmarks, demo)
VAL_SEED = 1012
PHANTOM_SHAPE = (32, 128, 128)
# Real volumes: RBC lattice light-sheet planes [0, 96) only (benchmarks/quality.py evaluates planes 112-150);
# the CHO nuclei volume (Fluo-N3DH-CHO) is never trained on: it measures generalisation to unseen real data.
REAL = {"RBC_lattice.tif": (slice(0, 96), slice(None), slice(None))}
REAL_SHARE = 0.75  # share of patches from real volumes (0.4 in the first default: its output was phantom-smooth)
PHOTONS, READ = (1.0, 100.0), (0.5, 3.0)
# Real "clean" volumes are acquisitions with their own shot noise, and a restored real image keeps the texture the
# input still shows; noiseless phantoms alone teach the net to paint smooth blobs over it. So every other phantom
# target carries shot noise of a good acquisition (photons at the bright end, log-spaced over this range).
TEXTURE_PHOTONS = (30.0, 300.0)
# A 2.5D net trained only on finely sampled z (RBC's skewed lattice planes) learns to average its z neighbours and, on
# a coarse stack (CHO: 1 um planes, 0.2 um pixels), carries a brighter neighbour into a dim slice (+8 grey levels,
# 42 %, on the top plane of quality.py's CHO crop). From iteration Z_STRIDES_FROM on, each patch's neighbours are
# taken Z_STRIDES apart (one drawn per patch), so the net learns how far to trust them.
Z_STRIDES, Z_STRIDES_FROM = (1, 2, 4, 8), 6000
PRESET, PATCH, BATCH = "small-2.5d", (64, 64), 8
ITERATIONS, LR, WARMUP, EMA = 5000, 4e-3, 200, 0.999


def reference_units(vol: np.ndarray) -> tuple[float, float]:
    """(median, 99.9th percentile after in-plane smoothing with sigma 1): what the engine measures for
    --normalise image (blockwise.plan.input_range), so training and restoring put intensities on the same scale."""
    smooth = ndimage.gaussian_filter(vol.astype(np.float32), (0, 1, 1))
    return float(np.median(vol)), float(np.percentile(smooth, 99.9))


def texture_photons(index: int) -> float:
    """The shot noise phantom `index` carries as a target: inf (noiseless) for even ones, else log-spaced over
    TEXTURE_PHOTONS."""
    if index % 2 == 0:
        return math.inf
    n = len(TRAIN_SEEDS) // 2
    return TEXTURE_PHOTONS[0] * (TEXTURE_PHOTONS[1] / TEXTURE_PHOTONS[0]) ** ((index // 2) / max(n - 1, 1))


def textured(clean: np.ndarray, index: int) -> np.ndarray:
    """Odd-indexed phantoms become what a good acquisition of them looks like: Poisson shot noise at a photon budget
    log-spaced over TEXTURE_PHOTONS (at the 99.9th percentile), in the phantom's units; even ones stay noiseless."""
    if index % 2 == 0:
        return clean
    photons = texture_photons(index)
    scale = photons / float(np.percentile(clean, 99.9))
    rng = np.random.default_rng([index, 17])
    return (rng.poisson(np.clip(clean, 0, None) * scale) / scale).astype(np.float32)


class Source:
    """One clean volume: patches degraded at a random level each, returned in reference units with the level a
    restore would measure on them: `own_photons` is the clean volume's own shot noise (inf: noiseless), so a patch
    degraded to P photons with read noise r carries 1 / (1/P + 1/own) + r² photons of noise variance at the bright
    intensity on the underlying structure, which is what metrics.shot_noise_photons reads on a user's image."""

    def __init__(self, clean: np.ndarray, seed: int, val_fraction: float = 0.0, z_strides=(1,),
                 own_photons: float = math.inf):
        self.lo, self.hi = reference_units(clean)
        self.own_photons = own_photons
        deg = Degradation(photons=PHOTONS[0], photons_max=PHOTONS[1], read=READ[0], read_max=READ[1], seed=seed)
        z_context = nets.z_context(nets.load_preset(PRESET))
        self.sampler = patches.PatchSampler(clean, degrade=deg, patch=PATCH, batch=1, seed=seed,
                                          val_fraction=val_fraction, z_context=z_context,
                                          ref=float(np.percentile(clean, 99.9)), z_strides=z_strides)

    def scale(self, pair):
        return tuple((a - self.lo) / (self.hi - self.lo) for a in pair)

    def __call__(self, index: int):
        return (*self.scale(self.sampler(index)), self.level(self.sampler.levels(index)))

    def level(self, levels: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 / levels[:, 0] + 1.0 / self.own_photons) + levels[:, 1] ** 2


class MixedBatches:
    """Each batch slot from a random source (real with probability REAL_SHARE), keyed by the iteration."""

    def __init__(self, data_dir: Path, seed: int = 0):
        import tifffile

        self.seed = seed
        phantoms = [textured(synthetic.phantom(PHANTOM_SHAPE, seed=s), i) for i, s in enumerate(TRAIN_SEEDS)]
        phantom_photons = [texture_photons(i) for i in range(len(TRAIN_SEEDS))]
        real = []
        for name, region in REAL.items():
            path = data_dir / name
            if not path.is_file():
                sys.exit(f"error: {path} missing: run bash ../shared/data/fetch-samples.sh {data_dir}")
            real.append(np.asarray(tifffile.imread(path), np.float32)[region])
        real_photons = [metrics.shot_noise_photons(c) for c in real]  # RBC: ~660 (an acquisition, not noiseless)
        # The same volumes, seeds and noise keys twice: neighbours 1 slice apart (before Z_STRIDES_FROM), and strided.
        self.pools = {strides: ([Source(c, seed=s, z_strides=strides, own_photons=p)
                                 for c, s, p in zip(phantoms, TRAIN_SEEDS, phantom_photons)],
                                [Source(c, seed=2000 + i, z_strides=strides, own_photons=p)
                                 for i, (c, p) in enumerate(zip(real, real_photons))])
                      for strides in {(1,), Z_STRIDES}}

    def __call__(self, iteration: int):
        rng = np.random.default_rng([self.seed, 11, iteration])
        phantoms, real = self.pools[Z_STRIDES if iteration >= Z_STRIDES_FROM else (1,)]
        pairs = []
        for b in range(BATCH):
            pool = real if rng.random() < REAL_SHARE else phantoms
            pairs.append(pool[int(rng.integers(len(pool)))](iteration * BATCH + b))
        return tuple(np.concatenate([p[i] for p in pairs]) for i in range(3))

    def normalisation(self) -> checkpoint.Normalisation:
        # Reference units (0 = background, 1 = bright) map to -1 / +1 for input and target alike, so the restorer's
        # image normalisation (median, smoothed p99.9 -> the target's 0 / 1) lands exactly on the training scale.
        # The clamp for x0 covers the targets actually seen (puncta above the 99.9th percentile must survive).
        targets = np.concatenate([self(10**9 + i)[1].ravel() for i in range(64)])  # the same with or without levels
        norm = checkpoint.Normalisation((0.0, 1.0), (0.0, 1.0))
        t = norm.target_to_unit(np.array([targets.min(), targets.max()]))
        norm.clip = (min(-1.0, float(t[0])), max(1.0, float(t[1]) + 0.5))
        return norm

    def validation(self):
        val = Source(synthetic.phantom(PHANTOM_SHAPE, seed=VAL_SEED), seed=VAL_SEED, val_fraction=0.5)
        return (*val.scale(val.sampler.validation(4)), val.level(val.sampler.levels(0, 0, 4, val=True)))


def train_model(out, data_dir: Path, objective: str = "edm", iterations: int = ITERATIONS, threads: int = 1,
                resume: bool = False, log=print, condition: str = "none") -> dict:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    data = MixedBatches(data_dir)
    cfg = TrainConfig(preset=PRESET, objective=objective, iterations=iterations, lr=LR, warmup=WARMUP,
                      ema_decay=EMA, checkpoint_every=250, seed=0, condition=condition)
    provenance = {"data": {"phantoms": list(TRAIN_SEEDS), "phantom_shape": list(PHANTOM_SHAPE),
                           "real": {k: str(v) for k, v in REAL.items()}, "real_share": REAL_SHARE,
                           "textured_phantoms": {"every": 2, "photons": list(TEXTURE_PHOTONS)},
                           "held_out_real": "Fluo-N3DH-CHO_02_img.tif",
                           "z_strides": {"strides": list(Z_STRIDES), "from_iteration": Z_STRIDES_FROM}},
                  "degradation": {"photons": list(PHOTONS), "read": list(READ), "blur": None},
                  "condition": condition if condition == "none" else {
                      "kind": condition,
                      "level": "1 / (1/P + 1/own photons of the clean volume) + read^2, at its p99.9"},
                  "units": "reference (median -> 0, smoothed p99.9 -> 1)", "val_seed": VAL_SEED,
                  "patch": list(PATCH), "batch": BATCH, "script": "benchmarks/train_default_model.py",
                  "command": " ".join(sys.argv),
                  "machine": f"{platform.machine()} CPU ({os.cpu_count()} cores), {threads} torch thread(s)"}

    def progress(r):
        if r["iteration"] % 50 == 0 or "val_psnr" in r:
            log(f"it {r['iteration']} loss {r['loss']:.4f} {r['it_per_s']:.2f} it/s"
                + (f" val {r['val_psnr']:.2f} dB" if "val_psnr" in r else ""))

    train.train(data, out, cfg, data.normalisation(), provenance=provenance, val=data.validation(), log=progress,
                resume=resume)
    return finish(out, time.perf_counter() - t0, log)


def finish(out, seconds: float, log=print) -> dict:
    """Ship a checkpoint: drop the optimizer state (not part of the model or its hash), store the EMA weights (the
    ones restoring uses) in float16 as the model weights too (torch.save writes shared tensors once; float16 halves
    the file again, and the magnitude-preserving net renormalises its weights on every forward, so restored images
    change by far less than a dB: measured in src/volrestore/models/README.md; loading casts them back to float32;
    continuing training from a shipped model starts from its EMA), and record the training time."""
    ck = checkpoint.load_checkpoint(out)
    history = ck.get("history") or [{}]
    if not seconds and history[-1].get("it_per_s"):  # shipping an interrupted run: estimate from its own log
        seconds = ck["iteration"] / history[-1]["it_per_s"]
    ck["provenance"]["train_seconds"] = round(seconds)
    ck.pop("optimizer", None)
    ck["ema"] = {k: (v.half() if v.is_floating_point() else v) for k, v in ck["ema"].items()}
    ck["model"] = ck["ema"]
    ck["preset"] = dict(ck["preset"], name=PRESET)
    ck["normalise"] = "image"  # trained in reference units: any copy of it, given by path, measures the image  # runs before 2026-12-02 stored "small-2" (a Path.stem slip)
    ck = checkpoint.save_checkpoint(out, ck)
    log(f"wrote {out} ({Path(out).stat().st_size / 1e6:.2f} MB), iteration {ck['iteration']}, hash {ck['hash'][:12]}")
    return ck


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objective", default="edm", choices=("edm", "v", "eps", "regression"))
    ap.add_argument("--out", default=str(ROOT / "runs/default_model/default-diffusion.pt"))
    ap.add_argument("--data", default=str(ROOT / "data"), help="folder with the fetched sample volumes")
    ap.add_argument("--iterations", type=int, default=ITERATIONS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--condition", default="none", choices=("none", "photons"),
                    help="photons: the net is told each patch's noise level (regression only; v4 from v3's 11000)")
    ap.add_argument("--finish", action="store_true", help="only strip the optimizer from OUT (ship a checkpoint)")
    a = ap.parse_args()
    if a.finish:
        finish(a.out, 0.0)
        return
    train_model(a.out, Path(a.data), a.objective, a.iterations, a.threads, a.resume,
                log=lambda m: print(m, flush=True), condition=a.condition)


if __name__ == "__main__":
    main()
