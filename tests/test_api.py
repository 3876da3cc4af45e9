"""The Python API (`volrestore.open/write/restore/train/degrade/evaluate`): explicit documented signatures, write()
from numpy and xarray, short errors for arrays passed as paths, the missing `__main__` guard caught instead of a
hang; and the new-user defaults behind it (restore's default model, train's validation-fraction message)."""

import inspect
import os
import subprocess
import sys

import numpy as np
import pytest
from _io_helpers import assert_user_error, cli

import volrestore
from volrestore.io import ngff

API = ("open", "write", "restore", "train", "degrade", "evaluate")


def test_every_api_function_has_an_explicit_documented_signature():
    for name in API:
        fn = getattr(volrestore, name)
        params = inspect.signature(fn).parameters
        assert fn.__doc__ and len(fn.__doc__.split()) > 15, name
        assert not any(p.kind is p.VAR_POSITIONAL for p in params.values()), name
        assert name in volrestore.__all__
    restore = inspect.signature(volrestore.restore).parameters
    for option in ("input", "output", "model", "tile", "batch", "seed", "cluster", "samples", "steps", "std"):
        assert option in restore, option
    assert restore["model"].default == "default"
    from volrestore.blockwise.restore import restore as engine_restore

    assert inspect.signature(engine_restore).parameters["model"].default == "default"


def test_write_numpy_infers_axes_and_takes_voxel_size_and_unit(tmp_path):
    data = np.arange(4 * 8 * 10, dtype=np.uint16).reshape(4, 8, 10)
    info = volrestore.write(data, tmp_path / "a.ome.zarr", voxel_size=(2.0, 0.5, 0.5), unit="micrometer",
                            levels=2)
    assert info.axis_names == ["z", "y", "x"] and info.complete and len(info.levels) == 2
    assert info.levels[0].scale == [2.0, 0.5, 0.5] and [a.unit for a in info.axes] == ["micrometer"] * 3
    assert np.array_equal(ngff.open_level(tmp_path / "a.ome.zarr")[...], data)
    assert volrestore.write(np.ones((6, 7)), tmp_path / "b.ome.zarr").axis_names == ["y", "x"]
    assert volrestore.write(np.ones((2, 3, 6, 7)), tmp_path / "c.ome.zarr").axis_names == ["c", "z", "y", "x"]
    assert volrestore.write(np.ones((3, 6, 7)), tmp_path / "d.ome.zarr", axes="cyx",
                            voxel_size=0.2).levels[0].scale == [1.0, 0.2, 0.2]


def test_write_a_data_array_keeps_dims_coords_unit_and_channel_names(tmp_path):
    import xarray as xr

    values = np.random.default_rng(0).random((2, 4, 6, 8)).astype(np.float32)
    coords = {"c": ["dapi", "gfp"], "z": 10 + 2.0 * np.arange(4), "y": 0.25 * np.arange(6),
              "x": xr.Variable("x", 1 + 0.25 * np.arange(8), attrs={"units": "micrometer"})}
    array = xr.DataArray(values, dims=("c", "z", "y", "x"), coords=coords)
    info = volrestore.write(array, tmp_path / "a.ome.zarr")
    assert info.axis_names == ["c", "z", "y", "x"] and info.channel_names == ["dapi", "gfp"]
    assert info.levels[0].scale == [1.0, 2.0, 0.25, 0.25] and info.levels[0].translation == [0.0, 10.0, 0.0, 1.0]
    assert info.axes[-1].unit == "micrometer"
    back = volrestore.open(tmp_path / "a.ome.zarr")
    assert back.dims == array.dims and np.array_equal(back.values, values)
    np.testing.assert_allclose(back["z"].values, array["z"].values)
    again = volrestore.write(back, tmp_path / "b.ome.zarr")  # open -> write round trip keeps the geometry
    assert again.levels[0].scale == info.levels[0].scale and again.levels[0].translation == info.levels[0].translation


