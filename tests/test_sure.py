"""The SURE-chosen blend share (blockwise.sure): close to the share only the ground truth could pick, zero for a
restorer that returns its input, and through the CLI: measured and recorded, or given, or refused."""

import numpy as np
import pytest
import torch
from _io_helpers import assert_user_error, cli

from volrestore import write_image
from volrestore.blockwise import plan as planning
from volrestore.blockwise import sure
from volrestore.io import ngff
from volrestore.simulate import synthetic

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    """Fine texture (signal a Gaussian filter blurs away) at 200 photons, in photon units: (path, truth, noisy)."""
    from scipy import ndimage

    rng = np.random.default_rng(1)
    texture = ndimage.gaussian_filter(rng.standard_normal((8, 64, 64)), 1.0)
    truth = np.clip(100 + 30 * texture / texture.std(), 1, None)
    noisy = rng.poisson(truth).astype(np.float32)
    path = tmp_path_factory.mktemp("sure") / "noisy.ome.zarr"
    write_image(path, noisy, axes="zyx", chunks=(8, 64, 64))
    return str(path), truth, noisy.astype(np.float64)


@pytest.mark.parametrize("sigma", [0.7, 2.0])
def test_blend_share_matches_the_oracle_share(textured, sigma):
    """f = a Gaussian filter; the share alpha of y - f that minimises the error against the truth is known from the
    truth alone (least squares); SURE, without the truth but with the noise model (Poisson in photon units: variance
    = 1 x intensity + 0), finds it within 0.05 from two tiles."""
    path, truth, noisy = textured
    plan, spec = planning.plan(path, model=f"gaussian:sigma={sigma}", tile=[32, 32, 32], overlap=8)
    alpha = sure.blend_share(plan, spec, (1.0, 0.0))
    from scipy import ndimage

    f = ndimage.gaussian_filter(noisy, sigma, mode="reflect")
    oracle = np.sum((noisy - f) * (truth - f)) / np.sum((noisy - f) ** 2)
    assert 0 < alpha < 1 and alpha == pytest.approx(oracle, abs=0.05)
    identity, ispec = planning.plan(path, model="identity", tile=[32, 32, 32], overlap=8)
    assert sure.blend_share(identity, ispec, (1.0, 0.0)) == 0.0  # nothing to give back
    assert sure.blend_share(plan, spec, (float("nan"), float("nan"))) == 0.0  # no noise model: no blend


def test_regression_blend_through_the_cli(tiny_models, tmp_path):
    """A regression model's share is chosen on the image and recorded; --blend off gives f, --blend 0.5 gives
    f + 0.5 (y - f) exactly; out-of-range shares and diffusion models are refused with one line."""
    img = (synthetic.phantom((4, 32, 32), seed=3) * 200 + 20).astype(np.float32)
    noisy = np.random.default_rng(2).poisson(img).astype(np.float32)
    src = tmp_path / "in.ome.zarr"
    write_image(src, noisy, axes="zyx", chunks=(4, 32, 32))
    runs = {}
    for name, extra in (("auto", []), ("off", ["--blend", "off"]), ("half", ["--blend", "0.5"])):
        out = tmp_path / f"{name}.ome.zarr"
        result = cli("restore", src, out, "--model", tiny_models("regression"), "--tile", 1, 32, 32, "--overlap",
                     4, "--workers", 1, "--overwrite", *extra)
        assert result.exit_code == 0, (result.output, result.exception)
        runs[name] = np.asarray(ngff.open_level(str(out), 0)[...], np.float64)
        runs[name + "_share"] = ngff.read_info(str(out)).provenance["parameters"]["model"]["options"]["blend"]
    assert runs["off_share"] == 0.0 and runs["half_share"] == 0.5 and 0.0 <= runs["auto_share"] <= 1.0
    np.testing.assert_allclose(runs["half"], runs["off"] + 0.5 * (noisy - runs["off"]), rtol=1e-5, atol=1e-3)
    assert_user_error(cli("restore", src, tmp_path / "x.ome.zarr", "--model", tiny_models("regression"),
                          "--blend", "2"), tmp_path / "x.ome.zarr", contains="--blend must be")
    assert_user_error(cli("restore", src, tmp_path / "y.ome.zarr", "--model", tiny_models("edm"),
                          "--blend", "0.3"), tmp_path / "y.ome.zarr", contains="one-pass (regression) models")
