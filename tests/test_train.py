"""Training loop, checkpoints and resume, patch sampling, degradation and the diffusion restorer (tiny presets)."""

import numpy as np
import pytest
import torch
from conftest import TINY_ITERATIONS

from volrestore.config import ModelRef, TrainConfig
from volrestore.simulate import synthetic
from volrestore.model import checkpoint
from volrestore.model import patches
from volrestore.blockwise.grid import reflect
from volrestore.model import train
from volrestore.simulate.degrade import Degradation
from volrestore.model.diffusion_restorer import DiffusionRestorer, resolve
from volrestore.errors import UserError

torch.set_num_threads(1)
DEG = Degradation.parse("poisson:photons=10,read=1,seed=1")


def psnr(x, ref):
    rng = np.percentile(ref, 99.9) - np.percentile(ref, 0.1)
    return 10 * np.log10(rng**2 / np.mean((x - ref) ** 2))


def make_sampler(shape=(4, 96, 64), patch=(32, 32), batch=4, seed=0):
    return patches.PatchSampler(synthetic.phantom(shape, seed=1), degrade=DEG, patch=patch, batch=batch, seed=seed,
                              val_fraction=0.34)


def run(path, sampler, iterations, resume=False, **kw):
    cfg = TrainConfig(**{"preset": "tiny-2d", "iterations": iterations, "warmup": 5, "checkpoint_every": 3,
                               "lr": 2e-3, **kw})
    return train.train(sampler, path, cfg, sampler.fit_normalisation(), resume=resume)


@pytest.mark.parametrize("preset,patch", [("tiny-2d", (32, 32)), ("tiny-3d", (8, 16, 16))])
@pytest.mark.slow
def test_training_loss_falls(tmp_path, preset, patch):
    sampler = make_sampler(shape=(16, 96, 64), patch=patch)
    losses = []
    cfg = TrainConfig(preset=preset, iterations=80, warmup=5, lr=2e-3, checkpoint_every=80)
    train.train(sampler, tmp_path / "m.pt", cfg, sampler.fit_normalisation(), log=lambda r: losses.append(r["loss"]))
    assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:10])


def test_resume_continues_identically(tmp_path):
    sampler = make_sampler()
    straight = run(tmp_path / "a.pt", sampler, 6)
    run(tmp_path / "b.pt", sampler, 3)
    resumed = run(tmp_path / "b.pt", sampler, 6, resume=True)
    assert resumed["iteration"] == 6
    for part in ("model", "ema"):
        for k, v in straight[part].items():
            assert torch.equal(v, resumed[part][k]), (part, k)
    with pytest.raises(UserError, match="different preset"):
        run(tmp_path / "b.pt", sampler, 9, resume=True, objective="eps")


@pytest.mark.slow
def test_checkpoint_roundtrip_and_validation(tmp_path, tiny_models):
    path = tiny_models("edm")  # conftest: tiny-2.5d, TINY_ITERATIONS["edm"] iterations, validated at the end
    loaded = checkpoint.load_checkpoint(path)
    assert loaded["hash"] == tiny_models.returned["edm"]["hash"]
    assert loaded["iteration"] == TINY_ITERATIONS["edm"] and loaded["preset"]["z_context"] == 2
    assert {"preset", "objective", "schedule", "normalisation", "provenance", "optimizer", "ema"} <= set(loaded)
    assert "val_psnr" in loaded["history"][-1]
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    tampered = dict(loaded)
    tampered["ema"] = {k: v + 1 if v.is_floating_point() else v for k, v in loaded["ema"].items()}
    torch.save(tampered, tmp_path / "tampered.pt")
    for name, msg in [("junk.pt", "not a volrestore model"), ("other.pt", "not a volrestore model"),
                      ("tampered.pt", "corrupt"), ("missing.pt", "not found")]:
        with pytest.raises(UserError, match=msg):
            checkpoint.load_checkpoint(tmp_path / name)


