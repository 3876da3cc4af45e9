"""`volrestore degrade`: chunkwise degradation equals the whole-volume model, is repeatable, and rejects bad input."""

import numpy as np
import pytest
from _io_helpers import assert_user_error, cli

from volrestore.simulate import degrade
from volrestore.io import ngff
from volrestore.simulate import synthetic


@pytest.fixture
def clean(tmp_path):
    data = (synthetic.phantom((20, 48, 48), seed=11) * 1000).astype(np.uint16)
    path = tmp_path / "clean.ome.zarr"
    ngff.create_image(path, shape=data.shape, dtype="uint16", axes=list("zyx"), scale=[2.0, 0.5, 0.5],
                      chunks=(8, 16, 16))
    ngff.open_level(path, 0, mode="r+")[...] = data
    np.save(tmp_path / "psf.npy", np.outer(np.hanning(7), np.hanning(7))[None] * np.hanning(5)[:, None, None])
    return path, data


def test_chunkwise_blur_and_binning_equal_the_whole_volume_model(clean, tmp_path):
    path, data = clean
    spec = f"poisson:photons=1e9,blur={tmp_path / 'psf.npy'},down=2"  # so many photons that noise is negligible
    result = cli("degrade", path, tmp_path / "d.ome.zarr", "--spec", spec)
    assert result.exit_code == 0, result.output
    got = ngff.open_level(tmp_path / "d.ome.zarr")[...]
    whole = degrade.Degradation.parse(spec)(data.astype(np.float64), ref=float(np.percentile(data, 99.9)))
    assert np.allclose(got, whole, rtol=0, atol=1e-3 * data.max())
    info = ngff.read_info(tmp_path / "d.ome.zarr")
    assert info.complete and info.levels[0].scale == [2.0, 0.5, 0.5]


@pytest.mark.slow
def test_noise_is_repeatable_and_at_the_requested_level(clean, tmp_path):
    path, data = clean
    for name in ("a", "b"):
        assert cli("degrade", path, tmp_path / f"{name}.ome.zarr", "--spec", "poisson:photons=10,seed=3").exit_code == 0
    a = ngff.open_level(tmp_path / "a.ome.zarr")[...]
    assert np.array_equal(a, ngff.open_level(tmp_path / "b.ome.zarr")[...])
    # Poisson at 10 photons for the 99.9th percentile: relative noise there is 1/sqrt(10) ≈ 0.32
    bright = data > np.percentile(data, 99)
    rel = np.std((a[bright] - data[bright]) / data[bright])
    assert 0.15 < rel < 0.45


def test_bad_input(clean, tmp_path):
    path, _ = clean
    line = assert_user_error(cli("degrade", path, tmp_path / "x.ome.zarr", "--spec", "gauss:sigma=2"),
                             tmp_path / "x.ome.zarr")
    assert "poisson:photons=P" in line
    assert_user_error(cli("degrade", path, path, "--spec", "poisson:photons=5"))
    assert_user_error(cli("degrade", tmp_path / "missing.ome.zarr", tmp_path / "y.ome.zarr", "--spec",
                          "poisson:photons=5"), tmp_path / "y.ome.zarr")


@pytest.mark.slow
def test_a_sharded_pyramid_keeps_its_levels_and_shards(tmp_path):
    from volrestore import write

    data = (synthetic.phantom((8, 64, 64), seed=2) * 1000).astype(np.uint16)
    src = tmp_path / "sharded.ome.zarr"
    write(data, src, chunks=(4, 16, 16), shards=(8, 32, 32), levels=2, voxel_size=(2.0, 0.5, 0.5))
    before = ngff.read_info(src)
    out = tmp_path / "d.ome.zarr"
    result = cli("degrade", src, out, "--spec", "poisson:photons=20,seed=1", "--dtype", "input")
    assert result.exit_code == 0, result.output
    info = ngff.read_info(out)
    assert info.complete and info.version == "0.5" and len(info.levels) == len(before.levels) == 2
    for got, want in zip(info.levels, before.levels):
        assert (got.shape, got.chunks, got.shards, got.scale, got.dtype) == \
               (want.shape, want.chunks, want.shards, want.scale, want.dtype)
    assert "(4 " in result.output, result.output  # one task per shard: 1 x 2 x 2 shards of 8 x 32 x 32
    # level 1 is the 2x mean of the degraded level 0 (rebuilt), not a degraded copy of the input's level 1
    from volrestore.io.pyramid import downsample_mean

    level0, level1 = ngff.open_level(out, 0)[...], ngff.open_level(out, 1)[...]
    factors = [max(1, round(b / a)) for a, b in zip(info.levels[0].scale, info.levels[1].scale)]
    assert np.array_equal(level1, downsample_mean(level0, factors, level1.shape, level1.dtype))
    again = tmp_path / "again.ome.zarr"
    assert cli("degrade", src, again, "--spec", "poisson:photons=20,seed=1", "--dtype", "input").exit_code == 0
    assert np.array_equal(ngff.open_level(again, 0)[...], level0)  # shard-aligned tasks: repeatable


def test_degrade_from_level_1_keeps_the_levels_below_it(tmp_path):
    from volrestore import write

    src = tmp_path / "p.ome.zarr"
    write((synthetic.phantom((8, 64, 64), seed=2) * 1000).astype(np.float32), src, chunks=(4, 16, 16), levels=3)
    result = cli("degrade", src, tmp_path / "d.ome.zarr", "--spec", "poisson:photons=20", "--level", 1)
    assert result.exit_code == 0, result.output
    info, levels = ngff.read_info(tmp_path / "d.ome.zarr"), ngff.read_info(src).levels
    assert [lvl.shape for lvl in info.levels] == [lvl.shape for lvl in levels[1:]]
