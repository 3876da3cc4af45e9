"""eps vs v prediction (and the regression baseline) on synthetic data, same net, iterations and seed; CPU, ~10 min.

    python benchmarks/param_study.py [--iterations 1500] [--out runs/param_study]

Trains tiny-2d on 32x32 patches of a synthetic volume degraded with Poisson-Gaussian noise, then restores a
held-out synthetic volume (other phantom seed, other noise seed) and prints PSNR (over the clean 0.1-99.9 percentile
range) of the noisy input, K = 1 and K = 4 samples (DPM-Solver++ 2M, 20 steps), and, for each diffusion model,
DDIM-20 and full 200-step ancestral sampling with K = 1.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from volrestore.config import TrainConfig
from volrestore.model import diffusion as dfn
from volrestore.simulate import synthetic
from volrestore.model import checkpoint
from volrestore.model import patches
from volrestore.model import train
from volrestore.simulate.degrade import Degradation


def psnr(x, ref):
    rng = np.percentile(ref, 99.9) - np.percentile(ref, 0.1)
    return float(10 * np.log10(rng**2 / np.mean((x - ref) ** 2)))


def restore(net, norm, cond, sampler="dpmpp2m", steps=20, samples=1, seed=0):
    schedule = dfn.CosineSchedule()
    runs = [train.predict(net, schedule, norm, cond, seed=seed, sampler=sampler, steps=steps, sample=k)
            for k in range(samples)]
    return np.mean(runs, axis=0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=1500)
    ap.add_argument("--out", default="runs/param_study")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    deg = Degradation.parse("poisson:photons=10,read=1,seed=1")
    clean = synthetic.phantom((16, 256, 256), seed=1)
    sampler = patches.PatchSampler(clean, degrade=deg, patch=(32, 32), batch=8, seed=0, val_fraction=0.125)
    norm = sampler.fit_normalisation()
    test_clean = synthetic.phantom((4, 96, 96), seed=99)  # held out: never seen in training
    test_noisy = Degradation.parse("poisson:photons=10,read=1,seed=99")(test_clean, (0,), ref=sampler.ref)
    results = {"input": psnr(test_noisy, test_clean)}
    print(f"noisy input: {results['input']:.2f} dB")
    for objective in ("eps", "v", "regression"):
        cfg = TrainConfig(preset="tiny-2d", objective=objective, iterations=a.iterations, lr=1e-3, warmup=50,
                                checkpoint_every=a.iterations, seed=0)
        t0 = time.perf_counter()
        ck = train.train(sampler, out / f"{objective}.pt", cfg, norm)
        net = checkpoint.model_from_checkpoint(ck)
        r = {"train_s": round(time.perf_counter() - t0, 1), "final_loss": ck["history"][-1]["loss"]}
        if objective == "regression":
            r["one_pass"] = psnr(restore(net, norm, test_noisy), test_clean)
        else:
            r["dpmpp2m20_K1"] = psnr(restore(net, norm, test_noisy), test_clean)
            r["dpmpp2m20_K4"] = psnr(restore(net, norm, test_noisy, samples=4), test_clean)
            r["ddim20_K1"] = psnr(restore(net, norm, test_noisy, "ddim"), test_clean)
            r["ancestral200_K1"] = psnr(restore(net, norm, test_noisy, "ancestral", 200), test_clean)
        results[objective] = r
        print(objective, json.dumps(r), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
