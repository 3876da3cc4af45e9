"""Reproduce the shipped default model (src/volrestore/models/default.pt) from synthetic phantoms; CPU, ~25 min.

    python benchmarks/train_default_model.py                       # v-objective -> src/volrestore/models/default.pt
    python benchmarks/train_default_model.py --objective regression --out runs/default_model/regression.pt

Data: TRAIN_SEEDS phantoms (never used for any evaluation: tests, demo and studies use seeds < 1000 or >= 9000),
each degraded with every (photons, read) pair of LEVELS, so the model sees a wide range of noise levels. Every patch
is degraded on its own with a seed keyed by (level, iteration, batch slot) (PatchSampler's counter), so the data are a
pure function of the iteration and a rerun (or --resume) sees exactly the same batches.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from volrestore import synthetic, train
from volrestore.degrade import Degradation

TRAIN_SEEDS = tuple(range(1000, 1012))
VAL_SEED = 1012  # validation patches during training (a phantom not trained on)
PHANTOM_SHAPE = (48, 128, 128)
# Photon budgets at the reference intensity (the phantom's 99.9th percentile) x Gaussian read noise (photons).
LEVELS = tuple((p, r) for p in (3, 6, 12, 25, 50, 100) for r in (0.5, 2.0))
PRESET, PATCH, BATCH = "tiny-3d", (16, 32, 32), 4
ITERATIONS, LR, WARMUP, EMA = 2000, 1e-3, 100, 0.999
EVAL_SEEDS = (9001, 9002, 9003)  # held-out phantoms for reported quality (README, sampler study)
DEMO_SEED = 9000


class MixedBatches:
    """Training batches whose slots each come from a random (phantom, noise level) pair, keyed by the iteration."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.samplers = []
        for i, s in enumerate(TRAIN_SEEDS):
            clean = synthetic.phantom(PHANTOM_SHAPE, seed=s)
            ref = float(np.percentile(clean, 99.9))
            for j, (photons, read) in enumerate(LEVELS):
                deg = Degradation(photons=photons, read=read, seed=i * len(LEVELS) + j)
                # batch=1: __call__(counter) is one patch, so every slot of a batch has its own patch counter.
                self.samplers.append(train.PatchSampler(clean, degrade=deg, patch=PATCH, batch=1, seed=deg.seed,
                                                        val_fraction=0, ref=ref))

    def __call__(self, iteration: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, 11, iteration])
        picks = rng.integers(len(self.samplers), size=BATCH)
        pairs = [self.samplers[k](iteration * BATCH + b) for b, k in enumerate(picks)]
        return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])

    def normalisation(self) -> train.Normalisation:
        # Iterations far beyond any run: the same distribution as training, drawn without touching validation.
        batches = [self(10**9 + i) for i in range(64)]
        return train.Normalisation.fit(np.concatenate([b[0].ravel() for b in batches]),
                                       np.concatenate([b[1].ravel() for b in batches]))

    def validation(self) -> tuple[np.ndarray, np.ndarray]:
        clean = synthetic.phantom(PHANTOM_SHAPE, seed=VAL_SEED)
        deg = Degradation(photons=12, read=2.0, seed=VAL_SEED)  # a middle noise level
        return train.PatchSampler(clean, degrade=deg, patch=PATCH, batch=1, val_fraction=0.5,
                                  ref=float(np.percentile(clean, 99.9))).validation(4)


def train_model(out, objective: str = "v", iterations: int = ITERATIONS, threads: int = 1, log=print) -> dict:
    """Train one model on the default-model data (also the sampler study's regression baseline); returns the
    written (optimizer-free) checkpoint."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    data = MixedBatches()
    cfg = train.TrainConfig(preset=PRESET, objective=objective, iterations=iterations, lr=LR, warmup=WARMUP,
                            ema_decay=EMA, checkpoint_every=500, seed=0)
    provenance = {"data": "synthetic.phantom", "train_seeds": list(TRAIN_SEEDS), "val_seed": VAL_SEED,
                  "phantom_shape": list(PHANTOM_SHAPE), "levels_photons_read": [list(lv) for lv in LEVELS],
                  "patch": list(PATCH), "batch": BATCH, "script": "benchmarks/train_default_model.py",
                  "command": " ".join(sys.argv),
                  "machine": f"{platform.machine()} CPU ({os.cpu_count()} cores), {threads} torch thread(s)"}

    def progress(r):
        if r["iteration"] % 100 == 0 or "val_psnr" in r:
            log(f"it {r['iteration']} loss {r['loss']:.4f} {r['it_per_s']:.2f} it/s"
                + (f" val {r['val_psnr']:.2f} dB" if "val_psnr" in r else ""))

    train.train(data, out, cfg, data.normalisation(), provenance=provenance, val=data.validation(), log=progress)
    ck = train.load_checkpoint(out)
    ck["provenance"]["train_seconds"] = round(time.perf_counter() - t0)
    ck.pop("optimizer", None)  # not part of the model or its hash: halves the shipped file
    ck = train.save_checkpoint(out, ck)
    log(f"wrote {out} ({Path(out).stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - t0:.0f} s, "
        f"hash {ck['hash'][:12]}")
    return ck


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objective", default="v", choices=("v", "eps", "regression"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "src/volrestore/models/default.pt"))
    ap.add_argument("--iterations", type=int, default=ITERATIONS)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    train_model(a.out, a.objective, a.iterations, a.threads, log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    main()
