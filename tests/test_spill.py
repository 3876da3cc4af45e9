"""Tiles computed once per plan (blockwise.spill): owners, wave order, the runner's `after`, and restores whose tiles
are each computed once yet equal, bitwise, a single-block run and a run that recomputes every straddling tile."""

import os
import threading
import time

import numpy as np
import pytest

from volrestore import write_image
from volrestore.blockwise import plan as planning
from volrestore.blockwise import spill
from volrestore.blockwise.restore import restore
from volrestore.blockwise.runner import run_blockwise
from volrestore.io import ngff

KW = dict(model="randcnn", tile=[16, 16, 16], overlap=4, progress=False)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    data = np.random.default_rng(3).random((20, 40, 36), dtype=np.float32) * 100
    path = tmp_path_factory.mktemp("spill") / "in.ome.zarr"
    write_image(path, data, axes="zyx", chunks=(4, 8, 8), n_levels=1)
    return str(path)


def read(path):
    return ngff.open_level(str(path), 0)[...]


def test_every_tile_has_one_owner_and_owners_come_in_earlier_waves(image):
    plan, _ = planning.plan(image, block=[8, 16, 16], **{k: v for k, v in KW.items() if k != "progress"})
    owners = {}
    for index in spill.wave_order(plan):
        for tile in np.ndindex(*plan.grid.counts):
            if spill.owns(plan, index, tile):
                assert tile not in owners
                owners[tile] = index
    assert len(owners) == plan.grid.n_tiles
    order = {index: n for n, index in enumerate(spill.wave_order(plan))}
    assert sorted(order) == sorted(np.ndindex(*(-(-s // b) for s, b in zip(plan.shape, plan.block))))
    for tile, owner in owners.items():
        for consumer in spill.consumers(plan, owner, tile):
            assert order[consumer] > order[owner] and owner in spill.prerequisites(plan, consumer)


def test_the_runner_starts_a_block_only_after_what_it_comes_after_has_ended():
    grid = [(i, j) for s in range(7) for i in range(4) for j in range(4) if i + j == s]  # wave order of 4 x 4
    before = {b: [(b[0] - 1, b[1]), (b[0], b[1] - 1), (b[0] - 1, b[1] - 1)] for b in grid}
    before = {b: [p for p in ps if min(p) >= 0] for b, ps in before.items()}
    times, lock = {}, threading.Lock()

    def task(block):
        start = time.perf_counter()
        time.sleep(0.01 * (1 + (block[0] * 7 + block[1]) % 3))
        with lock:
            times[block] = (start, time.perf_counter())
        return 0

    assert run_blockwise(None, task, iter(grid), progress=False, window=8, after=lambda b: before[b]) == 16
    for block, prereqs in before.items():
        for p in prereqs:
            assert times[p][1] <= times[block][0], (p, block)


def test_a_held_block_does_not_stall_the_ready_blocks_behind_it():
    times, lock = {}, threading.Lock()

    def task(block):
        start = time.perf_counter()
        time.sleep(0.4 if block == "a" else 0.01)
        with lock:
            times[block] = (start, time.perf_counter())
        return 0

    after = {"a": [], "b": ["a"], "c": [], "d": []}
    assert run_blockwise(None, task, iter("abcd"), progress=False, window=4, after=lambda b: after[b]) == 4
    assert times["b"][0] >= times["a"][1]  # b waited for a
    assert times["c"][1] < times["a"][1] and times["d"][1] < times["a"][1]  # c and d did not wait behind b


def test_each_tile_is_computed_once_and_the_output_equals_one_block_bitwise(image, tmp_path):
    one = restore(image, tmp_path / "one.ome.zarr", cluster=None, block=[20, 40, 36], chunks=[20, 40, 36], **KW)
    many = restore(image, tmp_path / "many.ome.zarr", cluster=None, block=[8, 16, 16], chunks=[4, 8, 8], **KW)
    plan, _ = planning.plan(image, block=[8, 16, 16], **{k: v for k, v in KW.items() if k != "progress"})
    assert many["blocks"] == 27 and many["tiles"] == one["tiles"] == plan.grid.n_tiles
    assert many["tile_recompute_factor"] == 1.0
    a, b = read(tmp_path / "one.ome.zarr"), read(tmp_path / "many.ome.zarr")
    assert a.tobytes() == b.tobytes() and not np.allclose(a, read(image))
    assert not os.path.exists(tmp_path / "many.ome.zarr" / spill.SPILL_DIR)  # removed with the progress records


def test_a_part_that_was_not_sent_is_computed_by_the_block_that_needs_it(image, tmp_path, monkeypatch):
    ref = restore(image, tmp_path / "ref.ome.zarr", cluster=None, block=[8, 16, 16], **KW)
    sent = []
    real = spill.send

    def lossy(plan, index, spills):  # every other owner's parts never arrive (a crash, an empty block, a late owner)
        sent.append(index)
        if len(sent) % 2:
            real(plan, index, spills)

    monkeypatch.setattr(spill, "send", lossy)
    got = restore(image, tmp_path / "lossy.ome.zarr", cluster=None, block=[8, 16, 16], **KW)
    monkeypatch.setattr(spill, "send", lambda *args: None)
    none = restore(image, tmp_path / "none.ome.zarr", cluster=None, block=[8, 16, 16], **KW)
    plan, _ = planning.plan(image, block=[8, 16, 16], **{k: v for k, v in KW.items() if k != "progress"})
    every_touching = sum(int(np.prod([len(r) for r in plan.grid.tiles_touching(
        [i * b for i, b in zip(index, plan.block)],
        [min((i + 1) * b, n) for i, b, n in zip(index, plan.block, plan.shape)])])) for index in spill.wave_order(plan))
    assert ref["tiles"] == plan.grid.n_tiles < got["tiles"] < none["tiles"] == every_touching
    for name in ("lossy", "none"):
        assert read(tmp_path / f"{name}.ome.zarr").tobytes() == read(tmp_path / "ref.ome.zarr").tobytes()


def test_a_slice_wise_model_links_only_the_lateral_axes(image):
    """2D tiles never cross a z block border, so z blocks share waves (parallel) and wait for nothing along z."""
    plan, _ = planning.plan(image, model="randcnn:dims=2", tile=[16, 16], overlap=4, block=[8, 16, 16])
    assert spill.linked_axes(plan) == [1, 2]
    assert spill.prerequisites(plan, (2, 0, 0)) == [] and spill.prerequisites(plan, (2, 1, 1)) == [
        (2, 0, 0), (2, 0, 1), (2, 1, 0)]
    assert [i for i in spill.wave_order(plan)][:3] == [(0, 0, 0), (1, 0, 0), (2, 0, 0)]


@pytest.mark.parametrize("model, tile", [("randcnn", [8, 16, 16]), ("randcnn:dims=2", [16, 16])])
def test_time_points_and_slice_wise_models_pass_parts_per_time_point(tmp_path, model, tile):
    data = np.random.default_rng(5).random((3, 12, 40, 36), dtype=np.float32)
    src = tmp_path / "t.ome.zarr"
    write_image(src, data, axes="tzyx", chunks=(1, 4, 8, 8), n_levels=1)
    kw = dict(model=model, tile=tile, overlap=4, progress=False, cluster=None)
    one = restore(src, tmp_path / "one.ome.zarr", block=[12, 40, 36], chunks=[12, 40, 36], **kw)
    many = restore(src, tmp_path / "many.ome.zarr", block=[4, 16, 16], chunks=[4, 8, 8], **kw)
    assert many["blocks"] == 3 * 3 * 3 * 3 and many["tiles"] == one["tiles"]
    assert read(tmp_path / "one.ome.zarr").tobytes() == read(tmp_path / "many.ome.zarr").tobytes()
