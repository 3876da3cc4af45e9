"""`volrestore evaluate`: blockwise numbers equal in-memory ones; comparison with Mood's test; errors; no-reference checks."""

import json

import numpy as np

import volrestore
import pytest
from click.testing import CliRunner

from volrestore.evaluation import evaluate as ev
from volrestore.evaluation import metrics
from volrestore.io import ngff
from volrestore.cli import main


def write_image(path, data, axes="zyx", scale=None, chunks=None):
    volrestore.write_image(path, data, axes=axes, scale=scale, chunks=chunks or data.shape)
    return path


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:40, :48, :48]
    clean = (200 + 1500 * np.exp(-((z - 20) ** 2 + (y - 24) ** 2 + (x - 20) ** 2) / 80.0)).astype(np.float32)
    noisy = clean + rng.normal(0, 60, clean.shape).astype(np.float32)
    better = clean + rng.normal(0, 20, clean.shape).astype(np.float32)
    return {
        "clean": clean, "noisy": noisy, "better": better,
        "clean_p": write_image(tmp / "clean.ome.zarr", clean, chunks=(8, 16, 16)),
        "noisy_p": write_image(tmp / "noisy.ome.zarr", noisy, chunks=(8, 16, 16)),
        "better_p": write_image(tmp / "better.ome.zarr", better, chunks=(16, 48, 48)),
        "tmp": tmp,
    }


def test_blockwise_equals_in_memory(volumes):
    lazy = ev.evaluate(volumes["noisy_p"], volumes["clean_p"], block_planes=11, ms_ssim=False)
    assert lazy["psnr"] == pytest.approx(metrics.psnr(volumes["noisy"], volumes["clean"]), rel=1e-12)
    assert lazy["ssim_3d"] == pytest.approx(metrics.ssim(volumes["noisy"], volumes["clean"]), rel=1e-10)
    assert lazy["nrmse"] == pytest.approx(
        metrics.nrmse(*(((a - lazy["normalisation"]["offset"]) / lazy["normalisation"]["scale"])
                        for a in (volumes["noisy"].astype(np.float64), volumes["clean"].astype(np.float64)))),
        rel=1e-10,
    )
    assert lazy["mae"] == pytest.approx(metrics.mae(volumes["noisy"], volumes["clean"]), rel=1e-9)
    whole = ev.evaluate(volumes["noisy_p"], volumes["clean_p"], block_planes=1000, ms_ssim=False)
    for key in ("psnr", "ssim_3d", "nrmse", "mae", "slice_psnr_median", "slice_ssim_median"):
        assert whole[key] == pytest.approx(lazy[key], rel=1e-10)


