"""Small end-to-end runs through the CLI whose output bytes are pinned in tests/data/reference.json.

The hashes were recorded with the code before the layout redesign (issue 12): `python tests/reference_outputs.py
--record`. tests/test_reference.py reruns every case and demands the same bytes, so a refactor that changes any
restored, degraded, converted or trained value fails. Cases run in-process through click with a one-worker local
cluster; inputs are made from the seeded phantom.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import zarr

REFERENCE = Path(__file__).parent / "data" / "reference.json"
DEGRADE = "poisson:photons=8,read=1,seed=3"


def array_hash(array) -> str:
    """sha256 over dtype, shape and C-order bytes."""
    data = np.ascontiguousarray(np.asarray(array))
    h = hashlib.sha256(f"{data.dtype.str}{data.shape}".encode())
    h.update(data.tobytes())
    return h.hexdigest()[:32]


def image_hashes(path) -> dict:
    """Hash of every array (pyramid level) of an OME-Zarr image, by array path."""
    group = zarr.open_group(str(path), mode="r")
    return {name: array_hash(arr[...]) for name, arr in sorted(group.arrays())}


def _cli(*args):
    from click.testing import CliRunner

    from volrestore.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    if result.exit_code != 0:
        raise AssertionError(f"volrestore {' '.join(map(str, args))} failed ({result.exit_code}): {result.output}"
                             f"{result.exception!r}")
    return result


def _write(path, data, axes, chunks, version="0.5"):
    from volrestore.cli import main  # noqa: F401 - the package must import
    import volrestore

    writer = getattr(volrestore, "write_image", None)
    if writer is not None:
        writer(path, data, axes=axes, chunks=chunks, version=version)
        return str(path)
    from volrestore.io import ngff

    ngff.create_image(path, shape=data.shape, dtype=data.dtype, axes=list(axes), chunks=chunks,
                      scale=[1.0] * data.ndim, version=version)
    ngff.open_level(path, 0, mode="r+")[...] = data
    ngff.set_complete(path)
    return str(path)


def _phantom(shape, seed):
    try:
        from volrestore.simulate.synthetic import phantom
    except ImportError:
        from volrestore.simulate.synthetic import phantom
    return phantom(shape, seed=seed)


def run_cases(workdir) -> dict:
    """Run every case in `workdir`; {case: {array path: hash}} (training: the weights' hash)."""
    import torch

    torch.set_num_threads(1)
    d = Path(workdir)
    clean = _phantom((12, 48, 48), seed=5)
    clean16 = (clean * 2000).astype("uint16")
    two_channel = np.stack([clean16, clean16[:, ::-1].copy()])
    src = _write(d / "clean.ome.zarr", clean16, "zyx", (4, 16, 16))
    src_c = _write(d / "czyx.ome.zarr", two_channel, "czyx", (1, 4, 16, 16), version="0.4")
    out = {}
    one = ("--cluster", "local", "--workers", 1)

    _cli("degrade", src, d / "noisy.ome.zarr", "--spec", DEGRADE)
    out["degrade"] = image_hashes(d / "noisy.ome.zarr")
    noisy = str(d / "noisy.ome.zarr")

    _cli("restore", src_c, d / "gauss.ome.zarr", "--model", "gaussian:sigma=1.5", "--tile", 8, 16, 16, "--overlap", 2,
         "--dtype", "input", "--chunks", 4, 16, 16, *one)
    out["restore_gaussian_czyx_uint16"] = image_hashes(d / "gauss.ome.zarr")

    _cli("restore", noisy, d / "rand.ome.zarr", "--model", "randcnn:width=4", "--tile", 8, 16, 16, "--overlap", 4,
         "--samples", 2, "--std", "--block", 8, 32, 32, *one)
    out["restore_randcnn_mean"] = image_hashes(d / "rand.ome.zarr")
    out["restore_randcnn_std"] = image_hashes(d / "rand.std.ome.zarr")

    model = d / "tiny.pt"
    _cli("train", "--target", src, "--degrade", DEGRADE, "--preset", "tiny-2.5d", "--patch", 1, 16, 16, "--batch", 2,
         "--iterations", 6, "--checkpoint-every", 3, "--val-fraction", 0.34, "--out", model, *one)
    ck = torch.load(model, map_location="cpu", weights_only=True)
    out["train_tiny_2.5d_weights"] = {
        part: array_hash(np.concatenate([ck[part][k].numpy().ravel() for k in sorted(ck[part])]))
        for part in ("model", "ema")}

    # --batch 1: one tile per network call, as every call was before tiles were batched (issue 14); larger batches
    # differ from it in the last float bits (tests/test_batching.py), so only this case can match the old recording.
    # The sampler is named: DPM-Solver++ 2M was the EDM models' default when this case was recorded (DDIM since).
    # --std-scale off: the samples' raw spread, as recorded (the default scales it by a factor SURE measures).
    _cli("restore", noisy, d / "ddpm.ome.zarr", "--model", model, "--samples", 2, "--std", "--std-scale", "off",
         "--steps", 3, "--sampler", "dpmpp2m",
         "--tile", 1, 32, 32, "--overlap", 8, "--batch", 1, *one)
    out["restore_diffusion_mean"] = image_hashes(d / "ddpm.ome.zarr")
    out["restore_diffusion_std"] = image_hashes(d / "ddpm.std.ome.zarr")

    import tifffile

    tifffile.imwrite(d / "stack.tif", clean16, imagej=True, resolution=(2.0, 2.0), metadata={"spacing": 1.5})
    _cli("convert", d / "stack.tif", d / "conv.ome.zarr", "--chunks", 4, 16, 16, "--levels", 2)
    out["convert_tiff_levels"] = image_hashes(d / "conv.ome.zarr")
    return out


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = run_cases(tmp)
    print(json.dumps(result, indent=1))
    if "--record" in sys.argv:  # torch cases go under this CPU's capability (see tests/test_reference.py)
        import torch

        recorded = json.loads(REFERENCE.read_text()) if REFERENCE.exists() else {"any_cpu": {}, "torch_by_cpu": {}}
        torch_cases = set(next(iter(recorded["torch_by_cpu"].values()), {})) or set(result) - set(recorded["any_cpu"])
        recorded["any_cpu"].update({k: v for k, v in result.items() if k not in torch_cases})
        recorded["torch_by_cpu"][torch.backends.cpu.get_cpu_capability()] = {k: result[k] for k in torch_cases}
        REFERENCE.parent.mkdir(exist_ok=True)
        REFERENCE.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        print(f"recorded {REFERENCE}")
