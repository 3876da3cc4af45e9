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


# ----------------------------------------------------------------------------------------------- the range server


import http.client
import threading

import pytest

from volrestore.io.images import write_image
from volrestore.io.pyramid import display_windows
from volrestore.io.view import StaticServer, UnsatisfiableRange, byte_range, neuroglancer_state, serve

PAYLOAD = bytes(range(256)) * 8  # 2048 bytes, each byte's value tells its offset mod 256


@pytest.fixture
def served(tmp_path):
    """A sharded 2-level NGFF 0.5 image beside a secret file, served by view.serve on a free port: (base, path)."""
    path = tmp_path / "img.ome.zarr"
    data = np.arange(2 * 8 * 32 * 32, dtype=np.uint16).reshape(2, 8, 32, 32)
    write_image(path, data, axes="czyx", chunks=(1, 4, 8, 8), shards=(1, 8, 16, 16), n_levels=2,
                channel_names=["a", "b"])
    (path / "blob.bin").write_bytes(PAYLOAD)
    (path / "empty.bin").write_bytes(b"")
    (tmp_path / "secret.txt").write_text("not to be served")
    server, links = serve(path, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, links["url"], path
    finally:
        server.shutdown()
        server.server_close()


def _request(server, method, target, headers=None):
    """(status, headers, body) of one raw request: http.client sends the path as given (no ../ folding)."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    try:
        conn.request(method, target, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def test_full_get_has_length_ranges_and_cors_headers(served):
    server, url, _ = served
    status, headers, body = _request(server, "GET", "/img.ome.zarr/blob.bin")
    assert status == 200 and body == PAYLOAD and headers["Content-Length"] == str(len(PAYLOAD))
    assert headers["Accept-Ranges"] == "bytes" and headers["Access-Control-Allow-Origin"] == "*"
    exposed = {h.strip().lower() for h in headers["Access-Control-Expose-Headers"].split(",")}
    assert {"content-range", "content-length", "accept-ranges"} <= exposed
    status, headers, body = _request(server, "GET", "/img.ome.zarr/zarr.json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body)["attributes"]["ome"]["version"] == "0.5"


@pytest.mark.parametrize("spec, first, last", [
    ("bytes=10-19", 10, 19), ("bytes=0-0", 0, 0), ("bytes=2000-9999", 2000, 2047),  # end clipped to the file
    ("bytes=1000-", 1000, 2047), ("bytes=-16", 2032, 2047), ("bytes=-5000", 0, 2047),  # open-ended, suffix
    ("BYTES = 5 - 6", 5, 6),
])
def test_range_requests_answer_206_with_content_range(served, spec, first, last):
    server, _, _ = served
    status, headers, body = _request(server, "GET", "/img.ome.zarr/blob.bin", {"Range": spec})
    assert status == 206 and body == PAYLOAD[first:last + 1]
    assert headers["Content-Range"] == f"bytes {first}-{last}/{len(PAYLOAD)}"
    assert headers["Content-Length"] == str(last - first + 1)


@pytest.mark.parametrize("target, spec", [("blob.bin", "bytes=2048-"), ("blob.bin", "bytes=5000-6000"),
                                          ("blob.bin", "bytes=-0"), ("empty.bin", "bytes=0-"),
                                          ("empty.bin", "bytes=-3")])
def test_unsatisfiable_ranges_answer_416(served, target, spec):
    server, _, path = served
    status, headers, _ = _request(server, "GET", f"/img.ome.zarr/{target}", {"Range": spec})
    assert status == 416 and headers["Content-Range"] == f"bytes */{(path / target).stat().st_size}"


@pytest.mark.parametrize("spec", ["bytes=5-2", "bytes=-", "items=0-3", "bytes=0-1,4-5", "bytes=x-3", "bytes=²-3"])
def test_malformed_or_multi_ranges_are_ignored_whole_file(served, spec):
    server, _, _ = served
    status, _, body = _request(server, "GET", "/img.ome.zarr/blob.bin", {"Range": spec})
    assert status == 200 and body == PAYLOAD


def test_byte_range_parser():
    assert byte_range(None, 10) is None and byte_range("bytes=3-", 10) == (3, 9)
    assert byte_range("bytes=-3", 10) == (7, 9) and byte_range("bytes=0-100", 10) == (0, 9)
    with pytest.raises(UnsatisfiableRange):
        byte_range("bytes=10-", 10)


def test_head_gives_the_get_headers_without_a_body(served):
    server, _, _ = served
    status, headers, body = _request(server, "HEAD", "/img.ome.zarr/blob.bin")
    assert status == 200 and body == b"" and headers["Content-Length"] == str(len(PAYLOAD))
    status, headers, body = _request(server, "HEAD", "/img.ome.zarr/blob.bin", {"Range": "bytes=-10"})
    assert status == 206 and body == b"" and headers["Content-Range"] == "bytes 2038-2047/2048"


def test_if_range_and_if_none_match(served):
    server, _, _ = served
    _, headers, _ = _request(server, "HEAD", "/img.ome.zarr/blob.bin")
    etag = headers["ETag"]
    assert _request(server, "GET", "/img.ome.zarr/blob.bin", {"Range": "bytes=0-3", "If-Range": etag})[0] == 206
    status, _, body = _request(server, "GET", "/img.ome.zarr/blob.bin", {"Range": "bytes=0-3", "If-Range": '"old"'})
    assert status == 200 and body == PAYLOAD  # changed since the client's copy: whole file
    assert _request(server, "GET", "/img.ome.zarr/blob.bin", {"If-None-Match": etag})[0] == 304


def test_cors_preflight_allows_range(served):
    server, _, _ = served
    status, headers, body = _request(server, "OPTIONS", "/img.ome.zarr/0/zarr.json", {
        "Origin": "http://viewer.example", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "range"})
    assert status == 204 and body == b"" and headers["Access-Control-Allow-Origin"] == "*"
    assert "range" in headers["Access-Control-Allow-Headers"].lower()
    assert {"GET", "HEAD"} <= {m.strip() for m in headers["Access-Control-Allow-Methods"].split(",")}


@pytest.mark.parametrize("target", ["/img.ome.zarr/../secret.txt", "/img.ome.zarr/%2e%2e/secret.txt",
                                    "/img.ome.zarr/0/../../secret.txt", "/img.ome.zarr/..%2fsecret.txt",
                                    "/img.ome.zarr/..%5csecret.txt", "/img.ome.zarr/%00"])
def test_path_traversal_is_refused(served, target):
    server, _, _ = served
    status, _, body = _request(server, "GET", target)
    assert status in (403, 404) and b"not to be served" not in body


def test_a_symlink_out_of_the_image_is_refused(served):
    server, _, path = served
    (path / "link.txt").symlink_to(path.parent / "secret.txt")
    status, _, body = _request(server, "GET", "/img.ome.zarr/link.txt")
    assert status == 403 and b"not to be served" not in body


@pytest.mark.parametrize("target", ["/secret.txt", "/", "/img.ome.zarr/", "/img.ome.zarr/0", "/img.ome.zarr",
                                    "/other/zarr.json"])
def test_only_the_image_folder_files_are_served(served, target):
    server, _, _ = served
    status, _, body = _request(server, "GET", target)
    assert status == 404 and b"not to be served" not in body and b"zarr.json" not in body  # no listings


def test_zarr_reads_the_sharded_levels_over_http(served):
    pytest.importorskip("aiohttp")
    pytest.importorskip("fsspec")
    import zarr

    _, url, path = served
    for level in ("0", "1"):
        remote = zarr.open_array(url + level, mode="r")
        assert remote.shards is not None
        np.testing.assert_array_equal(remote[...], zarr.open_array(str(path / level), mode="r")[...])
        np.testing.assert_array_equal(remote[1, 2:5, 3:20, 7:9], ngff.open_level(path, int(level))[1, 2:5, 3:20, 7:9])


def test_a_second_mount_serves_its_own_folder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f.txt").write_text("A")
    server = StaticServer({"client": tmp_path / "a"})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert _request(server, "GET", "/client/f.txt")[2] == b"A"
        assert _request(server, "GET", "/a/f.txt")[0] == 404
    finally:
        server.shutdown()
        server.server_close()


def test_neuroglancer_link_shows_x_y_in_the_main_panel_with_the_data_window(served):
    _, url, path = served
    info = ngff.read_info(path)
    state = neuroglancer_state(url, info, "img.ome.zarr", (3.0, 40.0))
    assert state["layout"] == "xy" and state["displayDimensions"] == ["x", "y", "z"]
    assert list(state["dimensions"]) == ["x", "y", "z"]
    layer = state["layers"][0]
    assert layer["source"] == f"zarr3://{url}" and layer["shaderControls"]["normalized"]["range"] == [3.0, 40.0]
    um = ngff.read_info(write_image(path.parent / "um.ome.zarr", np.zeros((2, 4, 4), np.uint8),
                                    axes=[{"name": "z", "unit": "micrometer"}, {"name": "y", "unit": "micrometer"},
                                          {"name": "x", "unit": "micrometer"}], scale=[2.0, 0.5, 0.5]).path)
    dims = neuroglancer_state("u", um, "um")["dimensions"]
    assert dims["x"] == [pytest.approx(0.5e-6), "m"] and dims["z"] == [pytest.approx(2e-6), "m"]


# ----------------------------------------------------------------------------------------------- omero windows


def _windows(path):
    return [c["window"] for c in json.loads((path / "zarr.json").read_text())["attributes"]["ome"]["omero"]["channels"]]


def test_omero_windows_come_from_the_data_percentiles_per_channel(tmp_path):
    rng = np.random.default_rng(0)
    data = np.stack([rng.integers(100, 900, (8, 64, 64)), rng.integers(20000, 30000, (8, 64, 64))]).astype(np.uint16)
    path = tmp_path / "two.ome.zarr"
    write_image(path, data, axes="czyx", chunks=(1, 8, 32, 32), shards=(1, 8, 64, 64), n_levels=2,
                channel_names=["a", "b"])
    windows = _windows(path)
    for w, channel in zip(windows, data):
        assert channel.min() <= w["start"] < w["end"] <= channel.max()
        assert (w["start"], w["end"]) != (0.0, 65535.0) and (w["min"], w["max"]) == (0.0, 65535.0)
    assert windows[0]["end"] < windows[1]["start"]  # each channel its own window
    small = display_windows(path, level=0, max_voxels=1024)  # a bounded sample: whole chunks spread over the level
    for w, channel in zip(small, data):
        assert channel.min() <= w["start"] < w["end"] <= channel.max()


def test_float_windows_set_min_max_to_the_data_and_a_constant_channel_gets_a_window(tmp_path):
    data = np.stack([np.linspace(-2, 3, 4 * 16 * 16, dtype=np.float32).reshape(4, 16, 16),
                     np.full((4, 16, 16), 7, np.float32)])
    data[0, 0, 0, 0] = np.nan
    path = tmp_path / "float.ome.zarr"
    write_image(path, data, axes="czyx", n_levels=2, channel_names=["a", "b"])
    first, const = _windows(path)
    assert -2 <= first["min"] <= first["start"] < first["end"] <= first["max"] <= 3
    assert const["start"] == 7 and const["end"] > const["start"]
