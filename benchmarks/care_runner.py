"""CARE baseline of benchmarks/quality.py: train CAREamics CARE on .npy pairs, predict .npy volumes (in its own venv).

    care-venv/bin/python benchmarks/care_runner.py --train-x X.npy --train-y Y.npy [--val-x VX.npy --val-y VY.npy]
        --dims 2|3 --patch 16x32x32 --batch 4 --steps 2000 --predict IN.npy OUT.npy [--predict ...] --workdir DIR

Training arrays are (S, Z, Y, X) stacks of registered noisy / clean volumes in intensity units; with --dims 2 their z
planes become independent 2D samples. Prediction inputs are (Z, Y, X); outputs are float32 of the same shape, in the
same units (CAREamics normalises by the training data's mean/std and undoes it). This file imports only numpy and
careamics, never volrestore: it runs beside a torch that the project's environment must not see.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

# CARE's U-Net halves each spatial side `depth` times; inputs are reflected up to a multiple of this and cropped back.
SIZE_MULTIPLE = 16


def as_samples(a: np.ndarray, dims: int) -> np.ndarray:
    a = np.asarray(a, np.float32)
    if a.ndim == 3:
        a = a[None]
    return a.reshape(-1, *a.shape[-2:]) if dims == 2 else a


def pad_to_multiple(x: np.ndarray, axes) -> tuple[np.ndarray, tuple[slice, ...]]:
    pads = [(0, (-x.shape[i]) % SIZE_MULTIPLE if i in axes else 0) for i in range(x.ndim)]
    keep = tuple(slice(0, n) for n in x.shape)
    return np.pad(x, pads, mode="symmetric"), keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-x", required=True)
    ap.add_argument("--train-y", required=True)
    ap.add_argument("--val-x")
    ap.add_argument("--val-y")
    ap.add_argument("--dims", type=int, choices=(2, 3), required=True)
    ap.add_argument("--patch", required=True, help="ZxYxX (3D) or YxX (2D)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, required=True, help="optimiser steps in total")
    ap.add_argument("--epochs", type=int, default=10, help="validation / LR-plateau checks during training")
    ap.add_argument("--predict", nargs=2, action="append", default=[], metavar=("IN", "OUT"))
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seed", type=int, default=1, help="CAREamics wants a seed > 0")
    args = ap.parse_args()

    import torch
    from careamics import CAREamist
    from careamics.config import create_advanced_care_config

    torch.manual_seed(args.seed)
    patch = [int(p) for p in args.patch.lower().split("x")]
    if len(patch) != args.dims:
        raise SystemExit(f"--patch {args.patch} must have {args.dims} sizes for --dims {args.dims}")
    x, y = as_samples(np.load(args.train_x), args.dims), as_samples(np.load(args.train_y), args.dims)
    val = {}
    if args.val_x and args.val_y:
        val = {"val_data": as_samples(np.load(args.val_x), args.dims),
               "val_data_target": as_samples(np.load(args.val_y), args.dims)}
    axes = "SZYX" if args.dims == 3 else "SYX"
    epochs = max(1, min(args.epochs, args.steps))
    gpu = torch.cuda.is_available()
    # Exactly `steps` optimiser steps whatever CAREamics's patches-per-epoch rule: cap the trainer by max_steps and
    # let each epoch (one validation, one plateau check) be steps/epochs batches long.
    config = create_advanced_care_config(
        experiment_name="quality_care", data_type="array", axes=axes, patch_size=patch, batch_size=args.batch,
        num_epochs=10**6, num_steps=-(-args.steps // epochs), seed=args.seed,
        num_workers=2 if gpu else 0,
        trainer_params={"max_steps": args.steps, "accelerator": "gpu" if gpu else "cpu", "devices": 1,
                        "enable_model_summary": False},
        # CAREamics stops CARE once the validation loss has not improved for 3 epochs (Lightning's default
        # patience): on RBC that ended at 750 of 1500 steps. The comparison is at the same number of steps.
        early_stopping_params={"monitor": "val_loss", "mode": "min", "patience": 10**6},
    )
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    care = CAREamist(config, work_dir=work, enable_progress_bar=False)
    t0 = time.perf_counter()
    care.train(train_data=x, train_data_target=y, **val)
    train_s = time.perf_counter() - t0
    steps_done = int(getattr(getattr(care, "trainer", None), "global_step", -1))

    predict_s = []
    for src, dst in args.predict:
        vol = np.asarray(np.load(src), np.float32)
        t0 = time.perf_counter()
        if args.dims == 3:
            padded, keep = pad_to_multiple(vol, axes=(0, 1, 2))
            # The sample axis must match training's "SZYX" (CAREamics checks axes against the target's).
            out = care.predict(padded[None], axes="SZYX", data_type="array", tile_size=None)
        else:
            padded, keep = pad_to_multiple(vol, axes=(1, 2))
            out = care.predict(padded, axes="SYX", data_type="array", tile_size=None)
        preds = out[0] if isinstance(out, tuple) else out  # (list of arrays, list of sources) in 0.3
        flat = np.concatenate([np.asarray(p, np.float32).reshape(-1) for p in (preds if isinstance(preds, list)
                                                                                 else [preds])])
        out = flat.reshape(padded.shape)[keep]
        predict_s.append(time.perf_counter() - t0)
        np.save(dst, out.astype(np.float32))
    print(json.dumps({"train_s": train_s, "steps": steps_done, "predict_s": predict_s, "samples": int(x.shape[0]),
                      "device": "cuda" if gpu else "cpu"}))


if __name__ == "__main__":
    main()
