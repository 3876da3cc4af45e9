"""Output safety of restore on a real cluster and real files: the output lock (concurrent runs, --overwrite during a
run, stale locks), staged --overwrite, the verified complete flag, input fingerprints on --resume, fsync before
progress records."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr
from _io_helpers import assert_user_error, cli

from volrestore import write_image
from volrestore.blockwise import blocks
from volrestore.blockwise import lock as lock_module
from volrestore.blockwise.blocks import PROGRESS_DIR, mark_done
from volrestore.blockwise.lock import LOCK_NAME, OutputLock, read_lock
from volrestore.blockwise.outputs import STAGING_TAG, RunOutputs, std_path
from volrestore.blockwise.plan import Plan
from volrestore.blockwise.grid import Grid
from volrestore.config import ModelRef, RestoreConfig
from volrestore.errors import UserError
from volrestore.io import ngff

BLOCKS = ["--tile", 16, 16, 16, "--overlap", 4, "--chunks", 4, 16, 16, "--block", 4, 16, 16]  # 45 blocks
TESTS_DIR = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def addr(cluster):
    return cluster.scheduler.address


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    data = np.random.default_rng(1).random((20, 40, 36), dtype=np.float32) * 100
    path = tmp_path_factory.mktemp("vol") / "a.ome.zarr"
    write_image(path, data, axes="zyx", chunks=(8, 16, 16), n_levels=2)
    return data, str(path)


def read(path):
    return ngff.open_level(str(path), 0)[...]


def start(addr, src, out, *args):
    """A restore in its own process (a second user), on the shared cluster, slowed by the test model's sleep."""
    cmd = [sys.executable, "-c", "import testing_restorers; from volrestore.cli import main; main()", "restore",
           src, str(out), "--cluster", addr, *map(str, args)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(predicate, proc, timeout=120):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("timed out")


def markers(out):
    return sum(len(f) for _, _, f in os.walk(os.path.join(out, PROGRESS_DIR)))


# ----------------------------------------------------------------------------------------------- the lock


@pytest.mark.slow
def test_two_runs_at_once_into_one_output_exactly_one_proceeds(addr, volume, tmp_path):
    _, src = volume
    out = tmp_path / "out.ome.zarr"
    procs = [start(addr, src, out, "--model", "test-randcnn:sleep=0.2", *BLOCKS) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    lines = loser[2].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "locked by another run" in lines[0], loser
    assert f"host {socket.gethostname()} pid" in lines[0]
    info = ngff.read_info(out)
    assert info.complete and markers(out) == 0 and not (out / LOCK_NAME).exists()
    ref = tmp_path / "ref.ome.zarr"
    assert cli("restore", src, ref, "--cluster", addr, "--model", "randcnn", *BLOCKS).exit_code == 0
    assert read(out).tobytes() == read(ref).tobytes()


@pytest.mark.slow
def test_overwrite_and_resume_during_a_run_are_refused(addr, volume, tmp_path):
    _, src = volume
    out = tmp_path / "out.ome.zarr"
    proc = start(addr, src, out, "--model", "test-randcnn:sleep=0.2", *BLOCKS)
    wait_for(lambda: markers(out) >= 2, proc)
    owner = read_lock(out)
    assert owner["pid"] == proc.pid and owner["host"] == socket.gethostname()
    for flag in ("--overwrite", "--resume"):
        msg = assert_user_error(cli("restore", src, out, "--cluster", addr, "--model", "randcnn", *BLOCKS, flag))
        assert "locked by another run" in msg and f"pid {proc.pid}" in msg, msg
    msg = assert_user_error(cli("restore", src, out, "--cluster", addr, "--model", "randcnn", *BLOCKS))
    assert "locked by another run" in msg
    assert proc.wait(timeout=300) == 0, proc.communicate()
    assert ngff.read_info(out).complete and not (out / LOCK_NAME).exists()


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(folder, **fields):
    record = {"run": "r" * 32, "host": socket.gethostname(), "pid": os.getpid(), "started": "then",
              "heartbeat": time.time(), **fields}
    os.makedirs(folder, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps(record))
    return record


def test_stale_lock_is_detected_and_broken_only_when_asked(tmp_path, monkeypatch):
    folder = tmp_path / "o"
    write_lock(folder, pid=dead_pid())  # this host, process gone: stale at once
    with pytest.raises(UserError, match="stale lock .* pass --break-lock"):
        OutputLock(folder).acquire(create=False)
    with OutputLock(folder, break_lock=True).acquire(create=False) as taken:
        assert read_lock(folder)["run"] == taken.run and read_lock(folder)["pid"] == os.getpid()
    assert not (folder / LOCK_NAME).exists()  # released

    write_lock(folder, host="elsewhere", heartbeat=time.time())  # another host, beating: live, never broken
    with pytest.raises(UserError, match="locked by another run: host elsewhere"):
        OutputLock(folder, break_lock=True).acquire(create=False)
    monkeypatch.setattr(lock_module, "STALE_AFTER_S", 5.0)
    write_lock(folder, host="elsewhere", heartbeat=time.time() - 60)  # its heartbeat stopped: stale
    with pytest.raises(UserError, match="stale lock"):
        OutputLock(folder).acquire(create=False)


def test_heartbeat_keeps_a_long_run_live(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_module, "HEARTBEAT_S", 0.05)
    folder = tmp_path / "o"
    with OutputLock(folder).acquire(create=True):
        first = read_lock(folder)["heartbeat"]
        time.sleep(0.3)
        assert read_lock(folder)["heartbeat"] > first
        assert not lock_module.is_stale(read_lock(folder))


# ----------------------------------------------------------------------------------------------- overwrite


@pytest.mark.slow
def test_killed_overwrite_leaves_the_old_output_and_a_later_one_replaces_it(addr, volume, tmp_path):
    _, src = volume
    out = tmp_path / "out.ome.zarr"
    assert cli("restore", src, out, "--cluster", addr, "--model", "randcnn", "--samples", 2, "--std",
               *BLOCKS).exit_code == 0
    before = read(out).tobytes()
    proc = start(addr, src, out, "--model", "test-gaussian:sleep=0.2", *BLOCKS, "--overwrite")
    staged = lambda: [p for p in tmp_path.iterdir() if STAGING_TAG in p.name]  # noqa: E731
    wait_for(lambda: any(markers(p) >= 2 for p in staged()), proc)
    proc.kill()
    proc.wait()
    info = ngff.read_info(out)
    assert info.complete and read(out).tobytes() == before  # the old result, untouched
    msg = assert_user_error(cli("restore", src, out, "--cluster", addr, "--model", "gaussian", *BLOCKS,
                                "--overwrite"))
    assert "stale lock" in msg and "--break-lock" in msg
    result = cli("restore", src, out, "--cluster", addr, "--model", "gaussian", *BLOCKS, "--overwrite",
                 "--break-lock")
    assert result.exit_code == 0, result.output
    info = ngff.read_info(out)
    assert info.complete and info.provenance["parameters"]["model"]["name"] == "gaussian"
    assert not staged() and not os.path.exists(std_path(out))  # the old std belonged to the old model: gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.ome.zarr"]


def test_failed_fresh_run_leaves_no_output_folder(addr, tmp_path):
    data = np.ones((8, 16, 16), np.float32)
    data[2, 3, 4] = np.nan
    src = tmp_path / "nan.ome.zarr"
    write_image(src, data, axes="zyx", chunks=(8, 16, 16))
    out = tmp_path / "out.ome.zarr"
    assert_user_error(cli("restore", src, out, "--cluster", addr, "--model", "identity"), out, contains="NaN")


# ----------------------------------------------------------------------------------------------- resume


def test_relative_paths_work_on_a_cluster_whose_workers_run_elsewhere(addr, monkeypatch, tmp_path):
    """Workers of a remote or batch cluster start in other folders, and a user resumes from another folder: the
    images and the checkpoint given by relative paths reach the workers (and provenance) as absolute paths."""
    import shutil

    from volrestore.model.diffusion_restorer import default_model_path

    shutil.copy(default_model_path("regression"), tmp_path / "m.pt")
    src = tmp_path / "in.ome.zarr"
    write_image(src, np.random.default_rng(2).random((2, 32, 32), dtype=np.float32), axes="zyx")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    args = ["--cluster", addr, "--blend", "off", "--tile", 1, 32, 32, "--overlap", 8]
    result = cli("restore", "in.ome.zarr", "out.ome.zarr", "--model", "m.pt", *args)
    assert result.exit_code == 0, result.stderr
    model = ngff.read_info(tmp_path / "out.ome.zarr").provenance["parameters"]["model"]
    assert model["name"] == str(tmp_path / "m.pt")
    monkeypatch.chdir(tmp_path / "sub")
    result = cli("restore", "../in.ome.zarr", "../out.ome.zarr", "--model", "../m.pt", *args, "--resume")
    assert result.exit_code == 0 and "already complete" in result.output, result.output
    result = cli("degrade", "../in.ome.zarr", "d.ome.zarr", "--spec", "poisson:photons=5", "--cluster", addr)
    assert result.exit_code == 0 and ngff.read_info(tmp_path / "sub" / "d.ome.zarr").complete, result.stderr
    result = cli("evaluate", "d.ome.zarr", "../in.ome.zarr", "--cluster", addr, "--json")
    assert result.exit_code == 0 and '"psnr"' in result.stdout, result.stderr


def test_resume_refuses_a_changed_input(addr, volume, tmp_path):
    data, _ = volume
    src = tmp_path / "in.ome.zarr"
    write_image(src, data, axes="zyx", chunks=(8, 16, 16), n_levels=2)
    out = tmp_path / "out.ome.zarr"
    assert cli("restore", src, out, "--cluster", addr, "--model", "identity", *BLOCKS).exit_code == 0
    prov = ngff.read_info(out).provenance["inputs"]["input"]
    assert prov["shape"] == [20, 40, 36] and prov["dtype"] == "float32" and len(prov["sample_sha256"]) == 64
    assert "already complete" in cli("restore", src, out, "--cluster", addr, "--model", "identity", *BLOCKS,
                                     "--resume").output
    array = zarr.open_array(str(src / "0"), mode="r+")
    array[5, 5, 5] = -1.0  # same shape, dtype and metadata: only the content changed
    msg = assert_user_error(cli("restore", src, out, "--cluster", addr, "--model", "identity", *BLOCKS,
                                "--resume"))
    assert "is not the one it was started from" in msg and "content" in msg and "--overwrite" in msg, msg


def test_complete_is_set_only_when_every_block_is_recorded(tmp_path):
    out = tmp_path / "o.ome.zarr"
    config = RestoreConfig.validated(input=str(tmp_path / "in"), output=str(out), model=ModelRef.parse("identity"))
    outputs = RunOutputs(config, [str(out)], {}, {})
    progress = out / PROGRESS_DIR
    plan = Plan(run="x", input="", input_array="0", outputs=(), progress=str(progress), axes=("z", "y", "x"),
                shape=(4, 4, 8), block=(4, 4, 4), grid=Grid.build([4, 4, 8], [4, 4, 4], [0, 0, 0], [1, 1, 1],
                                                                  [0, 0, 0]),
                seed=0, batch=1, dtype="float32", fill_nan=False, mask=None)
    mark_done(plan, (0, 0, 0))
    with pytest.raises(UserError, match=r"1 of 2 blocks .* not recorded done .*; rerun with --resume"):
        outputs.verify_done(plan)
    mark_done(plan, (0, 0, 1))
    outputs.verify_done(plan)


def test_block_chunks_are_fsynced_before_the_marker(tmp_path, monkeypatch):
    out = tmp_path / "o.ome.zarr"
    ngff.create_image(out, shape=(4, 4, 8), dtype="uint16", axes="zyx", scale=[1, 1, 1], chunks=(4, 4, 4))
    ngff.open_level(str(out), 0, mode="r+")[:, :, 4:] = 7  # the block (0, 0, 1) wrote its one chunk
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd)))
    plan = Plan(run="x", input="", input_array="0", outputs=(("mean", str(out), "0"),),
                progress=str(out / PROGRESS_DIR), axes=("z", "y", "x"), shape=(4, 4, 8), block=(4, 4, 4),
                grid=Grid.build([4, 4, 8], [4, 4, 4], [0, 0, 0], [1, 1, 1], [0, 0, 0]), seed=0, batch=1,
                dtype="float32", fill_nan=False, mask=None)
    mark_done(plan, (0, 0, 1))
    chunk = str(out / "0" / "c" / "0" / "0" / "1")
    assert chunk in synced and str(out / "0" / "c" / "0" / "0") in synced, synced
    assert (out / PROGRESS_DIR / "0" / "1").read_text() == "0_0_1\n"  # group 1 of 2, one block each


