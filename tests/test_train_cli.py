"""`volrestore train` through a Dask cluster on real OME-Zarr files: DDP (gloo, 2 workers) equals 1 worker with the
doubled batch, CLI train -> restore, --resume, every bad input, and `volrestore models`."""

import json
import shutil

import numpy as np
import pytest
import torch
from _io_helpers import assert_user_error, cli

from volrestore.model import catalog
import volrestore
from volrestore import write_image
from volrestore.io import ngff
from volrestore.simulate import synthetic
from volrestore.model.checkpoint import load_checkpoint
from volrestore.model.diffusion_restorer import default_model_path
from volrestore.blockwise.plan import input_range
from volrestore.model.trainjob import partial_path, train_image

torch.set_num_threads(1)
DEGRADE = "poisson:photons=10,read=1,seed=1"
# tiny-2d, 16 x 16 patches; the last third of y is the validation region.
SHORT = ["--preset", "tiny-2d", "--patch", 1, 16, 16, "--batch", "2", "--val-fraction", "0.34", "--workers", "1"]


def make_image(path, data, axes="zyx", scale=None):
    write_image(path, data, axes=axes, chunks=(2, 16, 16)[-data.ndim:], scale=scale)
    return str(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    clean = (synthetic.phantom((4, 48, 48), seed=1) * 1000).astype("uint16")
    noisy = (clean + np.random.default_rng(0).poisson(50, clean.shape)).astype("uint16")
    return {"clean": make_image(d / "clean.ome.zarr", clean), "noisy": make_image(d / "noisy.ome.zarr", noisy),
            "other_voxel": make_image(d / "vox.ome.zarr", clean, scale=[2.0, 1.0, 1.0]),
            "small": make_image(d / "small.ome.zarr", clean[:, :24, :24]),
            "flat": make_image(d / "flat.ome.zarr", clean[0], axes="yx")}


@pytest.mark.slow
def test_ddp_two_workers_match_one_worker_with_doubled_batch(images, cluster, tmp_path):
    """The global batch of iteration i is defined by (seed, i) and each sample's timestep and noise by its global
    index, so 2 gloo ranks of batch 2 follow 1 worker of batch 4; only all-reduce rounding may differ."""
    common = dict(degrade=DEGRADE, preset="tiny-2d", patch=(16, 16), iterations=8, checkpoint_every=1,
                  val_fraction=0, lr=2e-3, cluster=cluster, progress=False, echo=lambda *a: None)
    one = train_image(images["clean"], tmp_path / "one.pt", batch=4, workers=1, **common)
    two = train_image(images["clean"], tmp_path / "two.pt", batch=2, workers=2, **common)
    a, b = load_checkpoint(one["out"]), load_checkpoint(two["out"])
    la, lb = (np.array([r["loss"] for r in ck["history"]]) for ck in (a, b))
    assert len(la) == 8 and la[0] != la[-1]
    np.testing.assert_allclose(lb, la, rtol=1e-4)  # measured: max rel. difference ~1e-7
    for k, v in a["model"].items():  # DDP's wrapper leaves no "module." prefix; weights agree too
        torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-6)
    assert a["provenance"]["data"]["batch"] == b["provenance"]["data"]["batch"] == 4
    assert b["provenance"]["workers"] == 2 and not partial_path(two["out"]).exists()


@pytest.mark.slow
def test_train_cli_then_restore_then_resume(images, cluster, tmp_path):
    out, addr = tmp_path / "m.pt", cluster.scheduler.address
    result = cli("train", "--target", images["clean"], "--degrade", DEGRADE, *SHORT, "--iterations", 4,
                 "--checkpoint-every", 2, "--out", out)  # the default: a local cluster of its own
    assert result.exit_code == 0, (result.output, result.exception)
    ck = load_checkpoint(out)
    assert ck["iteration"] == 4 and "val_psnr" in ck["history"][-1] and not partial_path(out).exists()
    data = ck["provenance"]["data"]
    assert data["target"]["shape"] == [4, 48, 48] and data["target"]["voxel_size"] == [1.0, 1.0, 1.0]
    assert data["degrade"] == DEGRADE and data["input"] is None and ck["provenance"]["command"].startswith("volrestore")

    restored = tmp_path / "r.ome.zarr"
    result = cli("restore", images["noisy"], restored, "--model", out, "--steps", 2, "--tile", 1, 16, 16,
                 "--overlap", 4, "--cluster", addr)
    assert result.exit_code == 0, (result.output, result.exception)
    assert np.isfinite(ngff.open_level(str(restored), 0)[...]).all()

    assert_user_error(cli("train", "--target", images["clean"], "--degrade", DEGRADE, *SHORT, "--out", out),
                      contains="--resume")  # exists: neither resumed nor overwritten silently
    result = cli("train", "--target", images["clean"], "--degrade", DEGRADE, *SHORT, "--iterations", 6,
                 "--checkpoint-every", 2, "--out", out, "--resume", "--cluster", addr)
    assert result.exit_code == 0, (result.output, result.exception)
    resumed = load_checkpoint(out)
    assert resumed["iteration"] == 6 and [r["iteration"] for r in resumed["history"]] == [2, 4, 6]
    assert_user_error(cli("train", "--target", images["clean"], "--degrade", DEGRADE, *SHORT, "--iterations", 6,
                          "--patch", 1, 8, 8, "--out", out, "--resume"), contains="different patch")