def test_write_refuses_what_it_cannot_describe(tmp_path):
    import xarray as xr

    cases = [
        (lambda: volrestore.write(np.ones((2, 2, 2, 2, 2, 2)), tmp_path / "a.ome.zarr"), "axes"),
        (lambda: volrestore.write(np.ones((4, 4)), tmp_path / "a.ome.zarr", axes="zyx"), "do not fit"),
        (lambda: volrestore.write(tmp_path / "a.ome.zarr", np.ones((4, 4))), "array first"),
        (lambda: volrestore.write(np.ones((4, 4)), tmp_path / "a.ome.zarr", voxel_size=(1, 2, 3)), "voxel_size"),
        (lambda: volrestore.write(xr.DataArray(np.ones((3, 4)), dims=("y", "x"), coords={"y": [0, 1, 5]}),
                                  tmp_path / "a.ome.zarr"), "evenly spaced"),
        (lambda: volrestore.write(np.ones((4, 4), np.complex64), tmp_path / "a.ome.zarr"), "real number type"),
    ]
    for call, message in cases:
        with pytest.raises(volrestore.UserError, match=message):
            call()
    assert not (tmp_path / "a.ome.zarr").exists()


def test_an_array_passed_as_a_path_gives_a_short_error(tmp_path):
    big = np.ones((64, 256, 256), np.float32)
    calls = [lambda: volrestore.restore(big, tmp_path / "o.ome.zarr", model="identity"),
             lambda: volrestore.restore("in.ome.zarr", big),
             lambda: volrestore.degrade(big, tmp_path / "o.ome.zarr", "poisson:photons=5"),
             lambda: volrestore.evaluate(big, big),
             lambda: volrestore.train(big, tmp_path / "m.pt", degrade="poisson:photons=5"),
             lambda: volrestore.open(big)]
    for call in calls:
        with pytest.raises(volrestore.UserError) as err:
            call()
        message = str(err.value)
        assert len(message) < 250 and "\n" not in message and "1." not in message, message
        assert "ndarray of shape (64, 256, 256)" in message and "volrestore.write" in message, message
    assert not (tmp_path / "o.ome.zarr").exists()


@pytest.mark.parametrize("guarded", [False, True])
def test_a_script_without_the_main_guard_is_told_to_add_it(tmp_path, guarded):
    volrestore.write(np.ones((4, 16, 16), np.float32), tmp_path / "in.ome.zarr")
    call = 'volrestore.restore("in.ome.zarr", "out.ome.zarr", model="identity", workers=1, progress=False)'
    body = f'if __name__ == "__main__":\n    {call}\n' if guarded else f"{call}\n"
    (tmp_path / "script.py").write_text("import volrestore\n" + body)
    proc = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if guarded:
        assert proc.returncode == 0, proc.stderr
        assert ngff.read_info(tmp_path / "out.ome.zarr").complete
        return
    assert proc.returncode == 1 and 'if __name__ == "__main__":' in proc.stderr.splitlines()[-1], proc.stderr
    assert "UserError: script.py starts a local Dask cluster at its top level" in proc.stderr


def test_restore_without_model_uses_the_shipped_default_model(tmp_path):
    from volrestore.simulate import synthetic

    data = (synthetic.phantom((2, 32, 32), seed=4) * 100).astype(np.float32)
    src = tmp_path / "in.ome.zarr"
    volrestore.write(data, src)
    out = tmp_path / "out.ome.zarr"
    result = cli("restore", src, out, "--steps", 1, "--workers", 1, "--tile", 1, 32, 32, "--overlap", 8)
    assert result.exit_code == 0, result.output
    model = ngff.read_info(out).provenance["parameters"]["model"]
    assert model["name"].endswith("default-diffusion.pt"), model  # --steps asks for the diffusion model
    assert not np.array_equal(ngff.open_level(out)[...], data)  # restored, not copied


def test_train_names_the_validation_fraction_when_it_leaves_too_few_rows(tmp_path):
    volrestore.write(np.random.default_rng(0).random((2, 153, 48)).astype(np.float32), tmp_path / "t.ome.zarr")
    args = ["train", "--target", tmp_path / "t.ome.zarr", "--degrade", "poisson:photons=5", "--preset", "tiny-2d",
            "--patch", 1, 16, 16, "--out", tmp_path / "m.pt"]
    line = assert_user_error(cli(*args), tmp_path / "m.pt")  # the default --val-fraction 0.1: 15 rows of 153
    assert "--val-fraction 0.1 holds out 15 of the volume's 153 y rows" in line, line
    assert "use --val-fraction 0.102 or more" in line and "--val-fraction 0 (no validation)" in line, line
    line = assert_user_error(cli(*args, "--val-fraction", 0.95), tmp_path / "m.pt")
    assert "leaves 8 of the volume's 153 y rows for training" in line, line

