"""ngff: write NGFF 0.5/0.4 images, validate them with ome-zarr-models, read them back with ome_zarr and volrestore."""

import json

import numpy as np
import pytest
import zarr
from _io_helpers import cli, read_back, transforms, validate

from volrestore.io import ngff, pyramid
from volrestore.errors import UserError

CASES = [
    # version, axes, dtype, shape, chunks, shards, levels, units
    ("0.5", "czyx", "uint16", (2, 12, 40, 34), (1, 4, 16, 16), (1, 8, 32, 32), 3, "micrometer"),
    ("0.5", "zyx", "float32", (9, 33, 20), (4, 16, 16), None, 2, "nanometer"),
    ("0.4", "zyx", "uint16", (10, 24, 24), (5, 8, 8), None, 2, "micrometer"),
    ("0.4", "tzyx", "float32", (2, 6, 20, 22), (1, 3, 8, 8), None, 2, "micrometer"),
]


def _reference_downsample(data, factors):
    """Mean over factor blocks with edge replication (= mean over the voxels present for factor 2)."""
    pad = [(0, (-n) % f) for n, f in zip(data.shape, factors)]
    padded = np.pad(data.astype(np.float64), pad, mode="edge")
    shape = [s for n, f in zip(padded.shape, factors) for s in (n // f, f)]
    mean = padded.reshape(shape).mean(axis=tuple(range(1, 2 * data.ndim, 2)))
    if np.issubdtype(data.dtype, np.integer):
        mean = np.clip(np.rint(mean), np.iinfo(data.dtype).min, np.iinfo(data.dtype).max)
    return mean.astype(data.dtype)


def _write(path, version, axes, dtype, shape, chunks, shards, levels, unit):
    rng = np.random.default_rng(1)
    data = (rng.integers(0, 65535, shape) if dtype == "uint16" else rng.normal(size=shape)).astype(dtype)
    scale = {"t": 2.5, "c": 1.0, "z": 0.75, "y": 0.125, "x": 0.125}
    trans = {"t": 0.0, "c": 0.0, "z": -3.5, "y": 10.25, "x": 7.0}
    ax = [ngff.Axis(a, ngff.AXIS_TYPES[a], unit if a in "zyx" else "second" if a == "t" else None) for a in axes]
    names = [f"ch{i}" for i in range(shape[0])] if axes[0] == "c" else None
    ngff.create_image(path, shape=shape, dtype=dtype, axes=ax, scale=[scale[a] for a in axes],
                      translation=[trans[a] for a in axes], chunks=chunks, shards=shards, version=version,
                      n_levels=levels, channel_names=names, provenance={"parameters": {"test": True}})
    ngff.open_level(path, 0, mode="r+")[...] = data
    pyramid.build_pyramid(path)
    ngff.set_complete(path)
    return data, ax, [scale[a] for a in axes], [trans[a] for a in axes], names


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{'sharded' if c[5] else 'plain'}")
def test_write_validate_read_back(tmp_path, case):
    version, axes, dtype, shape, chunks, shards, levels, unit = case
    path = tmp_path / "img.ome.zarr"
    data, ax, scale, trans, names = _write(path, version, *case[1:])

    validate(path, version)
    assert (path / ("zarr.json" if version == "0.5" else ".zattrs")).exists()

    arrays, meta = read_back(path)
    assert len(arrays) == levels
    np.testing.assert_array_equal(arrays[0], data)
    assert transforms(meta, 0) == (scale, trans)
    assert [a.get("unit") for a in meta["axes"]] == [a.unit for a in ax]
    if names:
        assert meta["channel_names"] == names

    # every level i+1 is the chunk-aligned 2x mean of level i, with matching scale and centred translation
    info = ngff.read_info(path)
    for i in range(1, levels):
        factors = ngff.level_factors(arrays[i - 1].shape, axes, info.levels[i - 1].scale)
        np.testing.assert_array_equal(arrays[i], _reference_downsample(arrays[i - 1], factors))
        assert info.levels[i].scale == [s * f for s, f in zip(info.levels[i - 1].scale, factors)]
        assert transforms(meta, i) == (info.levels[i].scale, info.levels[i].translation)

    # the CLI reports the same metadata
    result = cli("info", path, "--json")
    assert result.exit_code == 0, result.stderr
    reported = json.loads(result.stdout)
    assert reported["version"] == version and reported["complete"] is True
    assert [a["name"] for a in reported["axes"]] == list(axes)
    assert reported["levels"][0]["shape"] == list(shape) and reported["levels"][0]["dtype"] == dtype
    assert reported["levels"][0]["shards"] == (list(shards) if shards else None)
    assert reported["provenance"]["parameters"] == {"test": True}
    assert reported["channel_names"] == names


def test_open_image_is_lazy_with_physical_coords(tmp_path):
    path = tmp_path / "img.ome.zarr"
    data, _, scale, trans, names = _write(path, *CASES[0])
    img = ngff.open_image(path)
    assert img.dims == ("c", "z", "y", "x") and hasattr(img.data, "dask")
    assert list(img.coords["c"].values) == names
    np.testing.assert_allclose(img.coords["z"].values, np.arange(data.shape[1]) * scale[1] + trans[1])
    np.testing.assert_allclose(img.coords["x"].values, np.arange(data.shape[3]) * scale[3] + trans[3])
    assert img.coords["y"].attrs["units"] == "micrometer"
    assert img.data.chunksize == (1, 8, 32, 32)  # dask chunks = shards, so tasks never split a shard
    np.testing.assert_array_equal(img.isel(z=slice(2, 5)).values, data[:, 2:5])
    level1 = ngff.open_image(path, level=1)
    assert level1.attrs["level"] == 1 and level1.shape == ngff.read_info(path).levels[1].shape


def test_create_like_copies_geometry_and_marks_incomplete(tmp_path):
    src = tmp_path / "in.ome.zarr"
    _write(src, *CASES[0])
    info = ngff.read_info(src)
    out = tmp_path / "out.ome.zarr"
    ngff.create_like(info, out, dtype="float32", version="0.4", n_levels=1,
                     provenance=ngff.make_provenance({"model": "identity"}, "volrestore restore in out"))
    validate(out, "0.4")
    new = ngff.read_info(out)
    assert new.version == "0.4" and new.axes == info.axes and new.channel_names == info.channel_names
    assert (new.levels[0].scale, new.levels[0].translation) == (info.levels[0].scale, info.levels[0].translation)
    assert new.levels[0].dtype == "float32" and new.levels[0].shards is None
    assert new.complete is False and new.provenance["command"] == "volrestore restore in out"
    ngff.set_complete(out, extra={"blocks": 4})
    assert ngff.read_info(out).complete is True and ngff.read_info(out).provenance["blocks"] == 4


def test_anisotropic_pyramid_downsamples_z_only_once_isotropic():
    axes, shape, scale = "zyx", (64, 512, 512), [2.0, 0.5, 0.5]
    levels = ngff.pyramid_levels(shape, axes, scale, [0, 0, 0], 5)
    assert [lv[0] for lv in levels] == [(64, 512, 512), (64, 256, 256), (64, 128, 128), (32, 64, 64), (16, 32, 32)]
    assert [lv[1] for lv in levels][3] == [4.0, 4.0, 4.0]
    assert ngff.auto_levels((10, 1000, 1000), axes) == 5  # 1000 → 500 → 250 → 125 → 63 (< 64)
    assert ngff.auto_levels((10, 63, 1000), axes) == 1


def test_build_pyramid_on_a_dask_client(tmp_path):
    from distributed import Client

    path = tmp_path / "img.ome.zarr"
    ngff.create_image(path, shape=(5, 33, 17), dtype="uint8", axes="zyx", scale=[1, 1, 1], chunks=(2, 8, 8),
                      n_levels=3)
    data = np.random.default_rng(2).integers(0, 255, (5, 33, 17)).astype("uint8")
    ngff.open_level(path, 0, mode="r+")[...] = data
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        pyramid.build_pyramid(path, client=client, window=3)
    level1 = ngff.open_level(path, 1)[...]
    np.testing.assert_array_equal(level1, _reference_downsample(data, (2, 2, 2)))


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_reads_images_written_by_ome_zarr_py(tmp_path, version):
    """Interoperability: a 2D (y, x) image with a pyramid written by ome-zarr-py's own writer."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    path = tmp_path / "ext.ome.zarr"
    fmt = FormatV05() if version == "0.5" else FormatV04()
    data = np.arange(64 * 48, dtype="int16").reshape(64, 48)
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    write_image(data, group, axes="yx", fmt=fmt, scale_factors=[2], scale={"y": 0.5, "x": 0.5})
    info = ngff.read_info(path)
    assert info.version == version and info.axis_names == ["y", "x"] and len(info.levels) == 2
    assert info.levels[0].translation == [0.0, 0.0] and info.complete is None
    img = ngff.open_image(path, level=0)
    np.testing.assert_array_equal(img.values, data)
    np.testing.assert_allclose(img.coords["y"].values, np.arange(64) * 0.5)


def test_create_image_validates_before_writing(tmp_path):
    out = tmp_path / "x.ome.zarr"
    bad = [
        dict(axes="xyz"),
        dict(shards=(3, 8, 8)),
        dict(version="0.4", shards=(4, 8, 8)),
        dict(scale=[1, 0, 1]),
        dict(axes=[ngff.Axis("z", "space", "furlong"), "y", "x"]),
        dict(dtype="U4"),
    ]
    for override in bad:
        kwargs = {**dict(shape=(4, 8, 8), dtype="uint16", axes="zyx", scale=[1, 1, 1], chunks=(2, 4, 4)), **override}
        with pytest.raises(UserError):
            ngff.create_image(out, **kwargs)
        assert not out.exists()


def test_check_output_path(tmp_path):
    src = tmp_path / "in.ome.zarr"
    _write(src, *CASES[2])
    for out in (src, src / "0" / "out.ome.zarr"):
        with pytest.raises(UserError, match="inside or equal"):
            ngff.check_output_path(out, inputs=[src], overwrite=True)
    with pytest.raises(UserError, match="contains input"):
        ngff.check_output_path(tmp_path, inputs=[src], overwrite=True)
    with pytest.raises(UserError, match="already exists"):
        ngff.check_output_path(src, inputs=[])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a Zarr store"):
        ngff.check_output_path(tmp_path / "notes", overwrite=True)
    ngff.check_output_path(tmp_path / "new.ome.zarr", inputs=[src])


def test_single_level_images_get_display_windows_from_their_data(tmp_path):
    """napari opens a written image with a window that fits its data (not 0..65535), also without a pyramid."""
    import json

    from volrestore import write_image

    data = (np.random.default_rng(0).random((2, 4, 32, 32)) * 1000).astype("uint16")
    write_image(tmp_path / "a.ome.zarr", data, axes="czyx", channel_names=["a", "b"], n_levels=1)
    channels = json.loads((tmp_path / "a.ome.zarr" / "zarr.json").read_text())["attributes"]["ome"]["omero"]["channels"]
    for channel in channels:
        window = channel["window"]
        assert 0 <= window["start"] < window["end"] <= 1000 and window["max"] == 65535


def test_crop_image_keeps_the_physical_position(tmp_path):
    import numpy as np

    from volrestore.io import ngff
    from volrestore.io.images import crop_image, write_image

    data = np.arange(4 * 10 * 12, dtype=np.uint16).reshape(4, 10, 12)
    src, out = tmp_path / "a.ome.zarr", tmp_path / "b.ome.zarr"
    write_image(src, data, axes="zyx", scale=[2.0, 0.5, 0.5], translation=[1.0, 0.0, 3.0], chunks=(2, 8, 8))
    crop_image(src, out, (slice(1, 3), slice(2, 9), slice(None)))
    info = ngff.read_info(out)
    assert info.complete and info.levels[0].translation == [3.0, 1.0, 3.0]
    assert np.array_equal(ngff.open_level(out)[...], data[1:3, 2:9])
