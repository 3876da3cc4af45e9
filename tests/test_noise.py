"""The device noise generator (noise.field_torch, Philox4x32-10 per voxel in torch ops): known answers, one global
field whatever box it is drawn in, the statistics of a standard normal, and its use by restore (--noise voxel)."""

import numpy as np
import pytest
import torch

from _io_helpers import assert_user_error, cli
from volrestore import write_image
from volrestore.io import ngff
from volrestore.model import noise

# Random123's tests/kat_vectors, "philox4x32 10" lines: counter (4 words), key (2 words) -> output (4 words).
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_philox4x32_matches_random123_known_answers(counter, key, expected):
    words = noise.philox4x32([torch.tensor([c], dtype=torch.int64) for c in counter], key)
    assert [int(w) for w in words] == list(expected)


def test_philox4x32_is_wrong_with_one_round_less():  # the known answers do pin the round count
    counter, key, expected = KNOWN_ANSWERS[2]
    words = noise.philox4x32([torch.tensor([c], dtype=torch.int64) for c in counter], key, rounds=9)
    assert [int(w) for w in words] != list(expected)


def test_a_voxel_draws_the_same_value_from_any_box():
    whole = noise.field_torch((0, -7, -3), (6, 40, 50), 9, 1, 2)
    part = noise.field_torch((2, 5, 11), (3, 17, 20), 9, 1, 2)
    assert torch.equal(whole[2:5, 12:29, 14:34], part)
    one = noise.field_torch((4, 0, 0), (1, 33, 3), 9, 1, 2)  # a 2.5D tile's box: 1 slice of z
    assert torch.equal(whole[4:5, 7:40, 3:6], one)
    assert not torch.equal(noise.field_torch((0, -7, -3), (6, 40, 50), 9, 2, 2), whole)  # another sample
    assert not torch.equal(noise.field_torch((0, -7, -3), (6, 40, 50), 9, 1, 3), whole)  # another step
    assert not torch.equal(noise.field_torch((0, -7, -3), (6, 40, 50), 8, 1, 2), whole)  # another seed


def test_leading_axes_and_2d_boxes_are_keyed_per_index():
    four = noise.field_torch((0, 3, 0, 0), (2, 1, 8, 8), 1, 0, 0)  # (c, z, y, x): each channel its own stream
    assert torch.equal(four[1], noise.field_torch((1, 3, 0, 0), (1, 1, 8, 8), 1, 0, 0)[0])
    assert not torch.equal(four[0], four[1])
    flat = noise.field_torch((2, 2), (8, 8), 1, 0, 0)
    assert torch.equal(flat, noise.field_torch((0, 0), (10, 10), 1, 0, 0)[2:, 2:])


def test_the_field_is_standard_normal_and_independent():
    z = noise.field_torch((0, 0, 0), (32, 64, 64), 3, 0, 0).double()
    n = z.numel()
    assert abs(z.mean().item()) < 4 / n**0.5
    assert abs(z.var().item() - 1) < 4 * (2 / n) ** 0.5
    assert abs((z**4).mean().item() - 3) < 0.1  # Gaussian kurtosis, not a uniform's 1.8
    for shifted in (z[1:] * z[:-1], z[:, 1:] * z[:, :-1], z[..., 1:] * z[..., :-1]):  # neighbours along each axis
        assert abs(shifted.mean().item()) < 4 / shifted.numel() ** 0.5
    other = noise.field_torch((0, 0, 0), (32, 64, 64), 3, 1, 0).double()  # the next sample's stream
    assert abs((z * other).mean().item()) < 4 / n**0.5
    counts, _ = np.histogram(z.numpy(), bins=[-np.inf, -1, 0, 1, np.inf])
    assert np.allclose(counts / n, [0.1587, 0.3413, 0.3413, 0.1587], atol=0.005)


@pytest.mark.slow
def test_restore_with_device_noise_is_bitwise_across_blocks_and_names_its_scheme(session_cluster, tmp_path):
    from volrestore.simulate import synthetic

    clean = synthetic.phantom((2, 56, 72), seed=8001) * 200 + 10
    data = np.random.default_rng(3).poisson(clean).astype(np.uint16)
    src = tmp_path / "in.ome.zarr"
    write_image(src, data, axes="zyx", chunks=(1, 32, 32))
    args = ["--model", "default", "--samples", 1, "--steps", 12, "--tile", 1, 32, 32, "--overlap", 8, "--batch", 3,
            "--cluster", session_cluster.scheduler.address]
    out = {name: tmp_path / f"{name}.ome.zarr" for name in ("a", "b", "cells")}
    assert cli("restore", src, out["a"], *args, "--noise", "voxel").exit_code == 0
    assert cli("restore", src, out["b"], *args, "--noise", "voxel", "--chunks", 1, 8, 24, "--block", 2, 16, 48
               ).exit_code == 0
    assert cli("restore", src, out["cells"], *args).exit_code == 0
    a, b, cells = (ngff.open_level(str(out[n]), 0)[...] for n in ("a", "b", "cells"))
    assert a.tobytes() == b.tobytes() and a.std() > 0
    assert not np.array_equal(a, cells)  # other noise, as good a restoration (0.97 and 0.96 measured)
    fidelity = [np.corrcoef(r.ravel(), clean.ravel())[0, 1] for r in (a, cells)]
    assert min(fidelity) > 0.9 and abs(fidelity[0] - fidelity[1]) < 0.03
    assert ngff.read_info(str(out["a"])).provenance["parameters"]["model"]["options"]["noise"] == noise.DEVICE_SCHEME
    assert ngff.read_info(str(out["cells"])).provenance["parameters"]["model"]["options"]["noise"] == noise.SCHEME


def test_an_unknown_noise_scheme_is_refused_before_any_output(tmp_path):
    src = tmp_path / "in.ome.zarr"
    write_image(src, np.ones((1, 32, 32), np.uint16), axes="zyx")
    result = cli("restore", src, tmp_path / "out.ome.zarr", "--model", "default:noise=threefry")
    assert_user_error(result, tmp_path / "out.ome.zarr", contains="noise must be cells or voxel")
