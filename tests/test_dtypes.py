"""Exact dtypes and bounded batches through the CLI: wide integers round-trip bit-exactly with identity, models that
need float32 get it with the reason recorded, complex input is refused by every command, and --batch is capped at
the tiles of the grid (bitwise equal to asking for exactly that many)."""

import numpy as np
import pytest
from _io_helpers import assert_user_error, cli

from volrestore import write_image
from volrestore.blockwise.plan import plan
from volrestore.io.storage import integer_limits
from volrestore.io import ngff

TILE = ["--tile", 8, 16, 16, "--overlap", 2]


@pytest.fixture(scope="module")
def addr(cluster):
    return cluster.scheduler.address


def read(path, level=0):
    return ngff.open_level(str(path), level)[...]


def bitwise(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def restore(addr, src, out, *args):
    result = cli("restore", src, out, "--cluster", addr, *args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.mark.parametrize("dtype", ["uint32", "int32", "uint64", "int64"])
def test_wide_integers_round_trip_bit_exactly_with_identity(addr, tmp_path, dtype):
    rng = np.random.default_rng(3)
    top = 2**31 if dtype.endswith("32") else 2**48  # 64-bit integers: exact up to 2**48 (float64 blending)
    data = (top - rng.integers(0, 4096, (8, 24, 20))).astype(dtype)  # near the top: float32 would change ~all
    if dtype.startswith("int"):
        data[::2] = -data[::2]
    src = tmp_path / "in.ome.zarr"
    write_image(src, data, chunks=(8, 16, 16))
    out = tmp_path / "out.ome.zarr"
    restore(addr, src, out, "--model", "identity", "--dtype", "input", *TILE)
    assert bitwise(read(out), data)
    assert "input_precision" not in ngff.read_info(out).provenance["parameters"]


def test_a_float32_model_gets_float32_and_the_reason_is_recorded(addr, tmp_path):
    data = (2**31 - np.arange(8 * 16 * 16).reshape(8, 16, 16)).astype("uint32")
    src = tmp_path / "in.ome.zarr"
    write_image(src, data, chunks=(8, 16, 16))
    out = tmp_path / "g.ome.zarr"
    restore(addr, src, out, "--model", "gaussian:sigma=0", "--dtype", "input", *TILE)
    note = ngff.read_info(out).provenance["parameters"]["input_precision"]
    assert "uint32 read as float32" in note and "gaussian" in note
    assert bitwise(read(out), data.astype(np.float32).astype(np.float64).astype("uint32"))  # rounded, not garbled


def test_64_bit_maxima_clip_without_wrapping():
    for dtype in ("uint64", "int64", "uint32", "int16"):
        lo, hi = integer_limits(dtype)
        values = np.clip(np.array([-1e300, 1e300]), lo, hi).astype(dtype)
        info = np.iinfo(dtype)
        assert values[0] == info.min and values[1] > info.max // 2, (dtype, values)


def test_complex_input_is_refused_by_every_command(tmp_path):
    import zarr

    src = tmp_path / "c.ome.zarr"
    write_image(src, np.zeros((4, 8, 8), np.float32))  # then its array becomes complex, as another tool may write
    group = zarr.open_group(str(src), mode="r+")
    del group["0"]
    group.create_array("0", shape=(4, 8, 8), dtype="complex64", chunks=(4, 8, 8))[...] = 1 + 2j
    out = tmp_path / "out.ome.zarr"
    commands = [
        ["restore", src, out, "--model", "identity"],
        ["degrade", src, out, "--spec", "poisson:photons=5"],
        ["evaluate", src, src],
        ["info", src],
    ]
    for args in commands:
        line = assert_user_error(cli(*args), out, contains="complex")
        assert "real part or magnitude" in line, line
    assert_user_error(cli("convert", _complex_tiff(tmp_path), out), out, contains="complex")


def _complex_tiff(tmp_path):
    import tifffile

    path = tmp_path / "c.tif"
    tifffile.imwrite(path, np.ones((4, 8, 8), np.complex64))
    return path


def test_a_huge_batch_is_capped_at_the_tiles_and_equals_that_batch(addr, tmp_path):
    data = np.random.default_rng(1).random((8, 24, 24)).astype(np.float32)
    src = tmp_path / "in.ome.zarr"
    write_image(src, data, chunks=(8, 16, 16))
    args = ["--model", "randcnn:width=4", "--tile", 8, 16, 16, "--overlap", 4, "--chunks", 8, 8, 8]
    n_tiles = plan(src, "randcnn:width=4", tile=[8, 16, 16], overlap=4)[0].grid.n_tiles
    assert 1 < n_tiles < 100
    huge = restore(addr, src, tmp_path / "huge.ome.zarr", *args, "--batch", 100000)  # uncapped: 100000 tiles
    assert f"batch {n_tiles} ->" in huge.output and "GPU out of memory" not in huge.output, huge.output
    restore(addr, src, tmp_path / "exact.ome.zarr", *args, "--batch", n_tiles)
    assert bitwise(read(tmp_path / "huge.ome.zarr"), read(tmp_path / "exact.ome.zarr"))
    info = ngff.read_info(tmp_path / "huge.ome.zarr")
    assert info.provenance["summary"]["batch"] == n_tiles  # the capped value is what the run used and records
    # --resume compares results, not the batch: the completed output is accepted with either value
    assert "already complete" in restore(addr, src, tmp_path / "huge.ome.zarr", *args, "--batch", 7, "--resume").output
