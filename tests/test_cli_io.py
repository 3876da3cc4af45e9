"""CLI `info` / `convert`: human and JSON output, and every user error as one line, exit code 2, nothing written."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import zarr
from _io_helpers import assert_user_error, cli

from volrestore.io import ngff


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img.ome.zarr"
    ngff.create_image(path, shape=(2, 4, 16, 16), dtype="uint16", axes="czyx", scale=[1, 2, 0.5, 0.5],
                      translation=[0, 0, 1, 1], chunks=(1, 2, 8, 8), shards=(1, 4, 16, 16), n_levels=2,
                      channel_names=["dapi", "gfp"])
    return path


@pytest.fixture
def tiff(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((5, 16, 16), "uint16"))  # (3|4, y, x) would be read as RGB(A)
    return path


def test_info_human_and_json(image):
    result = cli("info", image)
    assert result.exit_code == 0, result.stderr
    for text in ("NGFF 0.5", "complete: no", "dapi, gfp", "16×16", "uint16", "channel", "space"):
        assert text in result.stdout, text
    data = json.loads(cli("info", image, "--json").stdout)
    assert data["levels"][1]["shape"] == [2, 4, 8, 8] and data["levels"][0]["shards"] == [1, 4, 16, 16]
    assert data["levels"][1]["scale"] == [1.0, 2.0, 1.0, 1.0] and data["complete"] is False


def test_info_missing_path(tmp_path):
    assert_user_error(cli("info", tmp_path / "nope.ome.zarr"), contains="does not exist")


def test_info_on_a_tiff(tiff):
    assert_user_error(cli("info", tiff), contains="not an OME-Zarr directory")


def test_info_on_a_plain_zarr_array(tmp_path):
    zarr.create_array(str(tmp_path / "plain.zarr"), shape=(4, 4), dtype="uint8")
    assert_user_error(cli("info", tmp_path / "plain.zarr"), contains="plain Zarr array")


def test_info_on_a_directory_that_is_not_zarr(tmp_path):
    (tmp_path / "folder").mkdir()
    assert_user_error(cli("info", tmp_path / "folder"), contains="not an OME-Zarr image")


def test_info_on_a_group_without_multiscales(tmp_path):
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w").attrs["something"] = 1
    assert_user_error(cli("info", tmp_path / "g.zarr"), contains="without OME-Zarr multiscales")


def _edit_multiscales(path, edit):
    group = zarr.open_group(str(path), mode="r+")
    ome = group.attrs["ome"]
    edit(ome["multiscales"][0])
    group.attrs["ome"] = ome


@pytest.mark.parametrize("edit, message", [
    (lambda ms: ms.pop("datasets"), "malformed multiscales"),
    (lambda ms: ms["datasets"][0]["coordinateTransformations"][0].update(scale=[1, 1]), "malformed multiscales"),
    (lambda ms: ms["datasets"][1].update(path="missing"), "is missing"),
    (lambda ms: ms.update(axes="oops"), "malformed multiscales"),
])
def test_info_malformed_multiscales(image, edit, message):
    _edit_multiscales(image, edit)
    assert_user_error(cli("info", image), contains=message)


def test_info_unsupported_axis_layout(image):
    def swap(ms):
        ms["axes"][2], ms["axes"][3] = ms["axes"][3], ms["axes"][2]  # c, z, x, y
    _edit_multiscales(image, swap)
    assert_user_error(cli("info", image), contains="not supported")


def test_info_unsupported_version(image):
    group = zarr.open_group(str(image), mode="r+")
    group.attrs["ome"] = {**group.attrs["ome"], "version": "0.3"}
    assert_user_error(cli("info", image), contains="not supported")


def test_convert_output_exists_without_overwrite(tiff, image):
    before = sorted(p.name for p in image.rglob("*"))
    assert_user_error(cli("convert", tiff, image), contains="--overwrite")
    assert sorted(p.name for p in image.rglob("*")) == before
    result = cli("convert", tiff, image, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert ngff.read_info(image).complete is True and ngff.read_info(image).axis_names == ["z", "y", "x"]


def test_convert_output_equal_to_or_inside_input(tiff, tmp_path):
    assert_user_error(cli("convert", tiff, tiff, "--overwrite"), contains="inside or equal")
    assert_user_error(cli("convert", tiff, tiff / "out.ome.zarr"), tiff / "out.ome.zarr", contains="inside or equal")


def test_convert_unreadable_tiff(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"this is not a tiff" * 100)
    out = tmp_path / "out.ome.zarr"
    assert_user_error(cli("convert", bad, out), out, contains="cannot read")


def test_convert_missing_input(tmp_path):
    out = tmp_path / "out.ome.zarr"
    assert_user_error(cli("convert", tmp_path / "none.tif", out), out, contains="does not exist")


@pytest.mark.parametrize("args, message", [
    (["--ngff", "0.4", "--shards", "4", "16", "16"], "sharding needs NGFF 0.5"),
    (["--chunks", "2", "8", "8", "--shards", "3", "8", "8"], "multiples"),
    (["--unit", "parsecs"], "not an NGFF length unit"),
    (["--voxel-size", "1", "0", "1"], "positive"),
])
def test_convert_bad_options_write_nothing(tiff, tmp_path, args, message):
    out = tmp_path / "out.ome.zarr"
    assert_user_error(cli("convert", tiff, out, *args), out, contains=message)


def test_real_process_prints_one_line(tmp_path):
    """A real process, not CliRunner: stderr is exactly one line and the exit code is 2."""
    code = "import sys; from volrestore.cli import main; sys.argv[0] = 'volrestore'; main()"
    proc = subprocess.run([sys.executable, "-c", code, "info", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
