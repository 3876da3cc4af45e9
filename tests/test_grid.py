"""Tile grid: coverage, reflection, blending weights that sum to 1, tiles per block, tile validation."""

import itertools

import numpy as np
import pytest

from volrestore.model import noise
from volrestore.errors import UserError
from volrestore.blockwise.grid import AxisGrid, Grid, fitted_tile, reflect, validate_tile

CASES = [(1, 4, 1), (5, 8, 2), (37, 16, 4), (64, 16, 8), (100, 32, 0), (33, 10, 5), (7, 64, 8)]


def covering(ax: AxisGrid, size: int):
    """Brute force: for each voxel, the tiles whose span holds it."""
    return [[k for k in range(ax.count) if ax.start(k) <= v < ax.start(k) + ax.tile] for v in range(size)]


@pytest.mark.parametrize("n,t,o", CASES)
def test_axis_weights_sum_to_one_and_tiles_cover_with_halo(n, t, o):
    ax = AxisGrid(n, fitted_tile(n, t, o), o)
    assert ax.tile >= 2 * o
    assert ax.start(0) == -o and ax.start(ax.count - 1) + ax.tile >= n + o
    total = np.zeros(n)
    for k in range(ax.count):
        s = ax.start(k)
        for i, w in enumerate(ax.weights(k)):
            if 0 <= s + i < n:
                total[s + i] += w
    np.testing.assert_allclose(total, 1.0, atol=1e-12)
    np.testing.assert_allclose(ax.weight_sum(0, n), 1.0, atol=1e-12)
    assert max(len(c) for c in covering(ax, n)) <= 2  # T >= 2*O: never three tiles on one voxel


@pytest.mark.parametrize("n,t,o", CASES)
def test_tiles_touching_matches_brute_force(n, t, o):
    ax = AxisGrid(n, fitted_tile(n, t, o), o)
    cover = covering(ax, n)
    for lo in range(n):
        for hi in range(lo + 1, n + 1):
            expected = sorted({k for v in range(lo, hi) for k in cover[v]})
            assert list(ax.tiles_touching(lo, hi)) == expected


def test_weights_3d_sum_to_one_everywhere():
    grid = Grid.build((9, 21, 30), (8, 8, 12), (2, 4, 3), (1, 1, 1))
    total = np.zeros((9, 21, 30))
    for k in itertools.product(*map(range, grid.counts)):
        starts = [ax.start(kk) for ax, kk in zip(grid.axes, k)]
        w = grid.weights(k)
        sl_out, sl_in = [], []
        for s, ax, n in zip(starts, grid.axes, total.shape):
            a, b = max(0, s), min(n, s + ax.tile)
            sl_out.append(slice(a, b))
            sl_in.append(slice(a - s, b - s))
        total[tuple(sl_out)] += w[tuple(sl_in)]
    np.testing.assert_allclose(total, 1.0, atol=1e-12)
    np.testing.assert_allclose(grid.weight_sum((0, 0, 0), (9, 21, 30)), 1.0, atol=1e-12)


def test_weight_is_one_at_true_borders_and_ramps_inside():
    ax = AxisGrid(40, 16, 4)
    assert (ax.weights(0)[:4] == 1).all() and ax.weights(0)[-1] < 0.1
    assert (ax.weights(ax.count - 1)[-4:] == 1).all() and ax.weights(ax.count - 1)[0] < 0.1


def test_reflection_any_pad():
    idx = reflect(np.arange(-7, 10), 3)
    assert idx.min() >= 0 and idx.max() <= 2
    assert list(reflect(np.arange(-3, 6), 3)) == [2, 1, 0, 0, 1, 2, 2, 1, 0]  # half-sample symmetric
    assert set(reflect(np.arange(-5, 5), 1)) == {0}


def test_tile_larger_than_volume_is_clipped_to_an_allowed_size():
    assert fitted_tile(5, 64, 4) == 13
    assert fitted_tile(5, 64, 4, multiple=8) == 16
    assert fitted_tile(100, 64, 4) == 64
    ax = AxisGrid(5, fitted_tile(5, 64, 4, 8), 4)
    assert ax.count == 1


def test_tile_validation_messages():
    with pytest.raises(UserError, match="smaller than twice the overlap"):
        validate_tile("y", 10, 6, 1, "identity")
    with pytest.raises(UserError, match="multiple of 4.*use e.g. 28 or 32"):
        validate_tile("x", 30, 4, 4, "randcnn")
    validate_tile("x", 32, 16, 4, "randcnn")


def test_noise_is_keyed_by_counters_only():
    a = noise.normal((3, 4), 7, 0, -4, 5)
    assert a.dtype == np.float32
    assert np.array_equal(a, noise.normal((3, 4), 7, 0, -4, 5))
    assert not np.array_equal(a, noise.normal((3, 4), 7, 1, -4, 5))
    assert not np.array_equal(a, noise.normal((3, 4), 8, 0, -4, 5))