def test_restorer_beats_input_avg_helps_deterministic_batch_independent(tiny_models):
    path = tiny_models("edm")  # a 2.5D net: each tile is a z-slice with 2 neighbouring slices on each side
    clean = synthetic.phantom((6, 64, 64), seed=99)  # held out: another phantom, another noise seed
    volume = Degradation.parse("poisson:photons=10,read=1,seed=7")(clean, (0,), ref=tiny_models.ref)
    tiles, origins = np.stack([volume[0:5], volume[1:6]]), [(2, 0, 0), (3, 0, 0)]  # slices 2 and 3 in context
    noisy, clean = volume[2:4], clean[2:4]
    r = DiffusionRestorer(path, samples=4, steps=8, std=True)
    assert (r.spatial_dims, r.size_multiple, r.outputs, r.z_context) == (2, 4, ("mean", "std"), 2)
    a, b = r(tiles, origins, seed=5), r(tiles, origins, seed=5)
    single = r(tiles[1:], origins[1:], seed=5)
    assert np.array_equal(a["mean"], b["mean"]) and np.array_equal(a["std"], b["std"])
    assert np.array_equal(single["mean"][0], a["mean"][1])  # bitwise: batching does not change a tile
    assert not np.array_equal(r(tiles, origins, seed=6)["mean"], a["mean"])
    gain = psnr(a["mean"], clean) - psnr(noisy, clean)
    assert gain > 5.0, gain  # 13.8 dB input; the 300-iteration tiny net gains 10.4 dB (measured)
    one = DiffusionRestorer(path, samples=1, steps=8)(tiles, origins, seed=5)["mean"]
    assert psnr(a["mean"], clean) > psnr(one, clean) + 1.0  # DDPM-avg: K = 4 beats K = 1 (by 2.2 dB here)
    assert a["std"].min() >= 0 and np.median(a["std"]) > 0  # samples differ where the data are noisy


def test_restorer_options_validated(tiny_models):
    path = str(tiny_models("edm"))
    spec = resolve(ModelRef(name=path, options={"samples": 4, "std": True}))
    assert spec.spatial_dims == 2 and spec.size_multiple == 4 and spec.outputs == ("mean", "std")
    for opts, msg in [({"std": True}, "samples >= 2"), ({"sampler": "euler"}, "unknown sampler"),
                      ({"steps": 0}, "whole numbers"), ({"tile": 3}, "does not take")]:
        with pytest.raises(UserError, match=msg):
            resolve(ModelRef(name=path, options=opts))


def test_regression_objective_one_pass(tmp_path):
    sampler = make_sampler()
    run(tmp_path / "r.pt", sampler, 6, objective="regression")
    r = DiffusionRestorer(tmp_path / "r.pt", samples=4)
    tiles = sampler(0)[0][:2]
    out = r(tiles, [(0, 0, 0), (0, 0, 32)], seed=1)
    assert out["mean"].shape == tiles.shape and r.outputs == ("mean",)
    with pytest.raises(UserError, match="no std"):
        DiffusionRestorer(tmp_path / "r.pt", samples=4, std=True)


def test_patch_sampler_reads_only_patches_and_never_validation(tmp_path):
    class Recording:
        """An array-like (like zarr.Array) that records every region read."""

        def __init__(self, a):
            self.a, self.shape, self.reads = a, a.shape, []

        def __getitem__(self, region):
            self.reads.append(region)
            return self.a[region]

    np.save(tmp_path / "psf.npy", np.ones((3, 5, 5)))  # 3D PSF: 2D patches need z and y/x context
    vol = Recording(synthetic.phantom((6, 96, 64), seed=2))
    s = patches.PatchSampler(vol, degrade=Degradation(photons=10, blur=str(tmp_path / "psf.npy")), patch=(32, 32),
                           batch=4, val_fraction=0.34)
    vol.reads.clear()
    for it in range(20):
        c, t = s(it)
    assert c.shape == t.shape == (4, 32, 32)
    # Training reads stay above the held-out rows, and are only a patch plus the blur halo (2 rows each side).
    assert all(r[1].stop <= s.y_split and r[1].stop - r[1].start <= 36 and r[2].stop - r[2].start <= 36
               for r in vol.reads)
    np.testing.assert_array_equal(s(3)[0], s(3)[0])  # a batch depends only on (seed, iteration)
    vol.reads.clear()
    vc, vt = s.validation(4)
    assert vc.shape == (4, 32, 32) and all(r[1].start >= s.y_split for r in vol.reads)


