"""`volrestore distill`: a diffusion teacher's DDPM-avg on a noisy image becomes a one-evaluation regression student,
through the CLI on real OME-Zarr files; the targets are exactly the teacher's restore, the student starts from the
teacher's weights, it restores, and resumes without the teacher's work again (bad inputs: tests/test_bad_inputs.py)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from _io_helpers import cli, tree_hash
from conftest import TINY_DEGRADE

from volrestore import write_image
from volrestore.io import ngff
from volrestore.model import nets
from volrestore.model.checkpoint import load_checkpoint
from volrestore.simulate import synthetic
from volrestore.simulate.degrade import Degradation

# tiny-2.5d: 32 x 32 patches of 2 per iteration; the last half of y validates
STUDENT = ["--patch", 1, 32, 32, "--batch", 2, "--val-fraction", 0.5, "--samples", 2, "--steps", 2]


def noisy_phantom(path, ref):
    clean = synthetic.phantom((6, 64, 64), seed=5)
    noisy = Degradation.parse(TINY_DEGRADE + ",seed=3")(clean, ref=ref)
    write_image(path, noisy.astype("float32"), axes="zyx", chunks=(3, 32, 32))
    return str(path)


@pytest.mark.slow
def test_distill_trains_a_student_on_the_teachers_average(tiny_models, session_cluster, tmp_path):
    teacher, addr = tiny_models("edm"), session_cluster.scheduler.address
    noisy = noisy_phantom(tmp_path / "noisy.ome.zarr", tiny_models.ref)
    before = tree_hash(Path(noisy))
    student = tmp_path / "student.pt"
    result = cli("distill", noisy, "--teacher", teacher, "--out", student, *STUDENT, "--iterations", 3,
                 "--cluster", addr, "--json")
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    targets = tmp_path / "student.targets.ome.zarr"
    assert f'"targets": "{targets}"' in result.stdout

    # the targets are the teacher's own DDPM-avg restore of the input, bit for bit
    direct = tmp_path / "direct.ome.zarr"
    result = cli("restore", noisy, direct, "--model", teacher, "--samples", 2, "--steps", 2, "--cluster", addr)
    assert result.exit_code == 0, (result.output, result.exception)
    np.testing.assert_array_equal(ngff.open_level(str(targets), 0)[...], ngff.open_level(str(direct), 0)[...])

    ck, tk = load_checkpoint(student), load_checkpoint(teacher)
    assert ck["objective"] == "regression" and ck["iteration"] == 3 and ck["preset"] == tk["preset"]
    assert ck["train_config"]["init"] == tk["hash"]
    assert ck["provenance"]["distilled"] == {"teacher": str(teacher), "teacher_hash": tk["hash"], "samples": 2,
                                             "steps": 2, "sampler": None, "targets": str(targets.resolve())}
    data = ck["provenance"]["data"]
    assert data["input"]["path"].endswith("noisy.ome.zarr") and data["target"]["path"].endswith("targets.ome.zarr")

    # it restores in one evaluation: a regression model, no --samples
    restored = tmp_path / "r.ome.zarr"
    result = cli("restore", noisy, restored, "--model", student, "--cluster", addr)
    assert result.exit_code == 0, (result.output, result.exception)
    out = ngff.open_level(str(restored), 0)[...]
    assert out.shape == (6, 64, 64) and np.isfinite(out).all() and out.std() > 0
    assert tree_hash(Path(noisy)) == before  # the input is never changed

    # --resume reuses the finished targets (the teacher does no work) and continues the student
    result = cli("distill", noisy, "--teacher", teacher, "--out", student, *STUDENT, "--iterations", 5,
                 "--cluster", addr, "--resume", "--json")
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    assert '"teacher_blocks": 0' in result.stdout and "already complete" in result.stderr
    assert load_checkpoint(student)["iteration"] == 5


@pytest.mark.slow
def test_student_weights_are_the_teachers_without_the_noisy_sample_input(tiny_models):
    tk = load_checkpoint(tiny_models("edm"))
    state = nets.student_weights(tk["ema"], tk["preset"])
    net = nets.ConditionalUNet(tk["preset"], "regression")
    net.load_state_dict(state)  # strict: every other weight has the regression net's shape
    w, ws = tk["ema"]["enc.conv_in.weight"], net.enc["conv_in"].weight.detach()
    x = 1 + 2 * nets.z_context(tk["preset"])  # channels: condition (with its z-context), x, ones
    assert ws.shape[1] == w.shape[1] - 1
    torch.testing.assert_close(ws, torch.cat([w[:, :x], w[:, x + 1:]], dim=1), rtol=0, atol=0)