@pytest.mark.slow
def test_cli_json_and_per_slice_csv(volumes):
    csv_path = volumes["tmp"] / "slices.csv"
    result = CliRunner().invoke(main, ["evaluate", str(volumes["better_p"]), str(volumes["clean_p"]), "--json",
                                       "--per-slice", str(csv_path)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["psnr"] > metrics.psnr(volumes["noisy"], volumes["clean"]) + 5  # 3× less noise ≈ +9.5 dB
    assert 0 < data["slice_ms_ssim_median"] <= 1
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("lead,z,psnr,ssim,ms_ssim") and len(lines) == 41


def test_compare_reports_moods_test_and_draws_a_boxplot(volumes):
    png = volumes["tmp"] / "box.png"
    result = CliRunner().invoke(main, ["evaluate", "--compare", str(volumes["noisy_p"]), str(volumes["better_p"]),
                                       "--reference", str(volumes["clean_p"]), "--figure", str(png), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    (row,) = data["moods_test"]
    assert row["a"] == "noisy" and row["b"] == "better"
    assert row["p_value"] < 1e-6 and row["median_b"] > row["median_a"]
    assert png.stat().st_size > 5000


def test_no_reference_checks(volumes):
    result = CliRunner().invoke(main, ["evaluate", str(volumes["better_p"]), "--input", str(volumes["noisy_p"]),
                                       "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    # raw − (nearly clean) is nearly white noise; the raw input itself is strongly correlated (smooth blob)
    assert abs(data["residual_lag1_autocorrelation"]["x"]) < 0.1
    assert data["input_lag1_autocorrelation"]["x"] > 0.5


def test_errors(volumes, tmp_path):
    other = write_image(tmp_path / "small.ome.zarr", volumes["clean"][:20])
    flat = write_image(tmp_path / "flat.ome.zarr", np.ones((40, 48, 48), np.float32))
    scaled = write_image(tmp_path / "scaled.ome.zarr", volumes["clean"], scale=[2.0, 1.0, 1.0])
    cases = [
        (["evaluate", str(volumes["noisy_p"]), str(other)], "differ in shape"),
        (["evaluate", str(volumes["noisy_p"]), str(scaled)], "differ in voxel size"),
        (["evaluate", str(volumes["noisy_p"]), str(flat)], "no dynamic range"),
        (["evaluate", "--compare", str(volumes["noisy_p"]), "--reference", str(volumes["clean_p"])],
         "at least two methods"),
        (["evaluate", str(volumes["noisy_p"]), str(volumes["clean_p"]), "--mask", str(other)], "mask"),
        (["evaluate", str(volumes["noisy_p"]), str(volumes["clean_p"]), "--figure",
          str(tmp_path / "no" / "such" / "dir" / "f.png")], "cannot write"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and result.output.startswith("error: "), result.output


@pytest.mark.slow
def test_uncertainty_calibration_and_reliability_figure(volumes, tmp_path):
    std = write_image(tmp_path / "std.ome.zarr", np.full(volumes["clean"].shape, 20.0, np.float32))
    png = tmp_path / "rel.png"
    result = CliRunner().invoke(main, ["evaluate", str(volumes["better_p"]), str(volumes["clean_p"]),
                                       "--std", str(std), "--figure", str(png), "--json"])
    assert result.exit_code == 0, result.output
    # the error really is Gaussian with σ = 20, so 2σ covers ≈ 95.4 % of voxels
    assert json.loads(result.output)["calibration_2std"] == pytest.approx(0.954, abs=0.01)
    assert png.stat().st_size > 5000


@pytest.mark.parametrize("view, rows", [("slices", 1), ("ortho", 3), ("mip", 3)])
def test_figure_panels_have_the_expected_size(volumes, tmp_path, view, rows):
    from PIL import Image

    png = tmp_path / f"{view}.png"
    args = ["figure", str(volumes["noisy_p"]), str(volumes["better_p"]), str(volumes["clean_p"]),
            "--out", str(png), "--view", view, "--zoom", "10", "30", "10", "30"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    with Image.open(png) as im:
        assert im.size == (round(2.6 * 3 * 110), round(2.6 * (rows + 1) * 110))
        assert np.asarray(im.convert("L")).std() > 10  # not a blank canvas


def test_figure_errors(volumes, tmp_path):
    small = write_image(tmp_path / "s.ome.zarr", volumes["clean"][:10])
    result = CliRunner().invoke(main, ["figure", str(volumes["noisy_p"]), str(small), "--out", str(tmp_path / "f.png")])
    assert result.exit_code == 2 and "same region" in result.output
    result = CliRunner().invoke(main, ["figure", str(volumes["noisy_p"]), "--out", str(tmp_path / "x" / "f.png")])
    assert result.exit_code == 2 and "cannot write" in result.output


def test_seam_check_on_the_engine_tile_grid(tmp_path):
    rng = np.random.default_rng(8)
    src = write_image(tmp_path / "in.ome.zarr", rng.random((16, 40, 40)).astype(np.float32))
    out = tmp_path / "out.ome.zarr"
    result = CliRunner().invoke(main, ["restore", str(src), str(out), "--model", "gaussian:sigma=1", "--tile", "16",
                                       "16", "16", "--overlap", "4", "--workers", "1"])
    assert result.exit_code == 0, result.output
    clean = ev.seam_check(out)
    assert 0.8 < clean < 1.25  # the blended output has no seams
    # Add a step at every tile start along x (the grid recorded in the output's provenance): the check must see it.
    data = ngff.open_level(out, 0, mode="r+")
    values = data[...]
    for k in range(1, 4):
        values[:, :, k * 12 - 4:] += 0.2
    data[...] = values
    assert ev.seam_check(out) > 3
    # an image not written by `volrestore restore` has no tile grid to check
    assert ev.seam_check(src) is None
