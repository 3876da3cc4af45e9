"""SURE on the image (blockwise.sure): the one-pass output blend (model.blend), as good as the weights only the ground
truth could pick, nothing for a restorer that returns its input; the std scale of K diffusion samples, which makes the
spread the error of the mean; through the CLI: measured and recorded, given, or refused."""

import numpy as np
import pytest
import torch
from scipy import ndimage
from _io_helpers import assert_user_error, cli
from conftest import TINY_DEGRADE

from volrestore import write_image
from volrestore.blockwise import plan as planning
from volrestore.blockwise import sure
from volrestore.model import blend
from volrestore.io import ngff
from volrestore.simulate import synthetic
from volrestore.simulate.degrade import Degradation

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    """Fine texture (signal a Gaussian filter blurs away) at 200 photons, in photon units: (path, truth, noisy)."""
    rng = np.random.default_rng(1)
    texture = ndimage.gaussian_filter(rng.standard_normal((8, 128, 128)), 1.0)
    truth = np.clip(100 + 30 * texture / texture.std(), 1, None)
    noisy = rng.poisson(truth).astype(np.float32)
    path = tmp_path_factory.mktemp("sure") / "noisy.ome.zarr"
    write_image(path, noisy, axes="zyx", chunks=(8, 128, 128))
    return str(path), truth, noisy.astype(np.float64)


@pytest.mark.parametrize("sigma", [0.7, 2.0])
def test_blend_weights_match_what_the_truth_would_choose(textured, sigma):
    """f = a Gaussian filter. Below LET_MIN_PHOTONS only the input's share is fitted: SURE, without the truth but
    with the noise model (Poisson in photon units: variance = 1 x intensity + 0), finds the share least squares
    against the truth picks, within 0.05. Above it all weights are fitted: the blended output's error is within 7 %
    of the truth-chosen weights' (all of them; below what any weights of the in-plane candidates reach) and below f's. A
    restorer that returns its input gets nothing back."""
    path, truth, noisy = textured
    plan, spec = planning.plan(path, model=f"gaussian:sigma={sigma}", tile=[32, 32, 32], overlap=8)
    f = ndimage.gaussian_filter(noisy, sigma, mode="reflect")
    share = sure.blend_weights(plan, spec, (1.0, 0.0), photons=5.0)
    oracle = np.sum((noisy - f) * (truth - f)) / np.sum((noisy - f) ** 2)
    assert 0 < share[0] < 1 and share[0] == pytest.approx(oracle, abs=0.05) and not any(share[1:])

    weights = sure.blend_weights(plan, spec, (1.0, 0.0), photons=100.0)
    z = blend.z_averaged(noisy[None], 0)  # a 3D restorer: its tiles' own planes give the z candidates
    candidates = blend.candidates(noisy[None], z)

    def best(use):  # the weights of candidates `use` least squares against the truth picks, the others 0
        a = np.stack([(candidates[j][0] - f).ravel() for j in use], axis=1)
        w = np.zeros(blend.N_WEIGHTS)
        w[list(use)] = np.linalg.lstsq(a, (truth - f).ravel(), rcond=None)[0]
        return w

    def mse(w):
        return np.mean((blend.blend(f[None], noisy[None], w, z)[0] - truth) ** 2)

    assert len(weights) == blend.N_WEIGHTS == blend.LATERAL + 1 + len(blend.Z_LATERAL_SIGMAS)
    assert mse(weights) <= 1.07 * mse(best(range(blend.N_WEIGHTS))) and mse(weights) < mse((0.0,) * blend.N_WEIGHTS)
    # the z candidates earn their place: no in-plane weights do as well
    assert mse(weights) < mse(best(range(blend.LATERAL)))
    identity, ispec = planning.plan(path, model="identity", tile=[32, 32, 32], overlap=8)
    zero = (0.0,) * blend.N_WEIGHTS
    assert sure.blend_weights(identity, ispec, (1.0, 0.0), 100.0) == zero  # nothing to give back
    assert sure.blend_weights(plan, spec, (float("nan"), float("nan")), 100.0) == zero  # no noise model


