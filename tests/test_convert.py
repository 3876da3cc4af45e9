"""convert: OME-TIFF / ImageJ TIFF / plain TIFF (2D, 3D, 3D+t, 3D+c) → OME-Zarr with voxel sizes, via the CLI."""

import numpy as np
import tifffile
from _io_helpers import assert_user_error, cli, read_back, transforms, validate

from volrestore.io import ngff


def _convert(src, out, *args):
    result = cli("convert", src, out, *args)
    assert result.exit_code == 0, (result.stderr, result.exception)
    info = ngff.read_info(out)
    assert info.complete is True and info.provenance["parameters"]["input"] == str(src.resolve())
    validate(out, info.version)
    return info


def _data(shape, dtype="uint16", seed=0):
    return np.random.default_rng(seed).integers(0, 4000, shape).astype(dtype)


def test_ome_tiff_3d_voxel_size_in_nanometer(tmp_path):
    data = _data((13, 70, 66))
    src, out = tmp_path / "a.ome.tif", tmp_path / "a.ome.zarr"
    tifffile.imwrite(src, data, ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeZ": 350.0, "PhysicalSizeZUnit": "nm",
        "PhysicalSizeY": 65.5, "PhysicalSizeYUnit": "nm", "PhysicalSizeX": 65.5, "PhysicalSizeXUnit": "nm"})
    info = _convert(src, out, "--chunks", "4", "32", "32", "--shards", "8", "64", "64")
    assert [a.unit for a in info.axes] == ["nanometer"] * 3
    assert info.levels[0].shards == (8, 64, 64) and info.levels[0].chunks == (4, 32, 32)
    assert len(info.levels) == 2  # 70×66 → 35×33: the smallest lateral side drops below 64
    arrays, meta = read_back(out)
    np.testing.assert_array_equal(arrays[0], data)
    assert transforms(meta, 0) == ([350.0, 65.5, 65.5], [0.0, 0.0, 0.0])
    assert [a["unit"] for a in meta["axes"]] == ["nanometer"] * 3


def test_unit_option_converts_metadata_sizes(tmp_path):
    src, out = tmp_path / "a.ome.tif", tmp_path / "a.ome.zarr"
    tifffile.imwrite(src, _data((3, 16, 16)), ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeZ": 500.0, "PhysicalSizeZUnit": "nm",
        "PhysicalSizeY": 250.0, "PhysicalSizeYUnit": "nm", "PhysicalSizeX": 250.0, "PhysicalSizeXUnit": "nm"})
    info = _convert(src, out, "--unit", "micrometer", "--levels", "1")
    np.testing.assert_allclose(info.levels[0].scale, [0.5, 0.25, 0.25])
    assert info.axes[0].unit == "micrometer"


def test_imagej_tiff_spacing_resolution_unit(tmp_path):
    data = _data((6, 20, 24))
    src, out = tmp_path / "ij.tif", tmp_path / "ij.ome.zarr"
    tifffile.imwrite(src, data, imagej=True, resolution=(1 / 0.25, 1 / 0.125),
                     metadata={"axes": "ZYX", "spacing": 1.5, "unit": "micron"})
    info = _convert(src, out, "--ngff", "0.4")
    assert info.version == "0.4" and info.axis_names == ["z", "y", "x"]
    arrays, meta = read_back(out)
    np.testing.assert_array_equal(arrays[0], data)
    scale, _ = transforms(meta, 0)
    np.testing.assert_allclose(scale, [1.5, 0.125, 0.25])  # tifffile's resolution is (x, y)
    assert [a["unit"] for a in meta["axes"]] == ["micrometer"] * 3


