"""The quick light-sheet example end to end (examples/lightsheet/run.py --quick): pinned download from PyPI, convert,
degrade at two photon budgets, train diffusion + regression, restore on a local Dask cluster, evaluate, figures."""

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lightsheet" / "run.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("lightsheet_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_lightsheet_example(tmp_path):
    example = _load_example()
    # A valid copy fetched earlier (shared/data/fetch-samples.sh puts one in sample-data/) saves the download;
    # fetch() checks its sha256 either way and downloads the pinned wheel otherwise.
    cached = ROOT / "sample-data"
    data = cached if (cached / "RBC_lattice.tif").is_file() else tmp_path / "data"
    try:
        example.fetch("RBC_lattice.tif", data)
    except (subprocess.CalledProcessError, OSError) as exc:
        pytest.skip(f"cannot download the pinned lls-core==2.2.3 wheel from the package index ({exc}); "
                    "the example needs network access to PyPI")

    result = example.main(["--quick", "--work", str(tmp_path / "work"), "--data", str(data),
                           "--figures", str(tmp_path / "figs")])

    figs = tmp_path / "figs"
    expected = ["rbc_before_after.png", "results.json"] + [
        f"rbc_{tag}_{kind}.png" for tag in ("p20", "p5") for kind in ("psnr", "calibration", "slices", "std")]
    for name in expected:
        assert (figs / name).is_file() and (figs / name).stat().st_size > 1000, name
    assert json.loads((figs / "results.json").read_text())["quick"] is True
    work = tmp_path / "work"
    for tag in ("p20", "p5"):
        for name in ("degraded", "gaussian", "regression", "diffusion_K1", "diffusion_K2", "diffusion_K2.std"):
            assert (work / tag / f"{name}.ome.zarr" / "zarr.json").is_file(), (tag, name)
        summary = {k: v["psnr"] for k, v in result["budgets"][tag]["summary"].items()}
        # Even the 150-iteration CI models improve on the noisy input: the regression baseline at both budgets,
        # DDPM-avg at 5 photons (at 20 photons 150 CPU iterations are not enough for the diffusion model to beat the
        # input: 18.0 vs 18.2 dB here; the full run's 300 iterations give 23.9 vs 18.7 dB). Averaging K = 2 samples
        # beats one sample at both budgets. Results are seeded, so these margins (>= 0.6 dB) do not flicker.
        assert summary["regression"] > summary["degraded"], (tag, summary)
        assert summary["diffusion_K2"] > summary["diffusion_K1"], (tag, summary)
        if tag == "p5":
            assert summary["diffusion_K2"] > summary["degraded"], (tag, summary)
        assert 0.0 <= result["budgets"][tag]["calibration_2std"] <= 1.0
