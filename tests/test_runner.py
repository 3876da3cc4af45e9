"""The one blockwise runner on a real local Dask cluster: every block once, is_done skips, lazy consumption, a failing
block named after its retries; degrade and evaluate through it give the same bytes/numbers locally and on a cluster."""

import json

import numpy as np
import pytest
from _io_helpers import cli

import volrestore
from volrestore.blockwise.blocks import grid_blocks
from volrestore.blockwise.runner import TASK_RETRIES, run_blockwise
from volrestore.errors import UserError
from volrestore.io import ngff
from volrestore.simulate import synthetic


def square(block):
    return sum(a for a, _ in block.write) ** 2


def fail_on_one(block):
    if block.index == (1, 0):
        raise ValueError("chunk broken")
    return 0


def test_every_block_runs_once_and_done_ones_are_skipped(cluster):
    blocks = list(grid_blocks((10, 7), (4, 4)))
    seen = {}
    ran = run_blockwise(cluster, square, blocks, on_result=lambda b, r: seen.__setitem__(b.index, r), progress=False,
                        is_done=lambda b: b.index == (0, 0))
    assert ran == len(blocks) - 1 == 5
    assert seen == {b.index: square(b) for b in blocks if b.index != (0, 0)}


def test_blocks_are_consumed_lazily_within_the_window():
    taken = []

    def generate():
        for b in grid_blocks((64,), (1,)):
            taken.append(b.index)
            yield b

    first = []
    run_blockwise(None, square, generate(), window=3, progress=False,
                  on_result=lambda b, r: first.append(len(taken)) if not first else None)
    assert first[0] <= 4 and len(taken) == 64  # the first result arrived with at most window + 1 blocks drawn


def test_a_failing_block_stops_the_run_naming_it_after_the_retries(cluster):
    with pytest.raises(UserError, match=r"block \(1, 0\) failed .*ValueError: chunk broken") as err:
        run_blockwise(cluster, fail_on_one, grid_blocks((8, 4), (4, 4)), progress=False)
    assert f"after {TASK_RETRIES + 1} tries" in str(err.value)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    d = tmp_path_factory.mktemp("runner")
    data = (synthetic.phantom((12, 40, 40), seed=4) * 1000).astype("uint16")
    return str(volrestore.write_image(d / "clean.ome.zarr", data, chunks=(4, 16, 16)).path), d


def test_degrade_and_evaluate_on_a_cluster_equal_the_local_run(cluster, clean):
    src, d = clean
    addr = cluster.scheduler.address
    for name, extra in (("local", []), ("remote", ["--cluster", addr])):
        result = cli("degrade", src, d / f"{name}.ome.zarr", "--spec", "poisson:photons=5,seed=2", *extra)
        assert result.exit_code == 0, result.output
    a, b = (np.asarray(ngff.open_level(d / f"{n}.ome.zarr")[...]) for n in ("local", "remote"))
    assert a.tobytes() == b.tobytes() and not np.array_equal(a, ngff.open_level(src)[...])
    metrics = [json.loads(cli("evaluate", d / "local.ome.zarr", src, "--json", *extra).stdout)
               for extra in ([], ["--cluster", addr])]
    assert metrics[0]["psnr"] == metrics[1]["psnr"] and 5 < metrics[0]["psnr"] < 60
    assert metrics[0]["ssim_3d"] == metrics[1]["ssim_3d"]