def test_z_strides_take_2_5d_neighbours_that_far_apart_in_training_only():
    # Slices hold their own index, so a patch's condition channels show which slices the sampler took: the centre
    # slice and its neighbours at +-s, +-2s for one stride s per patch (reflected at the ends), every stride of the
    # set drawn, the target the centre slice; validation and the default (1,) take adjacent slices.
    vol = np.broadcast_to(np.arange(40, dtype=np.float32)[:, None, None], (40, 24, 24)).copy()
    strided = patches.PatchSampler(vol, vol, patch=(8, 8), batch=64, z_context=2, val_fraction=0.34,
                                   z_strides=(1, 2, 4, 8))
    cond, target = strided(0)
    assert cond.shape == (64, 5, 8, 8) and target.shape == (64, 8, 8)
    z = cond[:, :, 0, 0]
    np.testing.assert_array_equal(z[:, 2], target[:, 0, 0])
    seen = set()
    for zc, row in zip(z[:, 2].astype(int), z.astype(int)):
        fits = [s for s in (1, 2, 4, 8)  # sorted: a z flip reverses the channels
                if sorted(row) == sorted(reflect(zc + s * np.arange(-2, 3), 40))]
        assert len(fits) == 1, (zc, row)
        seen |= set(fits)
    assert {1, 2, 4, 8} <= seen
    vz = strided.validation(16)[0][:, :, 0, 0].astype(int)
    assert all(sorted(r) == sorted(reflect(r[2] + np.arange(-2, 3), 40)) for r in vz)
    plain = patches.PatchSampler(vol, vol, patch=(8, 8), batch=64, z_context=2, val_fraction=0.34)(0)[0][:, :, 0, 0]
    assert all(sorted(r) == sorted(reflect(r[2] + np.arange(-2, 3), 40)) for r in plain.astype(int))
    with pytest.raises(UserError, match="z strides must be positive"):
        patches.PatchSampler(vol, vol, patch=(8, 8), batch=4, z_context=2, z_strides=(0,))


def test_degradation_spec_and_determinism(tmp_path):
    np.save(tmp_path / "psf.npy", np.ones((3, 3)))
    d = Degradation.parse(f"poisson:photons=20,read=2,blur={tmp_path / 'psf.npy'},down=2,seed=3")
    assert (d.photons, d.read, d.down, d.seed) == (20, 2, 2, 3) and d.halo(3) == (0, 1, 1)
    x = synthetic.phantom((2, 32, 32), seed=0)
    y1, y2, y3 = d(x, (1,)), d(x, (1,)), d(x, (2,))
    assert y1.shape == x.shape and np.array_equal(y1, y2) and not np.array_equal(y1, y3)
    for bad in ["gauss:sigma=1", "poisson:read=2", "poisson:photons=-1", "poisson:photons=5,foo=1"]:
        with pytest.raises(UserError, match="poisson:photons=P"):
            Degradation.parse(bad)


def test_degradation_level_is_the_one_each_call_draws():
    """level(counter) is the (photons, read) the call with that counter uses: a flat image at the reference comes
    back with variance 1/P + (read/P)^2 in reference units, for each of several counters' drawn levels."""
    d = Degradation.parse("poisson:photons=2-200,read=0.5-2,seed=4")
    flat = np.ones((256, 256))
    levels = [d.level((7, i)) for i in range(4)]
    assert len({p for p, _ in levels}) == 4 and all(2 <= p <= 200 and 0.5 <= r <= 2 for p, r in levels)
    for i, (p, r) in enumerate(levels):
        assert np.var(d(flat, (7, i), ref=1.0)) == pytest.approx(1 / p + (r / p) ** 2, rel=0.05)
    assert Degradation.parse("poisson:photons=20,read=1").level((1, 2)) == (20.0, 1.0)