def test_z_strides_are_recorded_and_change_training(images, cluster, tmp_path):
    # A 2.5D model trained with --z-strides sees neighbours further apart: other weights than the adjacent-slice
    # default from the same seed, the strides in the checkpoint's data, and --resume refuses other strides.
    args = ["--target", images["clean"], "--degrade", DEGRADE, *SHORT, "--preset", "tiny-2.5d", "--iterations", 3,
            "--checkpoint-every", 3, "--cluster", cluster.scheduler.address]
    for name, extra in (("plain.pt", []), ("strided.pt", ["--z-strides", "1,2,3"])):
        result = cli("train", *args, *extra, "--out", tmp_path / name)
        assert result.exit_code == 0, (result.output, result.exception)
    plain, strided = load_checkpoint(tmp_path / "plain.pt"), load_checkpoint(tmp_path / "strided.pt")
    assert plain["provenance"]["data"]["z_strides"] == [1] and strided["provenance"]["data"]["z_strides"] == [1, 2, 3]
    assert any(not torch.equal(plain["model"][k], strided["model"][k]) for k in plain["model"])
    assert_user_error(cli("train", *args, "--iterations", 6, "--z-strides", "1,2", "--out", tmp_path / "strided.pt",
                          "--resume"), contains="different z_strides")


@pytest.mark.slow
def test_photon_conditioned_model_trains_and_restores_with_measured_or_given_photons(images, cluster, tmp_path):
    """`train --condition photons` tells a regression net each patch's drawn level; `restore` measures the image's
    level (recorded in provenance, so --resume compares it) or takes --photons, and the level changes the result;
    a blind model refuses --photons; --resume refuses another condition."""
    out, addr = tmp_path / "c.pt", cluster.scheduler.address
    args = ["--target", images["clean"], "--degrade", "poisson:photons=3-100,read=1,seed=1", *SHORT,
            "--objective", "regression", "--checkpoint-every", 6, "--cluster", addr]
    result = cli("train", *args, "--iterations", 6, "--condition", "photons", "--lr", "1e-2", "--out", out)
    assert result.exit_code == 0, (result.output, result.exception)
    ck = load_checkpoint(out)
    assert ck["condition"] == "photons" and ck["train_config"]["condition"] == "photons"
    assert_user_error(cli("train", *args, "--iterations", 8, "--out", out, "--resume"), contains="--condition photons")

    common = ["--model", out, "--tile", 1, 16, 16, "--overlap", 4, "--cluster", addr]
    runs = {}
    for name, extra in (("measured", []), ("p3", ["--photons", 3]), ("p300", ["--photons", 300])):
        result = cli("restore", images["noisy"], tmp_path / f"{name}.ome.zarr", *common, *extra)
        assert result.exit_code == 0, (result.output, result.exception)
        runs[name] = np.asarray(ngff.open_level(str(tmp_path / f"{name}.ome.zarr"), 0)[...])
        params = ngff.read_info(str(tmp_path / f"{name}.ome.zarr")).provenance["parameters"]
        runs[name + "_photons"] = params["model"]["options"]["photons"]
    assert runs["p3_photons"] == 3 and runs["p300_photons"] == 300
    # the noisy image (phantom x 1000 + Poisson(50) background, read as photons at its bright level): measured, recorded
    assert 10 < runs["measured_photons"] < 1e4
    assert not np.array_equal(runs["p3"], runs["p300"])  # the net uses the level it is told

    blind = tmp_path / "blind.pt"
    assert cli("train", "--target", images["clean"], "--degrade", DEGRADE, *SHORT, "--iterations", 2,
               "--objective", "regression", "--out", blind, "--cluster", addr).exit_code == 0
    restored = tmp_path / "x.ome.zarr"
    assert_user_error(cli("restore", images["noisy"], restored, "--model", blind, "--photons", 10), restored,
                      contains="blind to the noise level")
    assert_user_error(cli("restore", images["noisy"], restored, "--model", out, "--photons", -1), restored,
                      contains="--photons must be a positive number")


