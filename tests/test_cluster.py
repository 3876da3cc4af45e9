"""--cluster specs: errors for cuda without a GPU or without dask-cuda, unknown specs, unreachable schedulers, jobqueue YAML."""

import sys

import numpy as np
import pytest

from volrestore.cluster import client as cluster_client
from volrestore.io import ngff
from _io_helpers import assert_user_error, cli


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in.ome.zarr"
    ngff.create_image(path, shape=(8, 16, 16), dtype="float32", axes=list("zyx"), scale=[1, 1, 1], chunks=(8, 16, 16))
    ngff.open_level(path, 0, mode="r+")[...] = np.ones((8, 16, 16), np.float32)
    return path


def test_cuda_without_a_visible_gpu_suggests_local(image, tmp_path, monkeypatch):
    monkeypatch.setattr(cluster_client, "visible_gpus", lambda: 0)
    result = cli("restore", image, tmp_path / "out.ome.zarr", "--model", "identity", "--cluster", "cuda")
    assert_user_error(result, contains="no GPU is visible")
    assert "--cluster local" in result.stderr
    assert not (tmp_path / "out.ome.zarr").exists()


def test_cuda_without_the_gpu_extra_names_the_install_command(image, tmp_path, monkeypatch):
    monkeypatch.setattr(cluster_client, "visible_gpus", lambda: 2)
    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # import fails as when the extra is not installed
    result = cli("restore", image, tmp_path / "out.ome.zarr", "--model", "identity", "--cluster", "cuda")
    assert_user_error(result, contains="pip install 'volrestore[gpu]'")


def test_unknown_cluster_spec_and_bad_jobqueue_file(image, tmp_path):
    assert_user_error(cli("restore", image, tmp_path / "o.ome.zarr", "--model", "identity", "--cluster", "kubernetes"), contains="unknown --cluster")
    bad = tmp_path / "c.yaml"
    bad.write_text("scheduler: condor\ncores: 1\nmemory: 1GB\nwalltime: '00:10:00'\n")
    assert_user_error(cli("restore", image, tmp_path / "o.ome.zarr", "--model", "identity", "--cluster", bad), contains="unknown scheduler type")
    assert not (tmp_path / "o.ome.zarr").exists()


def test_unreachable_scheduler_times_out_with_a_clear_message(image, tmp_path, monkeypatch):
    monkeypatch.setattr(cluster_client, "CONNECT_TIMEOUT_S", 2)
    result = cli("restore", image, tmp_path / "o.ome.zarr", "--model", "identity", "--cluster", "tcp://127.0.0.1:9")
    assert_user_error(result, contains="cannot reach the Dask scheduler at tcp://127.0.0.1:9")
    assert not (tmp_path / "o.ome.zarr").exists()


def test_local_clusters_get_one_thread_per_worker_and_bounded_failures(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)  # (a nanny started here earlier may have exported ours)
    config = cluster_client._worker_config(1)
    assert config["distributed.nanny.pre-spawn-environ"]["OMP_NUM_THREADS"] == "1"
    assert config["distributed.scheduler.allowed-failures"] == cluster_client.ALLOWED_FAILURES
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a user's own setting wins
    assert cluster_client._worker_config(1)["distributed.nanny.pre-spawn-environ"]["OMP_NUM_THREADS"] == "3"
    assert config["distributed.nanny.pre-spawn-environ"]["MALLOC_ARENA_MAX"] == "1"  # one malloc arena
    monkeypatch.setenv("VOLRESTORE_KEEP_FREED_MEMORY", "0")
    assert "MALLOC_ARENA_MAX" not in cluster_client._worker_config(1)["distributed.nanny.pre-spawn-environ"]
