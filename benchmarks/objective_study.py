"""ε (the paper's setup: cosine schedule, uniform t, 200 ancestral steps) vs v vs EDM on the same net and budget.

    python benchmarks/objective_study.py [--iterations 600]

tiny-2d trained on phantom seed 1 (Poisson 10 photons, read 1), evaluated on a held-out phantom (seed 99) with
K = 4 samples; prints PSNR per (objective, schedule, sampler)."""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from volrestore.config import TrainConfig
from volrestore.model import patches, train  # noqa: E402
from volrestore.evaluation import metrics
from volrestore.simulate import synthetic
from volrestore.simulate.degrade import Degradation  # noqa: E402
from volrestore.model.diffusion_restorer import DiffusionRestorer  # noqa: E402

CASES = [("eps", "cosine", "ancestral", 200), ("v", "cosine", "ancestral", 200), ("edm", "edm", "dpmpp2m", 12),
         ("edm", "edm", "ancestral", 200), ("eps", "cosine", "dpmpp2m", 20)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=600)
    ap.add_argument("--out", default="runs/objective_study")
    a = ap.parse_args()
    torch.set_num_threads(1)
    deg = Degradation.parse("poisson:photons=10,read=1,seed=1")
    sampler = patches.PatchSampler(synthetic.phantom((8, 128, 96), seed=1), degrade=deg, patch=(32, 32), batch=8,
                                   seed=0, val_fraction=0)
    clean = synthetic.phantom((2, 64, 64), seed=99)
    noisy = Degradation.parse("poisson:photons=10,read=1,seed=7")(clean, (0,), ref=sampler.ref)
    print(f"input {metrics.psnr(noisy, clean):.2f} dB", flush=True)
    models = {}
    for objective, schedule, name, steps in CASES:
        if (objective, schedule) not in models:
            path = Path(a.out) / f"{objective}-{schedule}.pt"
            t0 = time.perf_counter()
            cfg = TrainConfig(preset="tiny-2d", objective=objective, schedule=schedule, iterations=a.iterations,
                                    warmup=20, lr=1e-2, checkpoint_every=a.iterations)
            train.train(sampler, path, cfg, sampler.fit_normalisation())
            models[objective, schedule] = path
            print(f"trained {objective}/{schedule} in {time.perf_counter() - t0:.0f} s", flush=True)
        r = DiffusionRestorer(models[objective, schedule], samples=4, sampler=name, steps=steps)
        out = r(noisy, [(0, 0, 0), (1, 0, 0)], seed=5)["mean"]
        print(f"{objective:4s} {schedule:6s} {name:9s} {steps:3d} steps: {metrics.psnr(out, clean):.2f} dB", flush=True)


if __name__ == "__main__":
    main()