@pytest.mark.slow
def test_init_fine_tunes_the_shipped_default_and_refuses_contradictions(images, cluster, tmp_path):
    """`train --init default` starts from the shipped regression's EMA weights with its network, objective and
    condition and a quarter of its learning rate, records the model's hash, restores through the CLI; options that
    contradict the model, a missing model and a --resume across different starting weights are refused."""
    shipped = load_checkpoint(default_model_path("regression"))
    addr = cluster.scheduler.address
    args = ["--target", images["clean"], "--degrade", DEGRADE, "--patch", 1, 16, 16, "--batch", 2,
            "--val-fraction", 0, "--cluster", addr]
    still = tmp_path / "still.pt"  # one step of a vanishing learning rate: the weights it started from
    result = cli("train", *args, "--init", "default", "--iterations", 1, "--lr", "1e-12", "--out", still)
    assert result.exit_code == 0, (result.output, result.exception)
    fresh = tmp_path / "fresh.pt"
    result = cli("train", *args, "--preset", "small-2.5d", "--objective", "regression", "--iterations", 1, "--lr",
                 "1e-12", "--out", fresh)
    assert result.exit_code == 0, (result.output, result.exception)
    ck, fresh_ck = load_checkpoint(still), load_checkpoint(fresh)
    assert ck["preset"] == shipped["preset"] and ck["objective"] == "regression" and ck["condition"] == "none"
    assert ck["train_config"]["init"] == shipped["hash"] and fresh_ck["train_config"]["init"] is None
    assert ck["provenance"]["init"] == {"model": "default-regression", "hash": shipped["hash"]}
    # the shipped model's map, carried to this data's units (the target's range onto its training units), then fixed
    assert "normalise" not in ck and "normalise" not in fresh_ck
    np.testing.assert_allclose(ck["normalisation"]["target"], input_range(images["clean"], 0), rtol=1e-9)
    np.testing.assert_allclose(ck["normalisation"]["clip"], shipped["normalisation"]["clip"])
    gap = max(float((fresh_ck["ema"][k].float() - v.float()).abs().max()) for k, v in shipped["ema"].items())
    assert gap > 0.05  # fresh weights are far from the shipped ones; the fine-tuned run starts on them:
    for k, v in shipped["ema"].items():  # (training's forced weight normalisation rescales them by < 2e-4)
        torch.testing.assert_close(ck["ema"][k].float(), v.float(), atol=1e-6, rtol=1e-3)

    # so it restores as the shipped model does given the target's range (up to the weights' renormalisation)
    common = dict(tile=(1, 16, 16), overlap=4, cluster=cluster, progress=False, echo=lambda *a: None, blend="off")
    volrestore.restore(images["noisy"], str(tmp_path / "shipped.ome.zarr"), "default", normalise="image",
                       input_range=input_range(images["clean"], 0), **common)
    result = cli("restore", images["noisy"], tmp_path / "still.ome.zarr", "--model", still, "--blend", "off",
                 "--tile", 1, 16, 16, "--overlap", 4, "--cluster", addr)
    assert result.exit_code == 0, (result.output, result.exception)
    same = {name: np.asarray(ngff.open_level(str(tmp_path / f"{name}.ome.zarr"), 0)[...], np.float64)
            for name in ("shipped", "still")}
    span = np.ptp(same["shipped"])
    assert span > 100 and np.abs(same["still"] - same["shipped"]).max() < 1e-3 * span

    tuned = tmp_path / "tuned.pt"
    result = cli("train", *args, "--init", "default", "--iterations", 2, "--out", tuned)
    assert result.exit_code == 0, (result.output, result.exception)
    tuned_ck = load_checkpoint(tuned)
    assert tuned_ck["train_config"]["lr"] == pytest.approx(0.25 * shipped["train_config"]["lr"])
    assert any(not torch.equal(tuned_ck["ema"][k].float(), v.float()) for k, v in shipped["ema"].items())
    restored = tmp_path / "r.ome.zarr"
    result = cli("restore", images["noisy"], restored, "--model", tuned, "--tile", 1, 16, 16, "--overlap", 4,
                 "--cluster", addr)
    assert result.exit_code == 0, (result.output, result.exception)
    assert np.isfinite(ngff.open_level(str(restored), 0)[...]).all()
    listed = cli("models", tmp_path, "--json")
    assert listed.exit_code == 0, listed.output
    rows = {m["name"]: m for m in json.loads(listed.stdout)}
    assert rows["tuned"]["training_data"].endswith(f"fine-tuned from default-regression ({shipped['hash'][:12]})")
    assert "fine-tuned" not in rows["fresh"]["training_data"]
    result = cli("train", *args, "--init", "default", "--iterations", 3, "--out", tuned, "--resume")
    assert result.exit_code == 0 and load_checkpoint(tuned)["iteration"] == 3, (result.output, result.exception)

    bad = tmp_path / "bad.pt"
    for extra, contains in ((["--init", "default", "--preset", "tiny-2.5d"], "drop --preset"),
                            (["--init", "default", "--objective", "v"], "drop --objective v"),
                            (["--init", "default", "--condition", "photons"], "drop --condition photons"),
                            (["--init", tmp_path / "nope.pt"], "not found"),
                            ([], "give --preset NAME")):
        assert_user_error(cli("train", *args, *extra, "--iterations", 2, "--out", bad), bad, partial_path(bad),
                          contains=contains)
    assert_user_error(cli("train", *args, "--init", "default", "--iterations", 3, "--out", fresh, "--resume"),
                      contains="it started from fresh weights")


