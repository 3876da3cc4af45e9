"""How well `restore --std` covers the truth: a model's K-sample std (fitted on the image, and its raw spread) on
quality.py's crops.

    python benchmarks/std_calibration.py --volume-dir runs/quality-s7/cho-e66cc4f9e6 \
        --model runs/quality-s7/cho-e66cc4f9e6/model-preset-2ed9591643.pt --noisy noisy_p3-44a9d7 noisy_p10-44a9d7 \
        [--samples 8] [--out runs/stdcal]

--volume-dir is a volume folder of benchmarks/quality.py (clean_eval.ome.zarr and the noisy copies named by --noisy),
--model a diffusion checkpoint (or default-diffusion). Each noisy copy is restored with `volrestore.restore(...,
std=True)` (the std fitted by SURE, recorded as std_scale = [factor, floor]); printed per copy: PSNR against the
clean crop and the share of voxels within 2 std, of the fitted std and of the raw spread (the fit inverted per voxel:
exact where one tile covers it; not recoverable where the factor is 0). Results to OUT/std_calibration.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (the quality benchmark's std fit readers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volume-dir", type=Path, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--noisy", nargs="+", required=True, help="noisy copies in --volume-dir, without .ome.zarr")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("runs/stdcal"))
    args = ap.parse_args()

    import volrestore
    from volrestore.evaluation import metrics
    from volrestore.io import ngff

    args.out.mkdir(parents=True, exist_ok=True)
    truth = np.asarray(ngff.open_level(str(args.volume_dir / "clean_eval.ome.zarr"), 0)[...], np.float64)
    rows = {}
    for name in args.noisy:
        out = args.out / f"{args.volume_dir.name}-{name}-std.ome.zarr"
        volrestore.restore(str(args.volume_dir / f"{name}.ome.zarr"), str(out), model=args.model,
                           samples=args.samples, std=True, overwrite=True, progress=False, echo=lambda *a: None)
        mean = np.asarray(ngff.open_level(str(out), 0)[...], np.float64)
        std = np.asarray(ngff.open_level(str(out).replace(".ome.zarr", ".std.ome.zarr"), 0)[...], np.float64)
        factor, floor = quality.std_scale_of(out)
        spread = quality.raw_spread(std, (factor, floor))
        rows[name] = {"psnr": metrics.psnr(mean, truth), "std_scale": [factor, floor],
                      "coverage": metrics.calibration(mean, std, truth),
                      "coverage_raw": None if spread is None else metrics.calibration(mean, spread, truth)}
        raw = "n/a" if spread is None else f"{rows[name]['coverage_raw']:.3f}"
        print(f"{name}: PSNR {rows[name]['psnr']:.2f}  within 2 std {rows[name]['coverage']:.3f} (raw spread {raw}; "
              f"factor {factor}, floor {floor})", flush=True)
    (args.out / "std_calibration.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":  # a local cluster's worker processes re-import this file
    main()
