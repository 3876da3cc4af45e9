"""Look at an image: open it in napari when installed, else serve it over HTTP with CORS and print viewer links."""

from __future__ import annotations

import json
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

from volrestore.io import ngff

NEUROGLANCER = "https://neuroglancer-demo.appspot.com/#!"
VIZARR = "https://hms-dbmi.github.io/vizarr/?source="


class _CORSHandler(SimpleHTTPRequestHandler):
    """Static files with the CORS headers browser viewers need to read zarr chunks from localhost."""

    def end_headers(self):
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "*")
        super().end_headers()

    def do_OPTIONS(self):  # noqa: N802 - http.server naming
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):  # keep the terminal for the links
        pass


def viewer_links(base_url: str, info: ngff.ImageInfo, name: str) -> dict[str, str]:
    """URLs of the served image and of neuroglancer and vizarr views of it."""
    url = f"{base_url}/{quote(name)}/"
    protocol = "zarr3" if info.version == "0.5" else "zarr2"
    state = {"layers": [{"type": "image", "source": f"{protocol}://{url}", "name": name}], "layout": "4panel"}
    return {
        "url": url,
        "neuroglancer": NEUROGLANCER + quote(json.dumps(state, separators=(",", ":")), safe=""),
        "vizarr": VIZARR + quote(url, safe=""),
    }


def serve(path, host="127.0.0.1", port=8000):
    """Serve the image's folder; returns (server, links). The caller runs server.serve_forever() or stops it."""
    info = ngff.read_info(path)  # fail early on something that is not OME-Zarr
    path = Path(path).resolve()
    handler = partial(_CORSHandler, directory=str(path.parent))
    server = ThreadingHTTPServer((host, port), handler)
    base = f"http://{host}:{server.server_address[1]}"
    return server, viewer_links(base, info, path.name)


def open_in_napari(path) -> bool:
    """Open the image in napari (through its OME-Zarr reader plugin); False when napari is not installed."""
    try:
        import napari
    except ImportError:
        return False
    napari.Viewer().open(str(path), plugin="napari-ome-zarr")
    napari.run()
    return True
