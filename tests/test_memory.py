"""Memory of a restorer call, measured on a worker before anything is written: a tile (or, on CPU workers, a batch)
that cannot fit is refused with the largest that does; the CPU meter counts what torch really allocates."""

import os
import platform
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from _io_helpers import assert_user_error, cli
from volrestore import write_image
from volrestore.cluster.client import heap_environ
from volrestore.model import memory
from volrestore.model.diffusion_restorer import DiffusionRestorer, default_model_path


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """One 2048² plane: big enough that a single-tile call of the default model at K = 64 needs hundreds of GiB."""
    path = tmp_path_factory.mktemp("wide") / "in.ome.zarr"
    data = (np.random.default_rng(0).random((1, 2048, 2048)) * 1000).astype(np.uint16)
    write_image(path, data, axes="zyx", chunks=(1, 512, 512))
    return path


def test_a_tile_that_cannot_fit_is_refused_with_the_largest_that_does(session_cluster, wide, tmp_path):
    out = tmp_path / "out.ome.zarr"
    result = cli("restore", wide, out, "--tile", 1, 2048, 2048, "--samples", 64, "--cluster",
                 session_cluster.scheduler.address)
    line = assert_user_error(result, out, contains="the largest that fits")
    assert "tile 1x2048x2048 needs" in line
    z, y, x = map(int, re.search(r"--tile (\d+) (\d+) (\d+)", line).groups())
    assert z == 1 and y == x and 32 <= y < 2048 and y % 16 == 0  # the model's size multiple, >= 2 x overlap


def test_a_batch_that_cannot_fit_on_a_cpu_worker_is_refused_with_one_that_does(session_cluster, wide, tmp_path):
    out = tmp_path / "out.ome.zarr"
    result = cli("restore", wide, out, "--tile", 1, 512, 512, "--samples", 16, "--batch", 200, "--cluster",
                 session_cluster.scheduler.address)
    line = assert_user_error(result, out, contains="--batch 25 needs")  # capped first at the grid's 25 tiles
    assert 1 <= int(re.search(r"use --batch (\d+) or smaller", line).group(1)) < 25


def test_the_cpu_meter_follows_allocations_and_frees():
    with memory.LiveBytes() as meter:
        a = torch.ones(1_000_000)  # 4 MB
        b = a * 2  # 8 MB alive
        del b
        c = a * 3  # 8 MB again, not 12: b's storage was freed
        a.mul_(2)  # in place: nothing new
        view = c[:10]  # a view: nothing new
    assert meter.peak == 8_000_000
    assert view.shape == (10,)


def test_network_memory_is_linear_in_voxels_so_two_probes_predict_a_big_tile():
    restorer = DiffusionRestorer(default_model_path(), normalise="model")
    small, half, full = (restorer.forward_bytes((s, s)) for s in (64, 128, 256))
    slope = (half - small) / (128**2 - 64**2)
    predicted = half + slope * (256**2 - 128**2)
    assert abs(predicted - full) < 0.02 * full, (small, half, full)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
@pytest.mark.slow
def test_cpu_workers_reuse_freed_memory_instead_of_faulting_it_in_again(monkeypatch):
    """A CPU worker (pin_torch_threads) keeps the big blocks torch frees, so the next call's tensors do not fault their
    pages in again (VOLRESTORE_KEEP_FREED_MEMORY=0 turns it off); in a thread, as Dask runs tasks, that also needs
    the one malloc arena that heap_environ gives worker processes. Page faults over 20 tensors of 64 MB (16384 pages
    each)."""
    code = ("import resource, sys, threading, torch\n"
            "from volrestore.cluster.client import freed_memory_kept, pin_torch_threads\n"
            "def work():\n"
            "    pin_torch_threads()\n"
            "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "    for _ in range(20):\n"
            "        t = torch.ones(16 * 2**20); del t\n"
            "    print(freed_memory_kept(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
            "if sys.argv[1] == 'main':\n"
            "    work()\n"
            "else:\n"
            "    thread = threading.Thread(target=work); thread.start(); thread.join()\n")
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)  # (a nanny started here earlier may have exported ours)

    def faults(where, keep, arena):
        env = {**os.environ, "VOLRESTORE_KEEP_FREED_MEMORY": keep, **(heap_environ() if arena else {})}
        out = subprocess.run([sys.executable, "-c", code, where], capture_output=True, text=True, check=True,
                             env=env).stdout.split()
        assert out[0] == str(keep == "1")  # whether mallopt took effect
        return int(out[1])

    default, kept = faults("main", "0", False), faults("main", "1", False)
    assert default > 20 * 16384 * 0.9 and kept < default / 5, (default, kept)
    one_arena, own_arena = faults("thread", "1", True), faults("thread", "1", False)
    assert own_arena > 20 * 16384 * 0.9 and one_arena < own_arena / 2, (own_arena, one_arena)