@pytest.mark.slow
def test_regression_blend_through_the_cli(tiny_models, session_cluster, tmp_path):
    """A regression model's blend weights are chosen on the image and recorded; --blend off gives f, --blend 0.5
    gives f + 0.5 (y - f) exactly; out-of-range shares and diffusion models are refused with one line."""
    img = (synthetic.phantom((4, 32, 32), seed=3) * 200 + 20).astype(np.float32)
    noisy = np.random.default_rng(2).poisson(img).astype(np.float32)
    src = tmp_path / "in.ome.zarr"
    write_image(src, noisy, axes="zyx", chunks=(4, 32, 32))
    runs = {}
    for name, extra in (("auto", []), ("off", ["--blend", "off"]), ("half", ["--blend", "0.5"])):
        out = tmp_path / f"{name}.ome.zarr"
        result = cli("restore", src, out, "--model", tiny_models("regression"), "--tile", 1, 32, 32, "--overlap",
                     4, "--cluster", session_cluster.scheduler.address, "--overwrite", *extra)
        assert result.exit_code == 0, (result.output, result.exception)
        runs[name] = np.asarray(ngff.open_level(str(out), 0)[...], np.float64)
        runs[name + "_share"] = ngff.read_info(str(out)).provenance["parameters"]["model"]["options"]["blend"]
    n = blend.N_WEIGHTS
    assert runs["off_share"] == [0.0] * n and runs["half_share"] == [0.5] + [0.0] * (n - 1)
    assert len(runs["auto_share"]) == n and not np.allclose(runs["auto"], runs["off"])
    np.testing.assert_allclose(runs["half"], runs["off"] + 0.5 * (noisy - runs["off"]), rtol=1e-5, atol=1e-3)
    assert_user_error(cli("restore", src, tmp_path / "x.ome.zarr", "--model", tiny_models("regression"),
                          "--blend", "2"), tmp_path / "x.ome.zarr", contains="--blend must be")
    assert_user_error(cli("restore", src, tmp_path / "y.ome.zarr", "--model", tiny_models("edm"),
                          "--blend", "0.3"), tmp_path / "y.ome.zarr", contains="one-pass (regression) models")


