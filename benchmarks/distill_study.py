"""A distilled one-evaluation student against its teacher's DDPM-avg, on a real crop that neither saw.

    nice -n 10 python benchmarks/distill_study.py --volume-dir runs/quality-s7/cho-e66cc4f9e6 \
        --teacher runs/quality-s7/cho-e66cc4f9e6/model-preset-2ed9591643.pt [--photons 10] [--train-rows 1024] \
        [--samples 2] [--iterations 1500] [--patch 1 48 48] [--out runs/distill]

--volume-dir is a volume folder of benchmarks/quality.py (clean_train.tif, clean_eval.ome.zarr and the evaluation
crop's noisy copies) and --teacher a diffusion model trained there. The first --train-rows rows of the training part
are degraded once at --photons (one fixed noisy image, what a user has); `volrestore distill` restores it with the
teacher (DDPM-avg of --samples, the teacher's default sampler) and trains the student on those pairs, from the
teacher's weights. Student and teacher (K = 1, 4, 8) then restore the evaluation crop's noisy copy at the same level
with `volrestore restore`, scored by quality.score against the clean crop. Writes OUT/results.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (the quality benchmark's data, restore cache and scores)

TEACHER_KS = (1, 4, 8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volume-dir", type=Path, required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--photons", type=float, default=10.0)
    ap.add_argument("--train-rows", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=1500)
    ap.add_argument("--patch", nargs=3, type=int, default=(1, 48, 48))
    ap.add_argument("--out", type=Path, default=Path("runs/distill"))
    args = ap.parse_args()
    out, vol = args.out, args.volume_dir
    out.mkdir(parents=True, exist_ok=True)

    import tifffile

    train = quality.to_zarr(tifffile.imread(vol / "clean_train.tif")[:, :args.train_rows], out / "clean.ome.zarr")
    noisy_train = out / f"noisy_p{args.photons:g}.ome.zarr"
    if not quality.complete(noisy_train):
        quality.sh(["volrestore", "degrade", train, noisy_train, "--spec",
                    f"poisson:photons={args.photons:g},read={quality.READ},seed=7", "--overwrite"])
    student = out / f"student-k{args.samples}-{args.iterations}.pt"
    if not student.exists():
        # blocks of 256 rows: the teacher's restore spreads over both workers of a 2-core machine
        _, log, wall = quality.sh(["volrestore", "distill", noisy_train, "--teacher", args.teacher, "--out", student,
                                   "--samples", args.samples, "--targets", out / f"targets-k{args.samples}.ome.zarr",
                                   "--block", 5, 256, 512, "--iterations", args.iterations,
                                   "--patch", *args.patch, "--json"])
        (out / (student.name + ".log")).write_text(log)

    # the evaluation crop's noisy copy at this level, made (or found) exactly as quality.py makes it
    noisy_eval = quality.noisy({"dir": vol, "eval": vol / "clean_eval.ome.zarr"}, args.photons)
    truth = quality.read(vol / "clean_eval.ome.zarr")
    rows = []
    runs = ([("student, 1 evaluation (restore's SURE blend)", str(student), None, None),
             ("student, 1 evaluation, --blend off (network alone)", str(student), None, "off")]
            + [(f"teacher DDPM-avg K = {k} (DDIM 10: {10 * k} evaluations)", args.teacher, k, None)
               for k in TEACHER_KS])
    for label, model, samples, blend in runs:
        tag = quality.key("distill", model, samples, blend, quality.CODE_KEY)
        path, _, wall = quality.restore(noisy_eval, model, tag, samples=samples, blend=blend)
        rows.append({"method": label, "restore_s": round(wall, 1), **quality.score(quality.read(path), truth)})
    result = {"volume_dir": str(vol), "photons": args.photons, "teacher": args.teacher, "samples": args.samples,
              "iterations": args.iterations, "train_rows": args.train_rows, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    for r in rows:
        print(f"{r['method']:<48} {r['psnr']:6.2f} dB  SSIM {r['ssim']:.4f}  {r['restore_s']:7.1f} s")


if __name__ == "__main__":
    main()
