"""Blockwise restore engine on real OME-Zarr files and a real local Dask cluster: exactness, determinism, resume,
worker failure, masks and every bad-input error (through the CLI and the API)."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import testing_restorers
import pytest
from _io_helpers import assert_user_error, cli

from volrestore import write_image
from volrestore.io import ngff
from volrestore.blockwise.blocks import PROGRESS_DIR
from volrestore.blockwise.restore import restore, std_path
from volrestore.io.storage import sample_chunks

TILE = ["--tile", 16, 16, 16, "--overlap", 4]


@pytest.fixture(scope="module")
def addr(cluster):
    return cluster.scheduler.address


def make_image(path, data, chunks, axes="zyx", scale=None, translation=None, n_levels=2):
    write_image(path, data, axes=axes, chunks=chunks, n_levels=n_levels, scale=scale, translation=translation)
    return str(path)


def read(path, level=0):
    return ngff.open_level(str(path), level)[...]


def bitwise(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def run(addr, src, out, *args):
    model = () if "--model" in args else ("--model", "identity")  # the CLI's default is the shipped model
    result = cli("restore", src, out, "--cluster", addr, *model, *args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    rng = np.random.default_rng(1)
    data = rng.random((20, 40, 36), dtype=np.float32) * 100
    d = tmp_path_factory.mktemp("vol")
    return data, make_image(d / "a.ome.zarr", data, (8, 16, 16)), make_image(d / "b.ome.zarr", data, (5, 7, 40))


# ----------------------------------------------------------------------------------------------- exactness


def test_identity_reproduces_input_and_keeps_metadata(addr, tmp_path):
    data = np.random.default_rng(0).random((2, 12, 30, 26), dtype=np.float32)
    src = make_image(tmp_path / "in.ome.zarr", data, (1, 8, 16, 16), axes="czyx", scale=[1.0, 2.0, 0.5, 0.5],
                     translation=[0.0, 3.0, 1.0, -1.0])
    out = tmp_path / "out.ome.zarr"
    run(addr, src, out, *TILE, "--block", 8, 16, 16)
    np.testing.assert_allclose(read(out), data, rtol=1e-6, atol=0)
    info, ref = ngff.read_info(out), ngff.read_info(src)
    assert info.complete and info.axes == ref.axes and info.levels[0].scale == ref.levels[0].scale
    assert info.levels[0].translation == ref.levels[0].translation
    assert info.provenance["parameters"]["model"] == {"name": "identity", "options": {"dims": 3}}
    assert not (out / PROGRESS_DIR).exists()


def test_linear_ramp_has_no_step_at_tile_borders(addr, tmp_path):
    z, y, x = np.meshgrid(np.arange(18), np.arange(33), np.arange(29), indexing="ij")
    ramp = (0.5 * z + 1.25 * y - 0.75 * x + 10).astype(np.float32)
    src = make_image(tmp_path / "ramp.ome.zarr", ramp, (9, 11, 29))
    out = tmp_path / "out.ome.zarr"
    run(addr, src, out, "--tile", 8, 8, 8, "--overlap", 3, "--block", 9, 11, 29, "--model", "identity:dims=3")
    got = read(out).astype(np.float64)
    np.testing.assert_allclose(got, ramp, atol=1e-5)
    for axis in range(3):  # constant slope everywhere: no jump where tiles or blocks meet
        np.testing.assert_allclose(np.diff(got, n=2, axis=axis), 0, atol=1e-4)


def test_tile_larger_than_the_volume_is_clipped(addr, volume, tmp_path):
    data, a, _ = volume
    out = tmp_path / "big-tile.ome.zarr"
    run(addr, a, out, "--model", "randcnn", "--tile", 128, 128, 128, "--overlap", 8)
    assert ngff.read_info(out).provenance["parameters"]["tile"] == [128, 128, 128]
    identity = tmp_path / "id.ome.zarr"
    run(addr, a, identity, "--tile", 256, 256, 256, "--overlap", 8)
    np.testing.assert_allclose(read(identity), data, rtol=1e-6)


def test_2d_restorer_runs_slice_wise_and_dtype_input_clips(addr, tmp_path):
    data = (np.random.default_rng(2).random((6, 30, 30)) * 70000 - 2000).clip(0, 65535).astype(np.uint16)
    src = make_image(tmp_path / "u16.ome.zarr", data, (2, 16, 16))
    out = tmp_path / "out.ome.zarr"
    run(addr, src, out, "--model", "identity:dims=2", "--tile", 1, 16, 16, "--overlap", 4, "--dtype", "input")
    got = read(out)
    assert got.dtype == np.uint16 and np.array_equal(got, data)
    out2 = tmp_path / "g.ome.zarr"
    run(addr, src, out2, "--model", "gaussian:sigma=3,dims=2", "--tile", 1, 16, 16, "--overlap", 4,
        "--dtype", "input")
    assert read(out2).dtype == np.uint16
    assert ngff.read_info(out2).complete and read(out2, 1).any()  # pyramid built after the base level


# ----------------------------------------------------------------------------------------------- determinism


def test_bitwise_across_input_chunking_and_workers(addr, volume, tmp_path):
    data, a, b = volume
    args = ("--model", "randcnn", *TILE, "--chunks", 8, 16, 16, "--block", 8, 16, 16)
    run(addr, a, tmp_path / "a.ome.zarr", *args)
    run(addr, b, tmp_path / "b.ome.zarr", *args)
    run("local", a, tmp_path / "one.ome.zarr", *args, "--workers", 1)
    ref = read(tmp_path / "a.ome.zarr")
    assert not np.allclose(ref, data)  # the CNN really changed something
    assert bitwise(ref, read(tmp_path / "b.ome.zarr"))
    assert bitwise(ref, read(tmp_path / "one.ome.zarr"))


def test_output_chunking_and_batch(addr, volume, tmp_path, record_property):
    """Tolerance 1e-5 is the promise; record whether bitwise held (batches are padded to a fixed size)."""
    data, a, _ = volume
    base = ("--model", "randcnn", *TILE)
    run(addr, a, tmp_path / "r.ome.zarr", *base, "--chunks", 8, 16, 16, "--block", 8, 16, 16, "--batch", 4)
    run(addr, a, tmp_path / "c.ome.zarr", *base, "--chunks", 10, 20, 12, "--batch", 4)
    run(addr, a, tmp_path / "b.ome.zarr", *base, "--chunks", 8, 16, 16, "--block", 8, 16, 16, "--batch", 3)
    ref = read(tmp_path / "r.ome.zarr")
    for name in ("c", "b"):
        got = read(tmp_path / f"{name}.ome.zarr")
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        record_property(f"bitwise_{name}", bitwise(got, ref))
        print(f"{'output chunking' if name == 'c' else 'batch size'}: bitwise={bitwise(got, ref)}")
    assert bitwise(read(tmp_path / "c.ome.zarr"), ref)  # holds thanks to fixed-size batches


def test_std_output_is_a_sibling_image(addr, volume, tmp_path):
    _, a, _ = volume
    out = tmp_path / "s.ome.zarr"
    run(addr, a, out, "--model", "randcnn", *TILE, "--samples", 2, "--std")
    std = read(std_path(out))
    assert std_path(out).endswith("s.std.ome.zarr") and ngff.read_info(std_path(out)).complete
    assert std.shape == read(out).shape and (std >= 0).all() and std.max() > 0


# ----------------------------------------------------------------------------------------------- resume, failures


def _wait_for_markers(out, n, proc=None, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        prog = os.path.join(out, PROGRESS_DIR)
        done = sum(len(f) for _, _, f in os.walk(prog)) if os.path.isdir(prog) else 0
        if done >= n:
            return done
        assert proc is None or proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} blocks done in {timeout}s")


@pytest.mark.slow
def test_kill_process_group_and_resume_is_bitwise(addr, volume, tmp_path):
    _, a, _ = volume
    args = [*map(str, TILE), "--chunks", "4", "16", "16", "--block", "4", "16", "16"]  # 45 blocks
    ref = tmp_path / "ref.ome.zarr"
    run(addr, a, ref, "--model", "randcnn", *args)
    out = tmp_path / "killed.ome.zarr"
    proc = subprocess.Popen(
        [sys.executable, "-c", "import testing_restorers; from volrestore.cli import main; main()", "restore", a, str(out), "--model", "test-randcnn:sleep=0.3",
         "--workers", "2", *args], start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])})
    try:
        _wait_for_markers(out, 4, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert ngff.read_info(out).complete is False
    # The killed run's lock stays behind: --resume alone names it as stale; --break-lock takes it over.
    stale = cli("restore", a, out, "--cluster", addr, "--model", "test-randcnn", *args, "--resume")
    assert stale.exit_code == 2 and "stale lock" in stale.output and "--break-lock" in stale.output, stale.output
    result = run(addr, a, out, "--model", "test-randcnn", *args, "--resume", "--break-lock")  # sleep: an extra
    skipped = int(result.output.split("resuming")[1].split(":")[1].split()[0])
    assert 4 <= skipped < 45, result.output
    assert ngff.read_info(out).complete
    assert bitwise(read(out), read(ref)) and bitwise(read(out, 1), read(ref, 1))
    assert "already complete" in run(addr, a, out, "--model", "test-randcnn", *args, "--resume").output


@pytest.mark.slow
def test_worker_sigkill_mid_run_completes_identically(volume, tmp_path):
    from volrestore.cluster.client import connect

    _, a, _ = volume
    kw = dict(model="randcnn", tile=[16, 16, 16], overlap=4, chunks=[4, 16, 16], block=[4, 16, 16], progress=False)
    with connect("local", workers=2, echo=lambda *_: None) as client:
        restore(a, tmp_path / "ref.ome.zarr", cluster=client, **kw)
        out = tmp_path / "out.ome.zarr"
        errors = []

        def go():
            try:
                restore(a, out, cluster=client, **{**kw, "model": "test-randcnn:sleep=0.2"})
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

        thread = threading.Thread(target=go)
        thread.start()
        _wait_for_markers(out, 3)
        victim = next(iter(client.run(os.getpid).values()))
        os.kill(victim, signal.SIGKILL)
        thread.join(timeout=180)
        assert not thread.is_alive() and not errors, errors
        assert bitwise(read(out), read(tmp_path / "ref.ome.zarr"))


def test_failing_block_stops_the_run_naming_it(addr, tmp_path):
    data = np.ones((8, 16, 16 * 12), np.uint16)  # integer input: no NaN pre-pass, the block task meets the damage
    src = make_image(tmp_path / "in.ome.zarr", data, (8, 16, 16))
    assert (0, 0, 4) not in sample_chunks(data.shape, (8, 16, 16))  # the input fingerprint does not read it
    chunk = tmp_path / "in.ome.zarr" / "0" / "c" / "0" / "0" / "4"
    chunk.write_bytes(b"not a chunk")
    out = tmp_path / "out.ome.zarr"
    msg = assert_user_error(cli("restore", src, out, "--cluster", addr, "--model", "identity", *TILE,
                                "--block", 8, 16, 16))
    assert re.search(r"block \(0, 0, [345]\) failed while restoring after 3 tries: RuntimeError", msg), msg
    assert ngff.read_info(out).complete is False


# ----------------------------------------------------------------------------------------------- masks


def test_mask_at_a_coarser_level_skips_empty_blocks(addr, volume, tmp_path):
    data, a, _ = volume
    mask = np.zeros((10, 20, 18), np.uint8)  # half resolution, same field of view
    mask[:4, :8, :8] = 1
    m = make_image(tmp_path / "mask.ome.zarr", mask, (10, 20, 18), scale=[2.0, 2.0, 2.0],
                   translation=[0.5, 0.5, 0.5])
    out = tmp_path / "out.ome.zarr"
    result = run(addr, a, out, *TILE, "--chunks", 8, 16, 16, "--block", 8, 16, 16, "--mask", m)
    assert "restored 1 blocks, 26 empty (mask)" in result.output, result.output
    got = read(out)
    np.testing.assert_allclose(got[:8, :16, :16], data[:8, :16, :16], rtol=1e-6)
    assert not got[8:].any() and not got[:, 16:].any()


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(addr, volume, tmp_path):
    data, a, _ = volume
    out = tmp_path / "out.ome.zarr"
    cases = [
        (["--model", "identity", "--tile", 8, 8, 8, "--overlap", 5], "smaller than twice the overlap"),
        (["--model", "randcnn", "--tile", 15, 16, 16, "--overlap", 4], "use e.g. 14 or 16"),
        (["--model", "identity", "--samples", 4], "does not take option 'samples'"),
        (["--model", "nosuch"], "unknown model"),
        (["--model", "identity", "--cluster", "ftp://x"], "unknown --cluster"),
    ]
    for args, message in cases:
        assert_user_error(cli("restore", a, out, *args), out, contains=message)

    bad = data.copy()
    bad[3, 4, 5] = np.nan
    nan_in = make_image(tmp_path / "nan.ome.zarr", bad, (8, 16, 16))
    assert_user_error(cli("restore", nan_in, out, "--cluster", addr, "--model", "identity", *TILE), out,
                      contains="NaN or Inf")
    run(addr, nan_in, tmp_path / "filled.ome.zarr", *TILE, "--nan", "fill")
    assert read(tmp_path / "filled.ome.zarr")[3, 4, 5] == 0

    wrong = make_image(tmp_path / "m.ome.zarr", np.ones((10, 20, 20), np.uint8), (10, 20, 20), scale=[2, 2, 2])
    assert_user_error(cli("restore", a, out, "--model", "identity", "--mask", wrong), out, contains="field of view")

    run(addr, a, out, *TILE)
    before = read(out)
    assert_user_error(cli("restore", a, out, "--model", "identity", *TILE), contains="already exists")
    msg = assert_user_error(cli("restore", a, out, "--model", "identity", "--tile", 16, 16, 16, "--overlap", 2,
                                "--resume"))
    assert "parameter overlap was 4, now 2" in msg
    assert_user_error(cli("restore", a, out, "--model", "gaussian", *TILE, "--resume"), contains="parameter model")
    assert bitwise(read(out), before) and ngff.read_info(out).complete


# ----------------------------------------------------------------------------------------------- GPU paths (on CPU)


def test_gpu_out_of_memory_halves_the_batch_and_matches_a_normal_run(addr, volume, tmp_path):
    data, a, _ = volume
    args = [*TILE, "--batch", 4, "--block", 8, 16, 16]
    run(addr, a, tmp_path / "ref.ome.zarr", "--model", "gaussian", *args)
    # oom_at=3: calls of 3 or more tiles raise torch.cuda.OutOfMemoryError, so 4 -> 2 (batches stay exactly 2 tiles).
    result = run(addr, a, tmp_path / "oom.ome.zarr", "--model", "test-gaussian:oom_at=3", *args)
    assert "batch 2 (from 4: GPU out of memory)" in result.output, result.output
    assert bitwise(read(tmp_path / "oom.ome.zarr"), read(tmp_path / "ref.ome.zarr"))
    assert ngff.read_info(tmp_path / "oom.ome.zarr").provenance["summary"]["batch"] == 2


def test_gpu_out_of_memory_at_batch_1_fails_naming_the_block(addr, volume, tmp_path):
    _, a, _ = volume
    msg = assert_user_error(cli("restore", a, tmp_path / "o.ome.zarr", "--cluster", addr, "--model",
                                "test-identity:oom_at=1", *TILE, "--batch", 2, "--block", 8, 16, 16))
    assert re.search(r"block \(\d, \d, \d\) failed .*GPU out of memory on block \(\d, \d, \d\) even with batch 1", msg)


def test_gpu_worker_overlaps_blocks_but_runs_one_model_call_at_a_time(volume, tmp_path, monkeypatch):
    """A GPU worker (resource GPU=1, 2 threads) runs two block tasks at once, yet its model calls never overlap."""
    from distributed import Client, LocalCluster, get_worker

    _, a, _ = volume
    calls, lock, hooks = [], threading.Lock(), testing_restorers.hooks

    def timed(*args):  # each model call: its time span and how many block tasks the worker was running meanwhile
        t0 = time.perf_counter()
        hooks(*args)
        with lock:
            calls.append((t0, time.perf_counter(), len(get_worker().state.executing)))

    monkeypatch.setattr(testing_restorers, "hooks", timed)
    cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=False, resources={"GPU": 1},
                           dashboard_address=":0")  # threads in this process: the patch applies in the worker
    try:
        with Client(cluster) as client:
            out = tmp_path / "o.ome.zarr"
            restore(a, out, model="test-identity:sleep=0.05", tile=[16, 16, 16], overlap=4, block=[8, 16, 16],
                    cluster=client, progress=False, echo=lambda *_: None)
    finally:
        cluster.close()
    spans = sorted(calls)
    assert len(spans) > 2 and all(b0 >= a1 for (_, a1, _), (b0, _, _) in zip(spans, spans[1:]))  # one at a time
    assert max(n for *_, n in spans) == 2  # while a second block task reads, blends or writes
    np.testing.assert_array_equal(read(out), volume[0])
