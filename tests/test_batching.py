"""Batched tiles in the diffusion restorer (issue 14): all tiles of a call and their K samples run as one forward,
and a tile's result still depends only on (input, model, options, seed, tile grid, --batch): not on which tiles share
its call, its position there, the write-blocks, the output chunks or the workers."""

import numpy as np
import pytest
from _io_helpers import cli

from volrestore import write_image
from volrestore.io import ngff
from volrestore.model.diffusion_restorer import DiffusionRestorer, default_model_path


@pytest.fixture(scope="module")
def restorer():
    return DiffusionRestorer(str(default_model_path()), samples=2, steps=2)


def test_a_tile_result_does_not_depend_on_its_batch_mates_or_position(restorer):
    rng = np.random.default_rng(0)
    tiles = rng.random((4, 5, 32, 32)).astype(np.float32)
    origins = [(0, 0, 0), (0, 0, 24), (0, 24, 0), (0, 24, 24)]
    ref = restorer(tiles, origins, 7)["mean"]
    perm = [2, 0, 3, 1]
    shuffled = restorer(tiles[perm], [origins[i] for i in perm], 7)["mean"]
    for j, i in enumerate(perm):
        assert np.array_equal(shuffled[j], ref[i])
    others = np.concatenate([tiles[:1], rng.random((3, 5, 32, 32)).astype(np.float32)])
    assert np.array_equal(restorer(others, origins, 7)["mean"][0], ref[0])
    single = restorer(tiles[:1], origins[:1], 7)["mean"][0]  # another batch size: within float rounding only
    np.testing.assert_allclose(single, ref[0], rtol=0, atol=1e-5 * np.abs(ref[0]).max())


@pytest.mark.slow
def test_batched_restore_is_bitwise_across_blocks_and_chunks(session_cluster, tmp_path):
    data = (np.random.default_rng(3).random((3, 56, 72)) * 1000).astype(np.uint16)
    src = tmp_path / "in.ome.zarr"
    write_image(src, data, axes="zyx", chunks=(1, 32, 32))
    args = ["--model", "default", "--steps", 2, "--tile", 1, 32, 32, "--overlap", 8, "--batch", 3,
            "--cluster", session_cluster.scheduler.address]
    a, b = tmp_path / "a.ome.zarr", tmp_path / "b.ome.zarr"
    assert cli("restore", src, a, *args).exit_code == 0
    assert cli("restore", src, b, *args, "--chunks", 1, 8, 24, "--block", 2, 16, 48).exit_code == 0
    ra, rb = ngff.open_level(str(a), 0)[...], ngff.open_level(str(b), 0)[...]
    assert ra.tobytes() == rb.tobytes() and ra.std() > 0
