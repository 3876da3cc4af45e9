"""Browser test: a restored sharded NGFF 0.5 output served by `volrestore view --serve` renders in neuroglancer.

Neuroglancer's own client (shipped by the `neuroglancer` pip package, served by its Python server) runs in headless
Chromium with SwiftShader WebGL; the layer source and the view are those of the link `view --serve` prints. The
screenshot must show the data, x horizontal and y vertical, with the bright block where it is in the volume.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest

from volrestore.io import ngff
from volrestore.io.images import write_image

MAGENTA = (255, 0, 255)  # the panel background, so every grey pixel is data
NX, NY, NZ = 256, 192, 8
BLOCK = (slice(16, 64), slice(16, 80))  # a bright block (y, x) in the top-left of the x-y plane


def _browser() -> tuple[str, str]:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            driver = shutil.which("chromedriver")
            if driver is None:
                pytest.skip("chromedriver is not installed (apt-get install chromium-driver)")
            return shutil.which(name), driver
    pytest.skip("Chromium is not installed (apt-get install chromium chromium-driver)")


def _volume() -> np.ndarray:
    z, y, x = np.mgrid[0:NZ, 0:NY, 0:NX]
    a = (1000 + 600 * np.sin(x / 9.0) * np.cos(y / 13.0)).astype(np.uint16)
    a[(slice(None), *BLOCK)] = 4000
    return np.stack([a, a // 2])


def _restored(tmp_path) -> Path:
    src, out = tmp_path / "in.ome.zarr", tmp_path / "restored.ome.zarr"
    write_image(src, _volume(), axes="czyx", chunks=(1, NZ, 64, 64), shards=(1, NZ, 128, 128), n_levels=2,
                channel_names=["a", "b"])
    result = subprocess.run([sys.executable, "-m", "volrestore", "restore", str(src), str(out), "--model",
                             "gaussian:sigma=0.5", "--dtype", "input", "--workers", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    info = ngff.read_info(out)
    assert info.version == "0.5" and len(info.levels) == 2 and info.levels[0].shards is not None and info.complete
    return out


def _served_state(path) -> tuple[subprocess.Popen, dict]:
    """Start `volrestore view --serve` and return it with the neuroglancer state of the link it prints."""
    proc = subprocess.Popen([sys.executable, "-m", "volrestore", "view", str(path), "--serve", "--port", "0"],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    lines = [proc.stdout.readline() for _ in range(2)]
    assert lines[1].startswith("neuroglancer: "), lines
    return proc, json.loads(urllib.parse.unquote(lines[1].split("#!", 1)[1]))


def _data_box(png: bytes):
    """(bounding box (top, bottom, left, right), grey values) of the data in the main panel, or None if empty."""
    from PIL import Image

    rgb = np.asarray(Image.open(BytesIO(png)).convert("RGB")).astype(int)
    panel = np.all(rgb == MAGENTA, axis=-1)
    if panel.sum() < 1000:
        return None
    rows, cols = np.flatnonzero(panel.any(axis=1)), np.flatnonzero(panel.any(axis=0))
    inside = rgb[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    grey = (inside[..., 0] == inside[..., 1]) & (inside[..., 1] == inside[..., 2])
    # the data is a rectangle of grey pixels: rows and columns with many of them (overlays are small)
    r, c = grey.sum(axis=1), grey.sum(axis=0)
    if r.max() < 50 or c.max() < 50:
        return None
    rr, cc = np.flatnonzero(r > r.max() / 2), np.flatnonzero(c > c.max() / 2)
    box = (rr[0], rr[-1] + 1, cc[0], cc[-1] + 1)
    return box, inside[box[0]:box[1], box[2]:box[3], 0]


def _screenshot(driver, until: float):
    """Screenshots until the panel shows structured data that stopped changing (all chunks drawn), or time is up."""
    previous = None
    while True:
        png = driver.get_screenshot_as_png()
        found = _data_box(png)
        if (found is not None and found[1].std() > 20 and png == previous) or time.monotonic() > until:
            return png, found
        previous = png
        time.sleep(0.5)


@pytest.mark.slow
def test_neuroglancer_renders_the_served_sharded_output_x_horizontal(tmp_path):
    chromium, chromedriver = _browser()
    import neuroglancer
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    start = time.monotonic()
    shot = Path(os.environ.get("VOLRESTORE_SCREENSHOT_DIR", tmp_path)) / "neuroglancer.png"
    out = _restored(tmp_path)
    windows = [c["window"] for c in json.loads((out / "zarr.json").read_text())["attributes"]["ome"]["omero"]["channels"]]
    assert all(0 < w["start"] < w["end"] <= 4000 for w in windows), windows  # data percentiles, not 0..65535
    proc, state = _served_state(out)
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--use-gl=angle",
                "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--window-size=1000,700"):
        options.add_argument(arg)
    driver = None
    try:
        assert state["layout"] == "xy" and state["displayDimensions"] == ["x", "y", "z"]
        # only the look changes for the test: a background no data pixel has, no overlays over the data
        state.update(crossSectionBackgroundColor="#ff00ff", showAxisLines=False, showScaleBar=False,
                     showDefaultAnnotations=False)
        neuroglancer.set_server_bind_address("127.0.0.1")
        viewer = neuroglancer.Viewer()
        viewer.set_state(neuroglancer.ViewerState(state))
        driver = webdriver.Chrome(options=options, service=Service(chromedriver))
        driver.get(viewer.get_viewer_url())
        png, found = _screenshot(driver, until=time.monotonic() + 30)
        shot.parent.mkdir(parents=True, exist_ok=True)
        shot.write_bytes(png)
    finally:
        if driver is not None:
            driver.quit()
        neuroglancer.stop()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    assert found is not None, f"no data in the main panel (see {shot})"
    (top, bottom, left, right), grey = found
    assert grey.std() > 20, f"the data region is flat (see {shot})"
    assert abs((right - left) / (bottom - top) - NX / NY) < 0.1, f"not the x-y plane, x horizontal (see {shot})"
    h, w = grey.shape
    block = grey[int(h * 20 / NY):int(h * 60 / NY), int(w * 20 / NX):int(w * 76 / NX)]
    rest = grey[int(h * 0.5):, int(w * 0.5):]
    assert block.mean() > rest.mean() + 40 and block.std() < 20, f"bright block not top-left (see {shot})"
    assert block.mean() > 200, f"the contrast is not the data's omero window (see {shot})"  # the block is its end
    assert time.monotonic() - start < 60