def test_patch_sampler_photons_and_photon_conditioned_training(tmp_path):
    """The sampler names each patch's drawn level (training and validation; told as photons + read²), a photon-conditioned regression run
    records its condition and restores differently at different told levels; conditioning needs the levels."""
    deg = Degradation.parse("poisson:photons=3-100,read=1,seed=1")
    sampler = patches.PatchSampler(synthetic.phantom((4, 96, 64), seed=1), degrade=deg, patch=(32, 32), batch=4,
                                   val_fraction=0.34)
    assert np.array_equal(sampler.levels(5), [deg.level((1, 5, b)) for b in range(4)])
    assert np.array_equal(sampler.photons(5), [p + r**2 for p, r in (deg.level((1, 5, b)) for b in range(4))])
    assert np.array_equal(sampler.photons(5, 1, 3), sampler.photons(5)[1:3])
    assert np.array_equal(sampler.levels(0, 0, 2, val=True), [deg.level((2, 0, b)) for b in range(2)])
    paired = patches.PatchSampler(np.ones((4, 64, 64)), np.ones((4, 64, 64)), patch=(32, 32), batch=2, val_fraction=0)
    with pytest.raises(UserError, match="no known noise level"):
        paired.photons(0)

    cfg = TrainConfig(preset="tiny-2d", iterations=3, warmup=2, checkpoint_every=3, lr=2e-3, objective="regression",
                      condition="photons")
    with pytest.raises(UserError, match=r"\(cond, target, photons\)"):
        train.train(sampler, tmp_path / "x.pt", cfg, sampler.fit_normalisation())
    ck = train.train(lambda it: (*sampler(it), sampler.photons(it)), tmp_path / "c.pt", cfg,
                     sampler.fit_normalisation())
    assert ck["condition"] == "photons"
    tiles = sampler(0)[0][:2]
    outs = [DiffusionRestorer(tmp_path / "c.pt", photons=p)(tiles, [(0, 0, 0), (0, 0, 32)], seed=0)["mean"]
            for p in (3, 300)]
    assert not np.array_equal(*outs)
    with pytest.raises(ValueError, match="needs photons"):
        DiffusionRestorer(tmp_path / "c.pt")
    with pytest.raises(UserError, match="regression objective"):
        train.train(sampler, tmp_path / "e.pt", cfg.model_copy(update={"objective": "v"}), sampler.fit_normalisation())


def test_presets_by_name_or_path(tmp_path):
    from volrestore.model import nets

    assert {"paper-2d", "unet3d", "tiny-2d", "tiny-3d"} <= set(nets.preset_names())
    paper = nets.build("paper-2d")
    assert 60e6 < nets.count_params(paper) < 66e6 and paper.size_multiple == 8  # the paper's ~64 M
    assert {b.dropout for b in paper.modules() if isinstance(b, nets.Block)} == {0.2}  # the paper's dropout
    for name in ("tiny-2d", "tiny-3d"):
        assert 1e4 < nets.count_params(nets.build(name)) < 1e6
    (tmp_path / "mine.yaml").write_text(nets.resources.files("volrestore").joinpath("presets", "tiny-3d.yaml")
                                        .read_text())
    net = nets.build(str(tmp_path / "mine.yaml"), objective="regression")
    assert net.spatial_dims == 3 and net.objective == "regression"
    with pytest.raises(UserError, match="paper-2d, small-2.5d, small-2d, tiny-2.5d, tiny-2d, tiny-3d, unet3d"):
        nets.load_preset("paper-3d")


def test_noise_balance_weights_and_loss():
    """Weights are (input MSE)^-B with mean 1, so a patch with 4x the input error counts 1/4 (B = 1) or 1/2 (B = 0.5)
    as much; B = 0 is exactly the plain MSE; the weighted loss is the weighted mean of per-sample MSEs."""
    from volrestore.model import diffusion as dfn

    x0 = torch.zeros(2, 1, 4, 4)
    cond = torch.stack([torch.full((1, 4, 4), 1.0), torch.full((1, 4, 4), 2.0)])  # input MSE 1 and 4
    assert dfn.balance_weights(cond, x0, 0.0) is None
    w1, w5 = dfn.balance_weights(cond, x0, 1.0), dfn.balance_weights(cond, x0, 0.5)
    torch.testing.assert_close(w1, torch.tensor([1.6, 0.4]))
    torch.testing.assert_close(w5, torch.tensor([4 / 3, 2 / 3]))

    class Const(torch.nn.Module):  # a "regression net" answering the condition itself
        def forward(self, cond, x, c_noise):
            return cond

    sched = dfn.Schedule()
    plain = dfn.loss(Const(), x0, cond, sched, "regression", None, None)
    assert float(plain) == 2.5
    assert float(dfn.loss(Const(), x0, cond, sched, "regression", None, None, torch.ones(2))) == 2.5
    assert abs(float(dfn.loss(Const(), x0, cond, sched, "regression", None, None, w1)) - (1.6 + 0.4 * 4) / 2) < 1e-6


def test_noise_balance_is_recorded_and_changes_training(tmp_path):
    sampler = make_sampler()
    plain = run(tmp_path / "a.pt", sampler, 3, objective="regression")
    balanced = run(tmp_path / "b.pt", sampler, 3, objective="regression", noise_balance=1.0)
    assert plain["train_config"]["noise_balance"] == 0.0 and balanced["train_config"]["noise_balance"] == 1.0
    assert [r["loss"] for r in plain["history"]] != [r["loss"] for r in balanced["history"]]
    with pytest.raises(Exception, match="less than or equal to 2"):
        TrainConfig(noise_balance=3)
