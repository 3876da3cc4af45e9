"""The offline demo: degrade a synthetic volume, restore it with the shipped default model on a local Dask cluster,
write the images and a figure, and report PSNR/SSIM before and after."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from volrestore.evaluation import evaluate
from volrestore.evaluation import figures
from volrestore.io import ngff
from volrestore.simulate import synthetic
from volrestore.simulate.degrade import Degradation
from volrestore.errors import UserError

# Seed 9000 is an evaluation seed: the default model was trained on phantoms 1000-1011 only
# (benchmarks/train_default_model.py), so the demo never shows it data it has seen.
SEED = 9000
SHAPE = (32, 64, 64)
DEGRADATION = "poisson:photons=10,read=1"
VOXEL_SIZE = (1.0, 0.4, 0.4)  # micrometres (z, y, x): anisotropic like the phantom's PSF
NAMES = ("clean", "degraded", "restored")


def _write(path, data: np.ndarray, provenance: dict, overwrite: bool) -> None:
    ngff.create_image(path, shape=data.shape, dtype="float32",
                      axes=[ngff.Axis(a, "space", "micrometer") for a in "zyx"], scale=list(VOXEL_SIZE),
                      chunks=[min(s, 64) for s in data.shape], provenance=provenance, overwrite=overwrite)
    ngff.open_level(path, mode="r+")[...] = data
    ngff.set_complete(path)


def run(outdir, *, samples: int = 2, steps: int = 8, sampler: str = "ddim", shape=SHAPE, seed: int = SEED,
        degradation: str = DEGRADATION, model: str = "default", tile=None, overlap: int | None = None,
        threads: int | None = None, overwrite: bool = False, echo=print) -> dict:
    """Run the demo into `outdir`; returns the metrics and paths. `samples` >= 2 also writes the per-voxel std.

    A demo volume is one write-block, so it runs on one local worker whose `threads` (default: all cores) all go to
    torch inside the model call. Tiles default to the model's (its training patch: larger tiles restore worse).
    """
    out = Path(outdir)
    paths = {name: out / f"{name}.ome.zarr" for name in NAMES}
    std_path = out / "restored.std.ome.zarr"
    figure = out / "demo.png"
    if samples < 1 or steps < 1:
        raise UserError(f"--samples and --steps must be >= 1, got {samples} and {steps}")
    existing = [str(p) for p in (*paths.values(), std_path, figure) if p.exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} already exists: choose an empty OUTDIR or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    figures.check_writable(figure)
    t0 = time.perf_counter()

    deg = Degradation.parse(f"{degradation},seed={seed}")
    clean = synthetic.phantom(shape, seed=seed)
    degraded = deg(clean, (0,))
    echo(f"sample: synthetic phantom {'x'.join(map(str, shape))} (seed {seed}), degraded with {degradation}")
    for name, data in (("clean", clean), ("degraded", degraded)):
        _write(paths[name], data, {"command": "volrestore demo", "parameters": {"seed": seed, "shape": list(shape),
                                                                                  "degradation": degradation}},
               overwrite)

    from volrestore.cluster.client import connect, machine_cores
    from volrestore.blockwise.restore import restore

    t1 = time.perf_counter()
    with connect("local", workers=1, threads_per_worker=threads or machine_cores(), echo=echo) as client:
        restore(paths["degraded"], paths["restored"], model=model, samples=samples, steps=steps, sampler=sampler,
                std=samples >= 2 or None, tile=list(tile) if tile else None, overlap=overlap, cluster=client, overwrite=overwrite,
                progress=False, command="volrestore demo", echo=echo)
    restore_s = time.perf_counter() - t1

    # Same reference range (the clean image's 0.1-99.9 percentiles) for both, so the numbers compare directly.
    before = evaluate.evaluate(paths["degraded"], paths["clean"], ms_ssim=False)
    after = evaluate.evaluate(paths["restored"], paths["clean"], ms_ssim=False)
    images = [paths["degraded"], paths["restored"], paths["clean"]] + ([std_path] if samples >= 2 else [])
    titles = ["degraded", f"restored (K={samples})", "clean"] + (["std"] if samples >= 2 else [])
    figures.panels(images, figure, view="slices,mip", titles=titles, contrast_from=2,
                   own_contrast=(3,) if samples >= 2 else ())
    result = {"psnr_before": before["psnr"], "psnr_after": after["psnr"], "ssim_before": before["ssim_3d"],
              "ssim_after": after["ssim_3d"], "restore_s": restore_s, "total_s": time.perf_counter() - t0,
              "paths": {**{k: str(v) for k, v in paths.items()}, "figure": str(figure),
                        **({"std": str(std_path)} if samples >= 2 else {})}}
    echo(report(result))
    return result


def report(r: dict) -> str:
    """The demo's result as four lines: PSNR/SSIM before, after and gained, and the timings."""
    ssim = (lambda v: "n/a" if v is None else f"{v:.3f}")
    gain = (lambda a, b: "n/a" if a is None or b is None else f"{b - a:+.3f}")
    return "\n".join([
        f"degraded  PSNR {r['psnr_before']:6.2f} dB  SSIM {ssim(r['ssim_before'])}",
        f"restored  PSNR {r['psnr_after']:6.2f} dB  SSIM {ssim(r['ssim_after'])}",
        f"gain      PSNR {r['psnr_after'] - r['psnr_before']:+6.2f} dB  SSIM {gain(r['ssim_before'], r['ssim_after'])}",
        f"restore {r['restore_s']:.0f} s, total {r['total_s']:.0f} s; figure {r['paths']['figure']}",
    ])
