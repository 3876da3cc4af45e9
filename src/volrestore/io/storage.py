"""Where an array's bytes live on disk: the files of a box's chunks (shards), their fsync, and an input fingerprint."""

from __future__ import annotations

import hashlib
import itertools
import math
import os
from pathlib import Path

import numpy as np
import zarr

from volrestore.errors import UserError

# Chunks read for a content fingerprint: a fixed, seeded sample, so the same input always gives the same hash and
# reading stays bounded (a few chunks) whatever the volume's size.
FINGERPRINT_CHUNKS = 8
FINGERPRINT_SEED = 20261202
METADATA_FILES = ("zarr.json", ".zarray", ".zattrs", ".zgroup")


def cast_rounded(values: np.ndarray, dtype) -> np.ndarray:
    """`values` (a float array this call may overwrite) as `dtype`: integers rounded half to even and clipped to
    the type's range (the one cast for every output volrestore writes: restore, degrade, pyramid levels)."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        np.rint(values, out=values)
        np.clip(values, *integer_limits(dtype), out=values)
    return values.astype(dtype)


def integer_limits(dtype) -> tuple[float, float]:
    """The float clip range of an integer dtype: its limits, or the nearest float64 inside them (the 64-bit types'
    maxima are not float64 numbers; 2**63 or 2**64 would wrap around when cast)."""
    lim = np.iinfo(dtype)
    lo, hi = float(lim.min), float(lim.max)
    return lo, hi if int(hi) <= lim.max else float(np.nextafter(hi, 0.0))


def storage_grid(array) -> tuple[int, ...]:
    """The shape of one storage unit (file) of a zarr array: its shard when sharded, else its chunk."""
    return tuple(array.shards or array.chunks)


def box_files(image_path, array_path, box) -> list[Path]:
    """The files holding the storage units that intersect `box` ([(start, stop)] per axis) of an image's array.

    Units that were never written (all fill value) have no file and are left out.
    """
    array = zarr.open_array(str(Path(image_path) / array_path), mode="r")
    unit = storage_grid(array)
    ranges = [range(a // u, -(-b // u)) for (a, b), u in zip(box, unit)]
    root = Path(image_path) / array_path
    files = (root / array.metadata.encode_chunk_key(coords) for coords in itertools.product(*ranges))
    return [f for f in files if f.exists()]


def sync_box(image_path, array_path, box) -> None:
    """fsync the files of a box's chunks and their folders, so a progress record written after this call never
    outlives the data it stands for (an OS crash loses at most unrecorded work)."""
    files = box_files(image_path, array_path, box)
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for folder in {f.parent for f in files}:
        sync_folder(folder)


def sync_folder(folder) -> None:
    """fsync a folder's entries (new file names); a no-op where the OS cannot open folders (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders; the files themselves were synced
        pass
    finally:
        os.close(fd)


def fingerprint(image_path, array_path) -> dict:
    """A cheap identity of an image level's content: shape, dtype, chunks, a hash of the image's and the level's
    metadata files, a hash of a fixed seeded sample of chunks (decoded values), and the latest modification time
    of those files. Equal fingerprints do not prove equal data, but every edit we can see cheaply changes one."""
    root = Path(image_path)
    array = zarr.open_array(str(root / array_path), mode="r")
    meta = hashlib.sha256()
    mtimes = []
    for folder in (root, root / array_path):
        for name in METADATA_FILES:
            if (folder / name).exists():
                meta.update(name.encode() + (folder / name).read_bytes())
                mtimes.append((folder / name).stat().st_mtime_ns)
    sample = hashlib.sha256()
    for coords in sample_chunks(array.shape, array.chunks):
        box = tuple(slice(c * n, min((c + 1) * n, s)) for c, n, s in zip(coords, array.chunks, array.shape))
        unit = [b.start // u for b, u in zip(box, storage_grid(array))]
        f = root / array_path / array.metadata.encode_chunk_key(tuple(unit))
        try:
            sample.update(np.ascontiguousarray(array[box]).tobytes())
        except Exception as exc:  # noqa: BLE001 - any codec error means a damaged file; say which
            raise UserError(f"cannot read {f} of {image_path} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                            "the input is damaged: repair or re-convert it") from None
        if f.exists():
            mtimes.append(f.stat().st_mtime_ns)
    return {"shape": list(array.shape), "dtype": str(array.dtype), "chunks": list(array.chunks),
            "metadata_sha256": meta.hexdigest(), "sample_sha256": sample.hexdigest(),
            "sample_chunks": FINGERPRINT_CHUNKS, "mtime_ns": max(mtimes, default=0)}


def sample_chunks(shape, chunks) -> list[tuple[int, ...]]:
    """Chunk coordinates of the fingerprint sample: the first and last chunk and FINGERPRINT_CHUNKS - 2 drawn with a
    fixed seed (all chunks when there are fewer)."""
    counts = [-(-int(n) // int(c)) for n, c in zip(shape, chunks)]
    total = math.prod(counts)
    if total <= FINGERPRINT_CHUNKS:
        flat = list(range(total))
    else:
        rng = np.random.default_rng(FINGERPRINT_SEED)
        drawn = rng.choice(total - 2, FINGERPRINT_CHUNKS - 2, replace=False) + 1
        flat = [0, *sorted(int(i) for i in drawn), total - 1]
    return [tuple(int(i) for i in np.unravel_index(i, counts)) for i in flat]


def fingerprint_change(old: dict, new: dict) -> str | None:
    """The first difference between two fingerprints, in words; None when they agree."""
    words = {"shape": "shape", "dtype": "data type", "chunks": "chunking", "metadata_sha256": "metadata",
             "sample_sha256": "content (sampled chunks)", "mtime_ns": "modification time"}
    for key, what in words.items():
        if old.get(key) != new.get(key):
            return f"its {what} changed" + (f" ({old.get(key)} -> {new.get(key)})" if key in ("shape", "dtype",
                                                                                             "chunks") else "")
    return None