def test_3d_plus_time_ome_tiff(tmp_path):
    data = _data((3, 5, 18, 20), "float32")
    src, out = tmp_path / "t.ome.tif", tmp_path / "t.ome.zarr"
    tifffile.imwrite(src, data, ome=True, metadata={
        "axes": "TZYX", "PhysicalSizeZ": 2.0, "PhysicalSizeY": 0.5, "PhysicalSizeX": 0.5, "TimeIncrement": 30.0})
    info = _convert(src, out, "--chunks", "2", "8", "8")
    assert info.axis_names == ["t", "z", "y", "x"] and [a.unit for a in info.axes][0] == "second"
    assert info.levels[0].scale == [30.0, 2.0, 0.5, 0.5] and info.levels[0].chunks == (1, 2, 8, 8)
    arrays, _ = read_back(out)
    np.testing.assert_array_equal(arrays[0], data)


def test_3d_plus_channels_imagej_hyperstack_is_reordered(tmp_path):
    data = _data((4, 2, 10, 12))  # ImageJ order Z, C, Y, X → NGFF c, z, y, x
    src, out = tmp_path / "c.tif", tmp_path / "c.ome.zarr"
    tifffile.imwrite(src, data, imagej=True, metadata={"axes": "ZCYX"})
    info = _convert(src, out)
    assert info.axis_names == ["c", "z", "y", "x"] and info.levels[0].chunks[0] == 1
    np.testing.assert_array_equal(ngff.open_level(out)[...], data.transpose(1, 0, 2, 3))
    assert info.levels[0].scale == [1.0, 1.0, 1.0, 1.0] and info.axes[1].unit is None  # no size known


def test_ome_channel_names_become_omero_labels(tmp_path):
    data = _data((2, 3, 8, 8))
    src, out = tmp_path / "c.ome.tif", tmp_path / "c.ome.zarr"
    tifffile.imwrite(src, data, ome=True, metadata={"axes": "CZYX", "Channel": {"Name": ["dapi", "gfp"]}})
    info = _convert(src, out)
    assert info.channel_names == ["dapi", "gfp"]
    assert read_back(out)[1]["channel_names"] == ["dapi", "gfp"]


def test_2d_plain_tiff_with_voxel_size_option(tmp_path):
    data = _data((40, 30))
    src, out = tmp_path / "p.tif", tmp_path / "p.ome.zarr"
    tifffile.imwrite(src, data)
    info = _convert(src, out, "--voxel-size", "9", "0.2", "0.3")
    assert info.axis_names == ["y", "x"] and info.levels[0].scale == [0.2, 0.3]
    assert [a.unit for a in info.axes] == ["micrometer", "micrometer"]
    np.testing.assert_array_equal(ngff.open_level(out)[...], data)


def test_stream_writes_whole_blocks_one_slab_at_a_time(tmp_path, monkeypatch):
    """Level 0 is written one whole chunk at a time (4 z planes x one 8x8 tile), never more."""
    import zarr

    data = _data((20, 16, 16))
    src, out = tmp_path / "s.tif", tmp_path / "s.ome.zarr"
    tifffile.imwrite(src, data)
    writes = []
    original = zarr.Array.__setitem__

    def spy(self, key, value):
        if self.path == "0":
            writes.append(np.shape(value))
        return original(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", spy)
    _convert(src, out, "--chunks", "4", "8", "8", "--levels", "1")
    assert writes == [(4, 8, 8)] * 20


def test_corrupt_tiff_data_leaves_nothing(tmp_path):
    """A TIFF whose headers read fine but whose pixel data is corrupt fails mid-stream: one-line error, no output."""
    src, out = tmp_path / "bad.tif", tmp_path / "bad.ome.zarr"
    tifffile.imwrite(src, _data((8, 64, 64)), compression="zlib")
    with tifffile.TiffFile(src) as tif:
        offset, count = tif.pages[5].dataoffsets[0], tif.pages[5].databytecounts[0]
    raw = bytearray(src.read_bytes())
    raw[offset: offset + count] = b"\x00garbage" * (count // 8) + b"\x00" * (count % 8)
    src.write_bytes(bytes(raw))
    assert_user_error(cli("convert", src, out), out, contains="failed")
