"""`volrestore benchmark --json` on a tiny preset: every documented field present and consistent (never the speed)."""

import json
import math

import pytest
from _io_helpers import assert_user_error, cli

from volrestore.evaluation import benchmark


@pytest.mark.slow
def test_benchmark_json_fields_are_complete_and_consistent():
    result = cli("benchmark", "--preset", "tiny-3d", "--size", 16, 16, 16, "--tile", 16, 16, 16,
                 "--overlap", 4, "--batch", 3, "--steps", 2, "--samples", 2, "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    r = json.loads(result.stdout)
    assert set(r) == set(benchmark.FIELDS)
    assert r["trained"] is False and r["device"] == "cpu" and r["workers"] == 1 and r["cluster"] == "local"
    assert r["shape"] == [16, 16, 16] and r["voxels"] == 16**3 and r["tile"] == [16, 16, 16] and r["overlap"] == 4
    assert r["tiles"] == 8 and r["batch_settled"] == 3 and r["tile_recompute_factor"] == 1.0
    # The bare pass calls the restorer on every tile once in batches of exactly 3 (the last padded), and each tile
    # costs K samples x steps network evaluations.
    assert r["evaluations_per_pass"] == math.ceil(8 / 3) * 3 * 2 * 2
    assert r["bare_voxels_per_s"] == pytest.approx(sum(r["bare_voxels_per_s_runs"]) / 2)
    assert r["efficiency"] == pytest.approx(r["e2e_voxels_per_s"] / r["bare_voxels_per_s"])
    assert r["efficiency_per_worker"] == pytest.approx(r["efficiency"])
    assert r["hours_per_tb"] == pytest.approx(1e12 / 2 / r["e2e_voxels_per_s"] / 3600)
    assert r["hours_per_tb_bare"] == pytest.approx(1e12 / 2 / r["bare_voxels_per_s"] / 3600)
    assert r["flop_per_evaluation"] > 0
    # Projected to restore's defaults for this model (K = 1, the sampler's default steps), linear in K x steps.
    assert r["default_samples"] == 1 and r["default_steps"] == 10  # DDIM, 10 steps on EDM models
    assert r["hours_per_tb_default"] == pytest.approx(r["hours_per_tb"] * 10 / (2 * 2))
    assert r["hours_per_tb_regression"] == pytest.approx(r["hours_per_tb"] / (2 * 2))
    assert r["evaluations_per_voxel"] == pytest.approx(r["evaluations_per_pass"] * 16**3 / 16**3)
    assert r["flop_per_voxel"] == pytest.approx(r["evaluations_per_pass"] * r["flop_per_evaluation"] / r["voxels"])
    assert r["achieved_flop_per_s"] == pytest.approx(r["flop_per_voxel"] * r["bare_voxels_per_s"])
    assert r["e2e_flop_per_s"] == pytest.approx(r["flop_per_voxel"] * r["e2e_voxels_per_s"])
    assert 0 < r["model_busy_share"] <= 1.0 + 1e-6
    assert r["peak_bf16_flop_per_s"] is None and r["peak_share"] is None  # CPU: no known peak
    assert r["peak_gpu_mib_bare"] is None and r["peak_gpu_mib_e2e"] is None and r["peak_rss_mib"] > 0


def test_known_gpu_peaks_and_size_parsing():
    assert benchmark.peak_bf16("NVIDIA H100 80GB HBM3") == 989e12
    assert benchmark.peak_bf16("NVIDIA H100 PCIe") == 756e12
    assert benchmark.peak_bf16("NVIDIA H200") == 989e12
    assert benchmark.peak_bf16("NVIDIA A100-SXM4-80GB") == 312e12
    assert benchmark.peak_bf16("NVIDIA GeForce RTX 4090") is None
    assert benchmark.parse_size((8, 32, 48), 64) == (8, 32, 48) and benchmark.parse_size(None, 64) == (64, 64, 64)


@pytest.mark.parametrize("args, contains", [
    (["--size", 0, 8, 8], "--size needs three positive whole numbers"),
    (["--size", "8x8"], "'--size'"),
    (["--preset", "nope"], "unknown preset"),
    (["--device", "cuda"] if not __import__("torch").cuda.is_available() else ["--size", "x"], ""),
])
def test_bad_benchmark_arguments_exit_2_with_one_line(args, contains):
    assert_user_error(cli("benchmark", *args), contains=contains)


def test_benchmark_defaults_measure_the_default_model_on_its_default_tile():
    from volrestore.model.diffusion_restorer import DEFAULT_TILE

    cfg = benchmark.default_preset()
    from volrestore.blockwise.grid import AxisGrid

    tile, overlap = DEFAULT_TILE[cfg["spatial_dims"]]
    size = benchmark.default_size(cfg, "cpu")
    assert cfg["spatial_dims"] == 3 or size[0] == 1
    # Exactly one tile of the model's real default shape, covering the volume with its full overlap as context.
    assert [AxisGrid(n, t, overlap).count for n, t in zip(size[-len(tile):], tile)] == [1] * len(tile)
    assert [AxisGrid(n + 1, t, overlap).count for n, t in zip(size[-len(tile):], tile)] == [2] * len(tile)


def test_auto_write_blocks_keep_their_accumulators_within_the_budget(tmp_path, monkeypatch):
    """A 2D model's 512² tiles on 128-slice z chunks: 4 tile strides (2048² x 128) would hold 4 GiB of float64 per
    block; the default gives up whole chunks on the overlapping axes until it fits (2 GiB), and fewer with --std.
    Results do not depend on blocks (tests/test_batching.py), only memory and recompute do."""
    from volrestore.blockwise import plan as planning
    from volrestore.io import ngff

    image = tmp_path / "big.ome.zarr"
    ngff.create_image(image, shape=[128, 4096, 4096], dtype="uint16", axes="zyx", scale=[1, 1, 1],
                      chunks=[128, 256, 256])  # metadata only: nothing is read to plan
    budget = planning.BLOCK_BUDGET_BYTES
    blocks = {}
    for outputs, opts in ((1, {}), (2, {"samples": 2, "std": True})):
        plan, spec = planning.plan(image, model="randcnn:dims=2", tile=[512, 512], overlap=32, **opts)
        assert len(spec.outputs) == outputs
        blocks[outputs] = plan.block
        assert plan.block[0] == 128 and all(b % 256 == 0 for b in plan.block[1:])
        assert math.prod(plan.block) * 8 * outputs <= budget < math.prod(plan.block) * 8 * outputs * 1.3
    assert blocks[1] == (128, 1280, 1536) and math.prod(blocks[2]) < math.prod(blocks[1])
    monkeypatch.setattr(planning, "BLOCK_BUDGET_BYTES", 1 << 40)
    assert planning.plan(image, model="randcnn:dims=2", tile=[512, 512], overlap=32)[0].block == (128, 2048, 2048)
