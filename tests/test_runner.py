"""The one blockwise runner on a real local Dask cluster: every block once, is_done skips, lazy consumption, a failing
block named after its real number of tries with its cause, advice and a log of the tracebacks; degrade and evaluate
through it give the same bytes/numbers locally and on a cluster."""

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from _io_helpers import cli

import volrestore
from volrestore.blockwise.blocks import grid_blocks
from volrestore.blockwise.runner import LOG_DIR_ENV, TASK_RETRIES, failure_log_path, run_blockwise
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


def test_a_failing_block_stops_the_run_naming_it_after_the_retries(cluster, tmp_path):
    log = tmp_path / "run.log"
    with pytest.raises(UserError, match=r"block \(1, 0\) failed .*ValueError: chunk broken") as err:
        run_blockwise(cluster, fail_on_one, grid_blocks((8, 4), (4, 4)), progress=False, log=log)
    assert f"after {TASK_RETRIES + 1} tries" in str(err.value) and f"tracebacks in {log}" in str(err.value)
    text = log.read_text()  # every try's worker traceback, the failing line of this file included
    assert text.count("ValueError: chunk broken") == TASK_RETRIES + 1 and 'raise ValueError("chunk broken")' in text


def fail_first_try(marker_dir, block):
    """Fails the first try of each block (a marker file per block counts tries across worker processes)."""
    marker = Path(marker_dir) / "_".join(map(str, block.index))
    if not marker.exists():
        marker.write_text("tried")
        raise OSError("transient")
    return 1


@pytest.mark.parametrize("where", ["threads", "cluster"])
def test_a_transient_failure_is_retried_and_the_run_completes(where, cluster, tmp_path):
    client = cluster if where == "cluster" else None
    ran = run_blockwise(client, fail_first_try, grid_blocks((8, 4), (4, 4)), args=(str(tmp_path),), progress=False,
                        log=tmp_path / "run.log")
    assert ran == 2 and (tmp_path / "run.log").read_text().count("try 1 failed, trying again") == 2


def test_a_user_error_in_a_task_is_not_retried_and_keeps_its_message(tmp_path):
    calls = []

    def damaged(block):
        calls.append(block.index)
        raise UserError("cannot read chunk c/0/0 of in.ome.zarr; the input is damaged: repair or re-convert it")

    with pytest.raises(UserError, match=r"block \(0,\) failed while reading after 1 try: cannot read chunk c/0/0"):
        run_blockwise(None, damaged, grid_blocks((4,), (4,)), progress=False, what="reading",
                      log=tmp_path / "run.log")
    assert calls == [(0,)]


@pytest.mark.parametrize("error, advice", [
    (MemoryError("cannot allocate 4 GiB"), "smaller --tile or --batch"),
    (OSError(errno.ENOSPC, "No space left on device", "/out.ome.zarr/0/c/0/0"), "the disk is full"),
    (PermissionError(errno.EACCES, "Permission denied", "/out.ome.zarr/0/c/0/0"), "not writable"),
])
def test_resource_failures_name_the_cause_the_file_and_what_to_do(error, advice, tmp_path):
    def failing(block):
        raise error

    with pytest.raises(UserError) as err:
        run_blockwise(None, failing, grid_blocks((4,), (4,)), progress=False, log=tmp_path / "run.log")
    message = str(err.value)
    assert advice in message and "\n" not in message and f"after {TASK_RETRIES + 1} tries" in message
    assert type(error).__name__ in message
    if isinstance(error, OSError):
        assert "file /out.ome.zarr/0/c/0/0" in message


def test_an_unwritable_log_does_not_hide_the_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"ValueError: chunk broken; no log written \("):
        run_blockwise(None, fail_on_one, grid_blocks((8, 4), (4, 4)), progress=False,
                      log=tmp_path / "file" / "run.log")


def test_the_default_log_goes_to_the_log_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(LOG_DIR_ENV, str(tmp_path))
    with pytest.raises(UserError) as err:
        run_blockwise(None, fail_on_one, grid_blocks((8, 4), (4, 4)), progress=False, key_prefix="myrun")
    assert str(failure_log_path("myrun")) in str(err.value) and (tmp_path / "volrestore-myrun.log").exists()


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    d = tmp_path_factory.mktemp("runner")
    data = (synthetic.phantom((12, 40, 40), seed=4) * 1000).astype("uint16")
    return str(volrestore.write_image(d / "clean.ome.zarr", data, chunks=(4, 16, 16)).path), d


@pytest.mark.slow
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


def die_on_one(block):
    if block.index == (1, 0):
        os._exit(3)  # the worker process dies, as one killed for memory does
    return 0


def test_a_block_that_kills_its_workers_reports_the_real_tries(cluster, tmp_path):
    """Last in this module: it restarts the workers of the shared cluster."""
    from volrestore.cluster.client import ALLOWED_FAILURES

    with pytest.raises(UserError) as err:
        run_blockwise(cluster, die_on_one, grid_blocks((8, 4), (4, 4)), progress=False, log=tmp_path / "run.log")
    message = str(err.value)
    assert f"block (1, 0) failed while processing after {ALLOWED_FAILURES + 1} tries" in message
    assert "worker process died" in message and "more memory" in message