# ----------------------------------------------------------------------------------------------- compact progress


def tiny_plan(progress, shape=(4, 4, 8), block=(4, 4, 4), **kw):
    fields = dict(run="x", input="", input_array="0", outputs=(), progress=str(progress), axes=("z", "y", "x"),
                  shape=shape, block=block, grid=Grid.build(list(shape), [4, 4, 4], [0, 0, 0], [1, 1, 1], [0, 0, 0]),
                  seed=0, batch=1, dtype="float32", fill_nan=False, mask=None)
    return Plan(**{**fields, **kw})


def test_progress_records_are_bounded_and_resume_reads_them(tmp_path, monkeypatch):
    monkeypatch.setattr(blocks, "MAX_PROGRESS_RECORDS", 3)
    shape, block = (4, 4, 40), (4, 4, 4)  # 10 blocks -> groups of 4: 3 records
    group = blocks.progress_group_for(shape, block)
    plan = tiny_plan(tmp_path / "p", shape=shape, block=block, progress_group=group)
    assert group == 4 and blocks.n_groups(plan) == 3
    assert [blocks.block_group(plan, (0, 0, i)) for i in range(10)] == [0] * 4 + [1] * 4 + [2] * 2
    for i in (0, 1, 2, 3, 5, 9):
        mark_done(plan, (0, 0, i))
    with open(blocks.marker_path(plan, 2), "a") as f:
        f.write("0_0_")  # a line cut by a crash counts for nothing
    records = [f for _, _, files in os.walk(plan.progress) for f in files]
    assert sorted(records) == ["0", "1", "2"]
    assert blocks.count_done(plan) == 6
    assert list(blocks.iter_blocks(plan, skip_done=True)) == [(0, 0, 4), (0, 0, 6), (0, 0, 7), (0, 0, 8)]
    assert list(blocks.iter_groups(plan, skip_done=True)) == [(0, 0, 4), (0, 0, 8)]  # group 0 is done


def test_grouped_progress_restores_the_same_bytes(addr, volume, tmp_path, monkeypatch):
    _, src = volume
    ref, out = tmp_path / "ref.ome.zarr", tmp_path / "grouped.ome.zarr"
    assert cli("restore", src, ref, "--cluster", addr, "--model", "randcnn", *BLOCKS).exit_code == 0
    monkeypatch.setattr(blocks, "MAX_PROGRESS_RECORDS", 4)  # 45 blocks in groups of 12 (fixed in the plan)
    result = cli("restore", src, out, "--cluster", addr, "--model", "randcnn", *BLOCKS, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["restored"] == 45 and summary["blocks"] == 45
    assert read(out).tobytes() == read(ref).tobytes() and ngff.read_info(out).complete
