"""Sampler study: DDIM / DPM-Solver++ steps vs 200-step ancestral, K samples, vs the regression baseline; CPU.

    python benchmarks/sampler_study.py [--model src/volrestore/models/default-diffusion.pt]
        [--regression runs/default_model/regression.pt] [--shape 16x48x48] [--out runs/sampler_study]

Held-out phantoms (EVAL_SEEDS of train_default_model.py, never trained on) degraded at `--degrade` are restored whole
(one tile) with the diffusion model and the regression baseline (trained with benchmarks/train_default_model.py on
the same data and iterations when its checkpoint is missing). PSNR / SSIM (3D) over the clean 0.1-99.9 percentile
range, averaged over the volumes. Samplers are compared at K = 1 and K = 4 (mean of the same 4 seeded samples);
the K sweep uses DPM-Solver++ 2M. Writes OUT/results.json and OUT/sampler_study.png and prints a table.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

import train_default_model as tdm  # same folder: the data and training routine of the shipped model
from volrestore.model import diffusion as dfn
from volrestore.evaluation import metrics
from volrestore.simulate import synthetic
from volrestore.model import checkpoint
from volrestore.model import train
from volrestore.simulate.degrade import Degradation

STEPS = (5, 10, 20, 50)
KS = (1, 2, 4, 8, 16)
EVAL_SEEDS = (8101, 8102)  # phantom seeds no model trains on (train_default_model: 1000-1012; tests < 1000)


def samples(net, schedule, norm, cond, sampler="dpmpp2m", steps=1, k=1, seed=0) -> np.ndarray:
    """k seeded samples (k, *spatial) of one volume, the k samples as one batch (regression: k copies of its one
    answer). A 2.5D net restores the volume slice by slice, each slice with its z-context neighbours (reflected at
    the ends) as condition channels, the slices of all k samples as one batch."""
    c = net.z_context
    if not c:
        return train.predict(net, schedule, norm, np.repeat(cond[None], k, axis=0), seed=seed, sampler=sampler,
                             steps=steps)
    z = cond.shape[0]
    index = np.abs(np.arange(-c, z + c))  # half-sample reflection would repeat the end slice; mirror it instead
    index = np.where(index >= z, 2 * z - 2 - index, index)
    stacks = np.stack([cond[index[i:i + 2 * c + 1]] for i in range(z)])  # (Z, 1 + 2c, Y, X)
    out = train.predict(net, schedule, norm, np.concatenate([stacks] * k), seed=seed, sampler=sampler, steps=steps)
    return out.reshape(k, z, *cond.shape[1:])


def scores(pred, clean) -> dict:
    return {"psnr": metrics.psnr(pred, clean), "ssim": metrics.ssim(pred, clean)}


def average(rows: list[dict]) -> dict:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def plot(res: dict, path) -> None:
    from volrestore.evaluation.figures import _pyplot

    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    for K, style in ((1, "--"), (4, "-")):
        for s, colour in (("ddim", "C0"), ("dpmpp2m", "C1")):
            a.plot(STEPS, [res[f"{s}{n}_K{K}"]["psnr"] for n in STEPS], style + "o", color=colour,
                   label=f"{s} K={K}")
        a.axhline(res[f"ancestral200_K{K}"]["psnr"], color="k", ls=style, lw=1, label=f"ancestral 200 K={K}")
    a.axhline(res["regression"]["psnr"], color="C2", lw=1.5, label="regression")
    a.set_title(f"held-out input: {res['input']['psnr']:.2f} dB", fontsize=9)
    a.set_xscale("log")
    a.set_xticks(STEPS, [str(s) for s in STEPS], minor=False)
    a.minorticks_off()
    a.set_xlabel("network evaluations per sample")
    a.set_ylabel("PSNR (dB)")
    a.legend(fontsize=6, ncol=2)
    b.plot(KS, [res[f"dpmpp2m20_K{k}"]["psnr"] for k in KS], "o-", color="C1", label="dpmpp2m 20, mean of K")
    b.axhline(res["regression"]["psnr"], color="C2", lw=1.5, label="regression")
    b.set_xscale("log", base=2)
    b.set_xticks(KS, [str(k) for k in KS])
    b.minorticks_off()
    b.set_xlabel("samples K")
    b.set_ylabel("PSNR (dB)")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main():
    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(root / "src/volrestore/models/default-diffusion.pt"))
    ap.add_argument("--regression", default=str(root / "runs/default_model/regression.pt"))
    ap.add_argument("--shape", default="16x48x48", help="held-out volume ZxYxX (multiples of 4, >= 7)")
    ap.add_argument("--seeds", default=",".join(map(str, EVAL_SEEDS)))
    ap.add_argument("--degrade", default="poisson:photons=10,read=1")
    ap.add_argument("--out", default=str(root / "runs/sampler_study"))
    ap.add_argument("--data", default=str(root / "data"), help="sample volumes (to train a missing regression)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not Path(a.regression).is_file():
        print(f"training the regression baseline into {a.regression} (same data and iterations as the model)")
        tdm.train_model(a.regression, Path(a.data), "regression", threads=a.threads,
                        log=lambda m: print(m, flush=True))
    ck = checkpoint.load_checkpoint(a.model)
    net, norm = checkpoint.model_from_checkpoint(ck), checkpoint.Normalisation.from_dict(ck["normalisation"])
    schedule = checkpoint.schedule_of(ck)
    rck = checkpoint.load_checkpoint(a.regression)
    reg, rnorm = checkpoint.model_from_checkpoint(rck), checkpoint.Normalisation.from_dict(rck["normalisation"])
    shape = tuple(int(v) for v in a.shape.split("x"))

    per_volume, t0 = [], time.perf_counter()
    for seed in (int(s) for s in a.seeds.split(",")):
        clean = synthetic.phantom(shape, seed=seed)
        noisy = Degradation.parse(f"{a.degrade},seed={seed}")(clean, (0,))
        # Models trained in reference units (the shipped ones: normalise "image") see the input as restore's
        # --normalise image shows it: median -> 0, smoothed 99.9th percentile -> 1, measured on the noisy input.
        lo, hi = tdm.reference_units(noisy) if ck.get("normalise") == "image" else (0.0, 1.0)
        noisy = (noisy - lo) / (hi - lo)
        clean = (clean - lo) / (hi - lo)  # PSNR is affine-invariant in the clean's percentile range
        r = {"input": scores(noisy, clean), "regression": scores(samples(reg, schedule, rnorm, noisy)[0], clean)}
        configs = [("ancestral", 200)] + [(s, n) for s in ("ddim", "dpmpp2m") for n in STEPS]
        for s, n in configs:
            k = max(KS) if (s, n) == ("dpmpp2m", 20) else 4
            runs = samples(net, schedule, norm, noisy, s, n, k, seed=seed)
            for K in (KS if k == max(KS) else (1, 4)):
                r[f"{s}{n}_K{K}"] = scores(runs[:K].mean(axis=0), clean)
        per_volume.append(r)
        print(f"volume seed {seed} done at {time.perf_counter() - t0:.0f} s", flush=True)
    res = {key: average([r[key] for r in per_volume]) for key in per_volume[0]}
    (out / "results.json").write_text(json.dumps({
        "model": a.model, "model_hash": ck["hash"], "regression": a.regression, "shape": list(shape),
        "seeds": a.seeds, "degrade": a.degrade, "seconds": round(time.perf_counter() - t0),
        "mean": res, "per_volume": per_volume}, indent=1))
    plot(res, out / "sampler_study.png")
    print(f"\n{'config':<22}{'evals':>7}{'PSNR dB':>9}{'SSIM':>8}")
    for key, v in res.items():
        steps_k = re.search(r"(\d+)_K(\d+)$", key)  # e.g. dpmpp2m20_K4: 20 steps x 4 samples
        evals = int(steps_k[1]) * int(steps_k[2]) if steps_k else {"input": 0, "regression": 1}[key]
        print(f"{key:<22}{evals:>7}{v['psnr']:>9.2f}{v['ssim']:>8.3f}")
    best = max((res[f"{s}{n}_K1"]["psnr"], s, n) for s in ("ddim", "dpmpp2m") for n in STEPS if n <= 20)
    gap = res["ancestral200_K1"]["psnr"] - best[0]
    print(f"\nbest few-step (<= 20 evals, K=1): {best[1]} {best[2]} at {best[0]:.2f} dB; ancestral-200 K=1 "
          f"{res['ancestral200_K1']['psnr']:.2f} dB; gap {gap:+.2f} dB -> target (<= 0.1 dB) "
          f"{'met' if gap <= 0.1 else 'NOT met'}")
    print(f"wrote {out / 'results.json'} and {out / 'sampler_study.png'}")


if __name__ == "__main__":
    main()
