"""`volrestore view`: serves the image over HTTP with CORS and prints links that point at it."""

import json
import os
import signal
import subprocess
import sys
import urllib.parse
import urllib.request

import numpy as np

from volrestore.io import ngff


def test_view_serves_zarr_with_cors_and_prints_viewer_links(tmp_path):
    path = tmp_path / "img.ome.zarr"
    ngff.create_image(path, shape=(4, 8, 8), dtype="uint16", axes=["z", "y", "x"], scale=[2.0, 0.5, 0.5],
                      chunks=(4, 8, 8))
    ngff.open_level(path, 0, mode="r+")[...] = np.arange(256, dtype=np.uint16).reshape(4, 8, 8)
    proc = subprocess.Popen([sys.executable, "-m", "volrestore", "view", str(path), "--serve", "--port", "0"],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
        url = lines[0].split()[1]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/img.ome.zarr/")
        with urllib.request.urlopen(url + "zarr.json", timeout=10) as response:
            assert response.headers["Access-Control-Allow-Origin"] == "*"
            meta = json.load(response)
        assert meta["attributes"]["ome"]["version"] == "0.5"
        ng = urllib.parse.unquote(lines[1].split("#!", 1)[1])
        assert json.loads(ng)["layers"][0]["source"] == f"zarr3://{url}"
        assert urllib.parse.unquote(lines[2].split("source=", 1)[1].strip()) == url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def test_view_rejects_a_non_ome_zarr_path(tmp_path):
    result = subprocess.run([sys.executable, "-m", "volrestore", "view", str(tmp_path / "missing.zarr")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
