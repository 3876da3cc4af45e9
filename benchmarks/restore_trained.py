"""Re-restore quality.py's cached per-volume models with this code (blend and all), without training them again.

    python benchmarks/restore_trained.py --volume-dir runs/quality-tta/cho-e66cc4f9e6 \
        --model finetune=runs/quality-v8/cho-e66cc4f9e6/model-finetune-fd53146d16.pt \
        --model regression=runs/quality-v8/cho-e66cc4f9e6/model-regression-a1096042b1.pt [--photons 3 10 30]

quality.py keys its trained models by the code's hash, so any code change trains them again (half an hour each on
this CPU); a change that only touches restoring (the blend, the background) is measured here instead: each model
restores the volume folder's noisy copies (noisy_p{P}-*.ome.zarr) with `volrestore restore`, scored by quality.score
against clean_eval. Prints PSNR / SSIM; results to VOLUME_DIR/restore_trained.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (the quality benchmark's reader and scores)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volume-dir", type=Path, required=True)
    ap.add_argument("--model", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--photons", nargs="+", type=float, default=[3, 10, 30])
    args = ap.parse_args()
    truth = quality.read(args.volume_dir / "clean_eval.ome.zarr")
    results = {}
    for item in args.model:
        name, _, path = item.partition("=")
        for p in args.photons:
            noisy = max((q for q in args.volume_dir.glob(f"noisy_p{p:g}-*.ome.zarr") if q.name.count("-") == 1),
                        key=lambda q: q.stat().st_mtime)  # the newest degradation (equal data under older keys)
            out = args.volume_dir / f"{noisy.name[:-len('.ome.zarr')]}-{name}-now.ome.zarr"
            subprocess.run(["volrestore", "restore", noisy, out, "--model", path, "--overwrite", "--workers", "1"],
                           check=True, capture_output=True)
            score = quality.score(quality.read(out).astype("float64"), truth)
            results[f"{name} {p:g}"] = score
            print(f"{name} P={p:g} ({noisy.name}): PSNR {score['psnr']:.2f} SSIM {score['ssim']:.4f}", flush=True)
    (args.volume_dir / "restore_trained.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
