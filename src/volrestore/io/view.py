"""Look at an image: open it in napari when installed, else serve it over HTTP (ranges, CORS) and print viewer links.

The server is a small static file server on http.server: it serves only the folders it is given, each under its
own name (`/<name>/...`), answers HTTP Range requests (sharded zarr v3 reads shard indexes and chunks by range),
HEAD and CORS preflights, and refuses paths that leave a served folder. Directory listings are never given.
"""

from __future__ import annotations

import json
import os
import re
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import zarr

from volrestore.io import ngff

NEUROGLANCER = "https://neuroglancer-demo.appspot.com/#!"
VIZARR = "https://hms-dbmi.github.io/vizarr/?source="
CONTENT_TYPES = {
    ".json": "application/json", ".zarray": "application/json", ".zattrs": "application/json",
    ".zgroup": "application/json", ".zmetadata": "application/json", ".map": "application/json",
    ".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css", ".wasm": "application/wasm",
    ".txt": "text/plain; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
}
EXPOSED_HEADERS = "Content-Range, Content-Length, Accept-Ranges, Content-Type, ETag, Last-Modified"
_RANGE = re.compile(r"\s*bytes\s*=\s*([0-9]*)\s*-\s*([0-9]*)\s*", re.IGNORECASE)
_COPY_BLOCK = 1 << 20
_SI = {"angstrom": 1e-10, "nanometer": 1e-9, "micrometer": 1e-6, "millimeter": 1e-3, "centimeter": 1e-2,
       "meter": 1.0, "kilometer": 1e3}


class UnsatisfiableRange(ValueError):
    """A Range request none of whose bytes exist in the file (answered with 416)."""


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The (first, last) byte, inclusive, that a Range header asks of a `size`-byte file; None: send it whole.

    Handles `bytes=a-b` (b clipped to the end), `bytes=a-` and the suffix `bytes=-n` (the last n bytes). A missing,
    malformed or multi-range header gives None (RFC 9110 lets a server ignore Range and send the whole file); a
    range starting at or past the end, or an empty suffix, raises UnsatisfiableRange.
    """
    match = _RANGE.fullmatch(header or "")
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            raise UnsatisfiableRange(header)
        return max(0, size - n), size - 1
    a = int(first)
    if last and int(last) < a:
        return None  # invalid, so ignored
    if a >= size:
        raise UnsatisfiableRange(header)
    return a, min(int(last), size - 1) if last else size - 1


class StaticServer(ThreadingHTTPServer):
    """A threaded HTTP server of static files: `mounts` maps a URL name to the folder served under `/<name>/`."""

    daemon_threads = True

    def __init__(self, mounts: dict[str, str | Path], host: str = "127.0.0.1", port: int = 0):
        self.mounts = {str(name): Path(folder).resolve() for name, folder in mounts.items()}
        super().__init__((host, port), RangeHandler)

    @property
    def url(self) -> str:
        """The server's base URL, without a trailing slash."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class RangeHandler(BaseHTTPRequestHandler):
    """GET/HEAD of files with byte ranges, conditional GET, CORS headers and preflight; nothing outside the mounts."""

    protocol_version = "HTTP/1.1"  # keep-alive: a viewer reads many small ranges
    server: StaticServer

    def do_OPTIONS(self):  # noqa: N802 - http.server naming
        """Answer a CORS preflight: any origin may GET/HEAD with Range (and whatever else it asked for)."""
        self.send_response(HTTPStatus.NO_CONTENT)
        asked = self.headers.get("Access-Control-Request-Headers")
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Range, If-Range" + (f", {asked}" if asked else ""))
        self.send_header("Access-Control-Max-Age", "86400")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):  # noqa: N802
        """Send a file, whole (200) or one byte range (206), or 304/404/403/416."""
        self._send_file(body=True)

    def do_HEAD(self):  # noqa: N802
        """As GET, headers only."""
        self._send_file(body=False)

    def end_headers(self):
        """Every answer carries the CORS headers."""
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Expose-Headers", EXPOSED_HEADERS)
        super().end_headers()

    def log_message(self, *args):  # keep the terminal for the links
        """Requests are not logged."""

    def _target(self) -> Path | HTTPStatus:
        """The file a request path names, or the status refusing it."""
        parts = unquote(urlsplit(self.path).path).split("/")
        if len(parts) < 3 or parts[0] != "" or parts[1] not in self.server.mounts:
            return HTTPStatus.NOT_FOUND
        rest = parts[2:]
        if any(p in (".", "..") or "\\" in p or "\0" in p for p in rest):
            return HTTPStatus.NOT_FOUND
        root = self.server.mounts[parts[1]]
        try:
            target = root.joinpath(*rest).resolve()
        except (OSError, RuntimeError):
            return HTTPStatus.NOT_FOUND
        if not target.is_relative_to(root):  # a symlink leading out of the served folder
            return HTTPStatus.FORBIDDEN
        return target if target.is_file() else HTTPStatus.NOT_FOUND

    def _send_file(self, body: bool) -> None:
        target = self._target()
        if isinstance(target, HTTPStatus):
            return self._send_status(target, body)
        try:
            f = open(target, "rb")
        except OSError:
            return self._send_status(HTTPStatus.NOT_FOUND, body)
        with f:
            st = os.fstat(f.fileno())
            size, etag = st.st_size, f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
            modified = formatdate(st.st_mtime, usegmt=True)
            header = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            if if_range is not None and if_range.strip() not in (etag, modified):
                header = None  # the file changed since the client's copy: send it whole
            try:
                span = byte_range(header, size)
            except UnsatisfiableRange:
                return self._send_status(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, body, f"bytes */{size}")
            if span is None and self.headers.get("If-None-Match", "").strip() == etag:
                self.send_response(HTTPStatus.NOT_MODIFIED)
                self._file_headers(etag, modified)
                return self.end_headers()
            first, last = span or (0, size - 1)
            self.send_response(HTTPStatus.PARTIAL_CONTENT if span else HTTPStatus.OK)
            if span:
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            self.send_header("Content-Type", CONTENT_TYPES.get(target.suffix.lower(), "application/octet-stream"))
            self.send_header("Content-Length", str(last - first + 1))
            self._file_headers(etag, modified)
            self.end_headers()
            if body:
                self._copy(f, first, last - first + 1)

    def _file_headers(self, etag: str, modified: str) -> None:
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", modified)
        self.send_header("Cache-Control", "no-cache")  # outputs change while a run writes them: revalidate

    def _copy(self, f, first: int, length: int) -> None:
        f.seek(first)
        try:
            while length > 0:
                block = f.read(min(_COPY_BLOCK, length))
                if not block:  # the file shrank under us: the promised length cannot be kept
                    self.close_connection = True
                    return
                self.wfile.write(block)
                length -= len(block)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send_status(self, status: HTTPStatus, body: bool, content_range: str | None = None) -> None:
        text = f"{status.value} {status.phrase}\n".encode()
        self.send_response(status)
        if content_range:
            self.send_header("Content-Range", content_range)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        if body:
            self.wfile.write(text)