@pytest.mark.slow
def test_std_scale_makes_the_spread_the_error_of_the_mean(tiny_models, session_cluster, tmp_path):
    """With the image's noise model, SURE's fit (a factor on the spread and a floor) makes the std's mean square the
    mean's squared error against the truth (within 25 %: SURE's own spread on 2 sampled 128² planes at 10 photons is
    ~10 %) and its 2-std band cover 0.90-0.99 of the voxels, where the raw spread of K = 2 four-step samples has a
    mean square under half the error and covers under 0.8. Through the CLI the engine measures the noise itself,
    records the fit and writes sqrt((factor x raw spread)² + floor²) (per tile, before tiles blend), the raw spread
    from --std-scale off, the mean untouched; a given factor is applied as given; bad ones are refused with one line."""
    truth = synthetic.phantom((4, 128, 128), seed=5).astype(np.float64)
    ref, (photons, read) = tiny_models.ref, (10.0, 1.0)
    assert TINY_DEGRADE == f"poisson:photons={photons:g},read={read:g}"
    noisy = Degradation.parse(TINY_DEGRADE + ",seed=3")(truth, ref=ref)
    src = tmp_path / "in.ome.zarr"
    write_image(src, noisy, axes="zyx", chunks=(4, 128, 128))
    model, addr = tiny_models("edm"), session_cluster.scheduler.address
    runs = {}
    for name, extra in (("auto", []), ("off", ["--std-scale", "off"]), ("given", ["--std-scale", "2.5"])):
        out = tmp_path / f"{name}.ome.zarr"
        result = cli("restore", src, out, "--model", model, "--samples", 2, "--steps", 4, "--std", "--tile", 1, 128,
                     128, "--overlap", 8, "--cluster", addr, *extra)
        assert result.exit_code == 0, (result.output, result.exception)
        runs[name] = (np.asarray(ngff.open_level(str(out), 0)[...], np.float64),
                      np.asarray(ngff.open_level(str(tmp_path / f"{name}.std.ome.zarr"), 0)[...], np.float64),
                      ngff.read_info(str(out)).provenance["parameters"]["model"]["options"]["std_scale"])
    (mean, std, (factor, floor)), (mean_off, raw, off) = runs["auto"], runs["off"]
    assert off == [1.0, 0.0] and runs["given"][2] == [2.5, 0.0] and factor > 0
    np.testing.assert_array_equal(mean, mean_off)
    # each tile's std is fitted, then tiles blend: exact where one tile covers a voxel, close where two overlap
    rel = np.abs(std / np.sqrt((factor * raw) ** 2 + floor ** 2) - 1)
    assert np.mean(rel < 1e-5) > 0.8 and rel.max() < 0.1
    np.testing.assert_allclose(runs["given"][1], raw * 2.5, rtol=1e-6)

    # the estimator itself, given the noise the degradation made (variance = gain x intensity + gain² read²): the
    # fitted std's mean square is the mean's squared error, where the raw spread's is far below it
    gain = ref / photons
    plan, spec = planning.plan(str(src), model=str(model), samples=2, steps=4, std=True, std_scale="off",
                               tile=[1, 128, 128], overlap=8)
    factor, floor = sure.std_scale(plan, spec, (gain, gain ** 2 * read ** 2))
    error = np.mean((mean - truth) ** 2)
    assert 0.75 < np.mean((factor * raw) ** 2 + floor ** 2) / error < 1.33, (factor, floor, np.mean(raw ** 2), error)
    assert np.mean(raw ** 2) / error < 0.5
    coverage = {name: np.mean(np.abs(mean - truth) <= 2 * s) for name, s in (
        ("fitted", np.sqrt((factor * raw) ** 2 + floor ** 2)), ("raw", raw))}
    assert 0.9 <= coverage["fitted"] <= 0.99 and coverage["raw"] < 0.8, coverage
    assert sure.std_scale(plan, spec, (float("nan"), float("nan"))) == (1.0, 0.0)  # no noise model: the raw spread

    for bad in ("-1", "0,0", "1,2,3", "x"):
        assert_user_error(cli("restore", src, tmp_path / "x.ome.zarr", "--model", model, "--samples", 2, "--std",
                              "--std-scale", bad), tmp_path / "x.ome.zarr", contains="--std-scale must be")
    assert_user_error(cli("restore", src, tmp_path / "y.ome.zarr", "--model", model, "--samples", 2,
                          "--std-scale", "2"), tmp_path / "y.ome.zarr", contains="add --std")


def test_z_taps_count_the_own_plane_where_the_volume_end_reflects_it():
    """SURE's divergence of the z candidates for a 2.5D tile: the z average's weight on the own plane, measured by
    perturbing that plane, is the tap, 0.40 inside the stack and 0.65 at its end planes (the reflected context
    repeats the own plane there)."""
    from volrestore.blockwise.grid import reflect

    rng, n, c = np.random.default_rng(0), 5, 2
    stack = rng.standard_normal((n, 8, 8))
    measured = []
    for z in range(n):
        planes = reflect(np.arange(z - c, z + c + 1), n)
        bumped = stack.copy()
        bumped[z, 3, 3] += 1.0
        diff = (blend.z_averaged(bumped[planes][None], c) - blend.z_averaged(stack[planes][None], c))[0, 3, 3]
        tap = blend.taps(c, 2, 0, planes)
        assert tap[blend.LATERAL] == pytest.approx(diff, abs=1e-12)
        assert tap[blend.LATERAL + 1] == pytest.approx(diff * blend.centre_tap(blend.Z_LATERAL_SIGMAS[0]), abs=1e-12)
        measured.append(round(diff, 2))
    assert measured == [0.65, 0.4, 0.4, 0.4, 0.65]
