"""Shared helpers for the OME-Zarr in/out tests: run the CLI, check user errors, validate and read back images."""

import hashlib
import os
from pathlib import Path

import numpy as np
import zarr
from click.testing import CliRunner

from volrestore.cli import main


def cli(*args):
    """Run `volrestore ARGS` in-process; stdout and stderr are kept apart."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def assert_user_error(result, *must_not_exist, contains=None):
    """Exit code 2, exactly one line on stderr starting 'error:', no traceback, and nothing written."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    if contains:
        assert contains in lines[0], lines[0]
    for path in must_not_exist:
        assert not os.path.exists(path), f"{path} was written"
    return lines[0]


def validate(path, version):
    """Validate with the NGFF models of ome-zarr-models (raises on invalid metadata)."""
    from ome_zarr_models import v04, v05

    model = v05 if version == "0.5" else v04
    return model.Image.from_zarr(zarr.open_group(str(path), mode="r"))


def read_back(path):
    """Read an image the way napari's OME-Zarr plugin does: ome_zarr.reader.Reader → (node data, metadata)."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    node = next(iter(Reader(parse_url(str(path)))()))
    return [np.asarray(d) for d in node.data], node.metadata


def transforms(metadata, level=0):
    """(scale, translation) of one level from Reader metadata."""
    ts = {t["type"]: t for t in metadata["coordinateTransformations"][level]}
    return ts["scale"]["scale"], ts.get("translation", {}).get("translation")


def tree_hash(root: Path) -> str:
    """A hash of every name, file's bytes and link target under root (links are not followed)."""
    h = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(dirs + files):
            p = Path(folder) / name
            h.update(str(p.relative_to(root)).encode() + b"\0")
            if p.is_symlink():
                h.update(b"-> " + os.readlink(p).encode())
            elif p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()