def neuroglancer_state(url: str, info: ngff.ImageInfo, name: str, window: tuple[float, float] | None = None) -> dict:
    """Neuroglancer viewer state showing the image at `url` with x horizontal and y vertical in the main panel.

    Neuroglancer's cross-section shows the first two display dimensions, which by default follow the source's axis
    order (z, y, x: z horizontal); the global dimensions and displayDimensions in x, y, z order and the `xy` layout
    make the main panel the x-y plane. `window` (the first channel's omero window, the channel shown) sets the
    contrast, which neuroglancer does not take from the omero metadata itself.
    """
    protocol = "zarr3" if info.version == "0.5" else "zarr2"
    level = info.levels[0]
    names = info.axis_names
    dims = {}
    for a in ("x", "y", "z"):
        if a in names:
            i = names.index(a)
            factor = _SI.get(info.axes[i].unit or "")
            dims[a] = [level.scale[i] * factor, "m"] if factor else [level.scale[i], ""]
    layer: dict = {"type": "image", "source": f"{protocol}://{url}", "name": name, "opacity": 1.0}
    if "c" in names:  # neuroglancer makes a channel axis the layer's local c' dimension: open at the first channel
        layer["localPosition"] = [0]
    if window is not None:
        layer["shaderControls"] = {"normalized": {"range": [window[0], window[1]]}}
    return {"dimensions": dims, "displayDimensions": list(dims), "layers": [layer], "layout": "xy",
            "selectedLayer": {"layer": name}}


def display_range(path) -> tuple[float, float] | None:
    """The omero display window (start, end) of the image's first channel, or None when it has none."""
    attrs = zarr.open_group(str(path), mode="r").attrs.asdict()
    omero = (attrs.get("ome") if isinstance(attrs.get("ome"), dict) else attrs).get("omero")
    try:
        windows = [(float(c["window"]["start"]), float(c["window"]["end"])) for c in omero["channels"]]
    except (KeyError, TypeError, ValueError):
        return None
    return windows[0] if windows else None


def viewer_links(base_url: str, info: ngff.ImageInfo, name: str, window=None) -> dict[str, str]:
    """URLs of the served image and of neuroglancer and vizarr views of it."""
    url = f"{base_url}/{quote(name)}/"
    state = neuroglancer_state(url, info, name, window)
    return {
        "url": url,
        "neuroglancer": NEUROGLANCER + quote(json.dumps(state, separators=(",", ":")), safe=""),
        "vizarr": VIZARR + quote(url, safe=""),
    }


def serve(path, host="127.0.0.1", port=8000):
    """Serve only the image folder, at /<its name>/; returns (server, links). The caller runs serve_forever()."""
    info = ngff.read_info(path)  # fail early on something that is not OME-Zarr
    path = Path(path).resolve()
    server = StaticServer({path.name: path}, host, port)
    return server, viewer_links(server.url, info, path.name, display_range(path))


def open_in_napari(path) -> bool:
    """Open the image in napari (through its OME-Zarr reader plugin); False when napari is not installed."""
    try:
        import napari
    except ImportError:
        return False
    napari.Viewer().open(str(path), plugin="napari-ome-zarr")
    napari.run()
    return True