def test_paired_training_records_both_images(images, cluster, tmp_path):
    summary = train_image(images["clean"], tmp_path / "p.pt", input=images["noisy"], preset="tiny-2d",
                          patch=(16, 16), batch=2, iterations=2, val_fraction=0.34, cluster=cluster, progress=False,
                          echo=lambda *a: None)
    data = load_checkpoint(summary["out"])["provenance"]["data"]
    assert data["input"]["path"].endswith("noisy.ome.zarr") and data["degrade"] is None


@pytest.mark.parametrize("case,contains", [
    (["--input", "{other_voxel}"], "voxel size"),
    (["--input", "{small}"], "differ"),
    (["--degrade", DEGRADE, "--patch", 1, 64, 64], "does not fit into the volume"),
    (["--degrade", DEGRADE, "--preset", "tiny-3d", "--target", "{flat}"], "is 3D but"),
    (["--degrade", DEGRADE, "--preset", "paper-3d"], "unknown preset"),
    (["--degrade", "gauss:sigma=2"], "cannot parse degradation"),
    (["--degrade", DEGRADE, "--input", "{noisy}"], "not both"),
    (["--degrade", DEGRADE, "--patch", 8, 8, 8], "does not fit preset"),
    (["--degrade", DEGRADE, "--patch", "big", 8, 8], "'--patch'"),
    (["--degrade", DEGRADE, "--target", "{missing}"], "does not exist"),
    (["--degrade", DEGRADE, "--gpus", "0"], "--workers/--gpus must be"),
    (["--degrade", DEGRADE, "--z-strides", "1,2"], "--z-strides needs a 2.5D preset"),
    (["--degrade", DEGRADE, "--preset", "tiny-2.5d", "--z-strides", "0,2"], "positive whole numbers"),
    (["--degrade", DEGRADE, "--preset", "tiny-2.5d", "--z-strides", "two"], "separated by commas"),
    (["--degrade", DEGRADE, "--condition", "photons"], "add --objective regression"),
    (["--input", "{noisy}", "--objective", "regression", "--condition", "photons"], "--degrade SPEC"),
])
def test_bad_input_one_line_exit_2_nothing_written(images, tmp_path, case, contains):
    paths = {**images, "missing": str(tmp_path / "nope.ome.zarr")}
    args = ["--target", images["clean"], *SHORT, "--iterations", 2]
    args += [str(a).format(**paths) for a in case]  # click keeps the last of a repeated option
    out = tmp_path / "m.pt"
    assert_user_error(cli("train", *args, "--out", out), out, partial_path(out), contains=contains)


def test_models_lists_shipped_and_local_checkpoints(images, cluster, tmp_path, monkeypatch):
    train_image(images["clean"], tmp_path / "a.pt", degrade=DEGRADE, preset="tiny-2d", patch=(16, 16), batch=2,
                iterations=2, val_fraction=0.34, cluster=cluster, progress=False, echo=lambda *a: None)
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    result = cli("models", tmp_path, "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    local = [m for m in json.loads(result.stdout) if m["source"] == "local"]
    good, junk = sorted(local, key=lambda m: m["name"])
    assert (good["preset"], good["objective"], good["iteration"], good["spatial_dims"]) == ("tiny-2d", "edm", 2, 2)
    assert 1e4 < good["parameters"] < 1e6 and good["size_bytes"] > 0 and len(good["hash"]) == 64
    assert "clean.ome.zarr (4x48x48) + degrade poisson" in good["training_data"]
    assert "not a volrestore model" in junk["error"]
    table = cli("models", tmp_path)
    assert table.exit_code == 0 and "tiny-2d" in table.stdout and good["hash"][:12] in table.stdout
    assert_user_error(cli("models", tmp_path / "nowhere"), contains="does not exist")

    shipped = tmp_path / "package_models"  # stands in for volrestore/models/ (default.pt may not be there yet)
    shipped.mkdir()
    shutil.copy(tmp_path / "a.pt", shipped / "default.pt")
    monkeypatch.setattr(catalog, "shipped_dir", lambda: shipped)
    monkeypatch.chdir(shipped)  # no DIR: the current directory, here the same folder, listed once
    (entry,) = catalog.list_models()
    assert (entry["name"], entry["source"], entry["hash"]) == ("default", "shipped", good["hash"])
