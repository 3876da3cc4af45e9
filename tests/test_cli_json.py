"""`--json` summaries of restore, convert, degrade and train through the CLI on real files: stdout is exactly one
JSON object, human messages and progress bars (forced with VOLRESTORE_PROGRESS=1) go to stderr; no dead dashboard
link without bokeh."""

import importlib.machinery
import json
import sys
import types

import numpy as np
import pytest
import tifffile
from _io_helpers import cli

from volrestore import write_image
from volrestore.cluster import client as cluster_client
from volrestore.io import ngff
from volrestore.simulate import synthetic

BAR = "━"  # rich's bar glyph: a frame of any progress bar contains it


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("json")
    clean = (synthetic.phantom((4, 48, 48), seed=1) * 1000).astype("uint16")
    write_image(d / "clean.ome.zarr", clean, axes="zyx", chunks=(2, 16, 16))
    small = np.random.default_rng(0).random((16, 32, 32)).astype(np.float32)
    write_image(d / "small.ome.zarr", small, axes="zyx", chunks=(8, 16, 16))
    tifffile.imwrite(d / "stack.tif", (small * 1000).astype("uint16"))
    return d


@pytest.fixture(autouse=True)
def forced_progress(monkeypatch):
    """Bars drawn even though the test's stderr is no terminal: they must never reach stdout."""
    monkeypatch.setenv("VOLRESTORE_PROGRESS", "1")


def one_json_object(result) -> dict:
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert BAR not in result.stdout and "Dask dashboard" not in result.stdout
    summary = json.loads(result.stdout)  # the whole of stdout: one object, nothing else
    assert isinstance(summary, dict) and result.stdout.strip().count("\n") == 0
    assert summary["total_seconds"] >= 0 and summary["seconds"] >= 0
    return summary


def test_restore_json(data, session_cluster, tmp_path):
    out = tmp_path / "r.ome.zarr"
    result = cli("restore", data / "small.ome.zarr", out, "--model", "gaussian:sigma=1", "--cluster",
                 session_cluster.scheduler.address, "--json")
    summary = one_json_object(result)
    assert summary["command"] == "restore" and summary["output"] == str(out)
    assert summary["input"] == str(data / "small.ome.zarr")
    assert summary["blocks"] == summary["restored"] >= 1 and summary["skipped"] == 0
    assert "restored" in result.stderr and BAR in result.stderr  # the human line and the bar went to stderr
    assert ngff.read_info(out).complete is True


def test_restore_without_json_keeps_bars_off_stdout(data, session_cluster, tmp_path):
    result = cli("restore", data / "small.ome.zarr", tmp_path / "r.ome.zarr", "--model", "identity", "--cluster",
                 session_cluster.scheduler.address)
    assert result.exit_code == 0, result.stderr
    assert BAR not in result.stdout and BAR in result.stderr
    assert "restored" in result.stdout  # without --json the summary line is for people, on stdout


def test_convert_json(data, tmp_path):
    out = tmp_path / "c.ome.zarr"
    summary = one_json_object(cli("convert", data / "stack.tif", out, "--chunks", 8, 16, 16, "--json"))
    assert summary["command"] == "convert" and summary["output"] == str(out)
    assert summary["shape"] == [16, 32, 32] and summary["dtype"] == "uint16" and summary["levels"] >= 1
    assert summary["image"]["levels"][0]["shape"] == [16, 32, 32]


def test_degrade_json(data, session_cluster, tmp_path):
    out = tmp_path / "d.ome.zarr"
    result = cli("degrade", data / "small.ome.zarr", out, "--spec", "poisson:photons=10,seed=1", "--cluster",
                 session_cluster.scheduler.address, "--json")
    summary = one_json_object(result)
    assert summary["command"] == "degrade" and summary["output"] == str(out) and summary["blocks"] >= 1
    assert summary["reference_intensity"] > 0 and "wrote" in result.stderr


def test_train_json(data, session_cluster, tmp_path):
    out = tmp_path / "m.pt"
    result = cli("train", "--target", data / "clean.ome.zarr", "--degrade", "poisson:photons=10,read=1,seed=1",
                 "--preset", "tiny-2d", "--patch", 1, 16, 16, "--batch", 2, "--val-fraction", 0.34, "--workers", 1,
                 "--iterations", 2, "--out", out, "--cluster", session_cluster.scheduler.address, "--json")
    summary = one_json_object(result)
    assert summary["command"] == "train" and summary["output"] == str(out) and summary["iteration"] == 2
    assert summary["preset"] == "tiny-2d" and out.is_file()
    assert "trained 2 iterations" in result.stderr and BAR in result.stderr  # the bar, forced, on stderr


def test_errors_with_json_leave_stdout_empty(data, tmp_path):
    result = cli("restore", data / "nope.ome.zarr", tmp_path / "o.ome.zarr", "--model", "identity", "--json")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_no_dashboard_link_without_bokeh_and_a_link_with_it(monkeypatch):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as lc, Client(lc) as client:
        assert "dashboard" in client.scheduler_info()["services"]  # distributed serves it even without bokeh
        monkeypatch.setitem(sys.modules, "bokeh", None)  # as when bokeh is not installed: the pages would be dead
        assert cluster_client.dashboard_link(client) is None
        fake = types.ModuleType("bokeh")
        fake.__spec__ = importlib.machinery.ModuleSpec("bokeh", None)
        monkeypatch.setitem(sys.modules, "bokeh", fake)
        assert cluster_client.dashboard_link(client) == client.dashboard_link
