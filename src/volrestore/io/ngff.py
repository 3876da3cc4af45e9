"""OME-Zarr NGFF 0.4/0.5 in/out: read metadata and levels (lazy xarray), create outputs, build pyramids, provenance."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import zarr

from volrestore.provenance import __version__, command_line
from volrestore.errors import UserError

AXIS_ORDER = "tczyx"
AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
SPACE_UNITS = frozenset(
    "angstrom attometer centimeter decimeter exameter femtometer foot gigameter hectometer inch kilometer "
    "megameter meter micrometer mile millimeter nanometer parsec petameter picometer terameter yard "
    "yoctometer yottameter zeptometer zettameter".split()
)
TIME_UNITS = frozenset(
    "attosecond centisecond day decisecond exasecond femtosecond gigasecond hectosecond hour kilosecond "
    "megasecond microsecond millisecond minute nanosecond petasecond picosecond second terasecond "
    "yoctosecond yottasecond zeptosecond zettasecond".split()
)
VERSIONS = ("0.4", "0.5")


@dataclass(frozen=True)
class Axis:
    """One NGFF axis: name (t, c, z, y or x), type (time, channel, space) and unit."""

    name: str
    type: str | None = None
    unit: str | None = None

    def to_ngff(self) -> dict:
        return {k: v for k, v in (("name", self.name), ("type", self.type), ("unit", self.unit)) if v is not None}


@dataclass(frozen=True)
class LevelInfo:
    """One pyramid level: its array path, shape, dtype, chunks, shards and physical scale/translation per axis."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None
    scale: list[float]
    translation: list[float]


@dataclass(frozen=True)
class ImageInfo:
    """An OME-Zarr image's validated metadata: version, axes, levels, channel names, volrestore provenance."""

    path: str
    version: str
    axes: list[Axis]
    levels: list[LevelInfo]
    channel_names: list[str] | None = None
    provenance: dict | None = None
    complete: bool | None = None
    name: str | None = field(default=None)

    @property
    def axis_names(self) -> list[str]:
        return [a.name for a in self.axes]

    @property
    def spatial_axes(self) -> list[str]:
        return [a.name for a in self.axes if a.name in "zyx"]

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------- reading


def read_info(path) -> ImageInfo:
    """Read and validate the metadata of an OME-Zarr image (NGFF 0.4 or 0.5); UserError, one line, when invalid."""
    group = _open_group(path)
    attrs = group.attrs.asdict()
    ome, version, omero = _ome_attrs(attrs, path)
    try:
        ms = ome["multiscales"][0]
        if not all(isinstance(a, dict) for a in ms["axes"]):
            raise ValueError("axes must be a list of objects with a name")
        axes = [_parse_axis(a) for a in ms["axes"]]
        global_scale, global_translation = _parse_transforms(ms.get("coordinateTransformations"), len(axes))
        datasets = ms["datasets"]
        if not datasets:
            raise ValueError("no datasets")
        levels = []
        for ds in datasets:
            scale, translation = _parse_transforms(ds["coordinateTransformations"], len(axes))
            if global_scale is not None:
                translation = [t * g + gt for t, g, gt in zip(translation, global_scale, global_translation)]
                scale = [s * g for s, g in zip(scale, global_scale)]
            levels.append((str(ds["path"]), scale, translation))
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: malformed multiscales metadata ({error_summary(exc)}); fix the metadata or reconvert") from None
    _check_axes([a.name for a in axes], path)
    level_infos = [_level_info(group, path, len(axes), *level) for level in levels]
    if 0 in level_infos[0].shape:
        raise UserError(f"{path}: level '{level_infos[0].path}' has shape {level_infos[0].shape}, an axis of size 0 "
                        "(no voxels); give an image with data")
    if not np.issubdtype(np.dtype(level_infos[0].dtype), np.number):
        raise UserError(f"{path}: data type {level_infos[0].dtype} is not numeric; convert it to a numeric type")
    if np.issubdtype(np.dtype(level_infos[0].dtype), np.complexfloating):  # its imaginary part would be dropped
        raise UserError(f"{path}: data type {level_infos[0].dtype} is complex; write its real part or magnitude as "
                        "a float32 image and use that")
    channel_names = None
    if isinstance(omero, dict) and isinstance(omero.get("channels"), list):
        labels = [c.get("label") if isinstance(c, dict) else None for c in omero["channels"]]
        if labels and all(isinstance(lbl, str) for lbl in labels):
            channel_names = labels
    provenance = attrs.get("volrestore") if isinstance(attrs.get("volrestore"), dict) else None
    return ImageInfo(path=str(path), version=version, axes=axes, levels=level_infos, channel_names=channel_names,
                     provenance=provenance, complete=provenance.get("complete") if provenance else None,
                     name=ms.get("name"))


def _ome_attrs(attrs: dict, path) -> tuple[dict, str, Any]:
    """(the attributes holding multiscales, NGFF version, omero metadata) of 0.5 ('ome' key) or 0.4 (top level)."""
    if "ome" in attrs:
        ome = attrs["ome"]
        if not isinstance(ome, dict):
            raise UserError(f"{path}: malformed OME-Zarr metadata ('ome' is not an object); rewrite or reconvert it")
        version, omero = str(ome.get("version", "")), ome.get("omero")
    elif "multiscales" in attrs:
        ome, ms = attrs, attrs["multiscales"]
        version = str(ms[0].get("version", "")) if isinstance(ms, list) and ms and isinstance(ms[0], dict) else ""
        omero = attrs.get("omero")
    else:
        raise UserError(f"{path} is a Zarr group without OME-Zarr multiscales metadata; give an OME-Zarr image")
    if version not in VERSIONS:
        raise UserError(f"{path}: NGFF version {version or '(missing)'} is not supported; use NGFF 0.4 or 0.5")
    if "multiscales" not in ome:
        raise UserError(f"{path} has no multiscales metadata (is it a plate or labels group?); give an image group")
    return ome, version, omero


def _level_info(group, path, ndim: int, lpath: str, scale, translation) -> LevelInfo:
    try:
        arr = group[lpath]
    except KeyError:
        raise UserError(f"{path}: level '{lpath}' listed in multiscales is missing; reconvert the image") from None
    except Exception as exc:  # noqa: BLE001 - zarr raises JSON, value and type errors for damaged array metadata
        raise UserError(f"{path}: the metadata of level '{lpath}' cannot be read ({error_summary(exc)}); it is "
                        f"damaged or cut short: restore it from a copy or reconvert the image") from None
    if not isinstance(arr, zarr.Array) or arr.ndim != ndim:
        raise UserError(f"{path}: level '{lpath}' is not a {ndim}-D array matching the axes; reconvert it")
    if any(not s > 0 for s in scale):
        raise UserError(f"{path}: level '{lpath}' has a non-positive scale {scale}; fix the metadata")
    return LevelInfo(path=lpath, shape=tuple(int(n) for n in arr.shape), dtype=str(arr.dtype),
                     chunks=tuple(int(n) for n in arr.chunks),
                     shards=tuple(int(n) for n in arr.shards) if getattr(arr, "shards", None) else None,
                     scale=[float(s) for s in scale], translation=[float(t) for t in translation])


def open_level(path, level: int = 0, mode: str = "r") -> zarr.Array:
    """The zarr array of one pyramid level (0 = full resolution); mode="r+" to write into an output."""
    info = path if isinstance(path, ImageInfo) else read_info(path)
    check_level(info, level)
    return zarr.open_group(info.path, mode=mode)[info.levels[level].path]


def check_level(info: ImageInfo, level) -> None:
    """UserError unless `level` is one of the image's pyramid levels (0 = full resolution)."""
    if not (isinstance(level, int) and 0 <= level < len(info.levels)):
        raise UserError(f"{info.path} has {len(info.levels)} level(s); choose --level from 0 to {len(info.levels) - 1}")


def open_image(path, level: int = 0):
    """A lazy dask-backed xarray.DataArray: dims = axis names, physical coordinates on spatial axes.

    Dask chunks follow the write-blocks (shards if present, else chunks) so a dask task never splits a shard.
    """
    import dask.array as da
    import xarray as xr

    info = path if isinstance(path, ImageInfo) else read_info(path)
    arr = open_level(info, level)
    lvl = info.levels[level]
    data = da.from_zarr(arr, chunks=lvl.shards or lvl.chunks)
    coords = {}
    for i, ax in enumerate(info.axes):
        if ax.name in "zyx":
            values = np.arange(lvl.shape[i], dtype=np.float64) * lvl.scale[i] + lvl.translation[i]
            coords[ax.name] = xr.Variable(ax.name, values, attrs={"units": ax.unit} if ax.unit else {})
        elif ax.name == "c" and info.channel_names and len(info.channel_names) == lvl.shape[i]:
            coords["c"] = info.channel_names
    attrs = {"path": info.path, "level": level, "ngff_version": info.version,
             "scale": lvl.scale, "translation": lvl.translation}
    return xr.DataArray(data, dims=info.axis_names, coords=coords, attrs=attrs, name=info.name)


def _open_group(path) -> zarr.Group:
    p = str(path)
    if "://" not in p:
        if not os.path.exists(p):
            raise UserError(f"{p} does not exist; check the path")
        if not os.path.isdir(p):
            raise UserError(f"{p} is a file, not an OME-Zarr directory; convert TIFFs with 'volrestore convert'")
    try:
        return zarr.open_group(p, mode="r")
    except json.JSONDecodeError as exc:  # a zarr.json / .zattrs cut short or edited by hand
        raise UserError(f"{p}: its group metadata is not valid JSON ({exc.msg} at line {exc.lineno}); it is damaged "
                        "or cut short: restore it from a copy or reconvert the image") from None
    except zarr.errors.ContainsArrayError:
        raise UserError(f"{p} is a plain Zarr array, not an OME-Zarr image; give the image group above it") from None
    except Exception as exc:  # zarr raises several types for "no group here"
        raise UserError(f"{p} is not an OME-Zarr image ({error_summary(exc)}); give an OME-Zarr (.ome.zarr) directory") from None


def _parse_axis(a) -> Axis:
    if isinstance(a, str):  # a bare name, accepted by create_image for convenience
        return Axis(a, AXIS_TYPES.get(a))
    return Axis(str(a["name"]), a.get("type"), a.get("unit"))


def _parse_transforms(transforms, ndim) -> tuple[list[float] | None, list[float] | None]:
    if transforms is None:
        return None, None
    scale, translation = None, [0.0] * ndim
    for t in transforms:
        if t["type"] == "scale":
            scale = [float(v) for v in t["scale"]]
        elif t["type"] == "translation":
            translation = [float(v) for v in t["translation"]]
        elif t["type"] != "identity":
            raise ValueError(f"unsupported transformation type {t['type']!r}")
    if scale is None or len(scale) != ndim or len(translation) != ndim:
        raise ValueError(f"scale/translation must have {ndim} values")
    return scale, translation


def _check_axes(names: Sequence[str], where) -> None:
    """Supported layouts: any subset of t,c,z,y,x in that order that includes y and x."""
    ordered = [a for a in AXIS_ORDER if a in names]
    if list(names) != ordered or len(set(names)) != len(names) or not {"y", "x"} <= set(names):
        raise UserError(
            f"{where}: axes {','.join(names)} are not supported; use a subset of t,c,z,y,x in that order with y and x"
        )


def error_summary(exc: BaseException) -> str:
    """The first line of an exception's message, for embedding in a one-line UserError."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{type(exc).__name__}: {text}" if isinstance(exc, KeyError) else text


# ----------------------------------------------------------------------------------------------- writing


def make_provenance(parameters: dict | None = None, command: str | None = None) -> dict:
    """A provenance record for attrs["volrestore"]; `complete` stays False until set_complete."""
    return {
        "version": __version__,
        "command": command or command_line(),
        "parameters": dict(parameters or {}),
        "complete": False,
    }


def check_output_path(out, inputs: Iterable = (), overwrite: bool = False) -> None:
    """Refuse an output that exists (unless overwrite), is a symlink to be overwritten, equals or sits inside an
    input, contains an input, or whose folder cannot be written."""
    out_p = Path(out).expanduser().resolve()
    for inp in inputs:
        in_p = Path(inp).expanduser().resolve()
        if out_p == in_p or in_p in out_p.parents:
            raise UserError(f"output {out} is inside or equal to input {inp}; choose an output outside the input")
        if overwrite and out_p in in_p.parents:
            raise UserError(f"output {out} contains input {inp}; overwriting would delete it, choose another output")
    if "://" not in str(out):
        _check_writable_folder(out, out_p)
    if Path(out).expanduser().is_symlink() and overwrite:  # replacing it could delete the link's target
        raise UserError(f"OUT is a symlink ({out} -> {os.readlink(Path(out).expanduser())}); give a real folder")
    if out_p.exists() or out_p.is_symlink():
        if not overwrite:
            raise UserError(f"output {out} already exists; choose another path or pass --overwrite")
        if out_p.is_file() or (any(out_p.iterdir()) and not _looks_like_zarr(out_p)):
            raise UserError(f"output {out} exists and is not a Zarr store; refusing to overwrite it, remove it yourself")


def _check_writable_folder(out, out_p: Path) -> None:
    """UserError when the nearest existing folder at or above OUT is not a folder or may not be written by us."""
    folder = out_p.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"cannot create output {out}: {folder} is a file, not a folder; choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot create output {out}: folder {folder} is not writable; choose a writable location "
                        "or fix its permissions")


def _looks_like_zarr(p: Path) -> bool:
    return any((p / name).exists() for name in ("zarr.json", ".zgroup", ".zarray", ".zattrs"))


def level_factors(shape, axes, scale) -> tuple[int, ...]:
    """Per-axis downsampling factor from one level to the next (2 or 1).

    y and x halve; z halves only while its physical scale stays <= the new lateral scale, so anisotropic stacks
    first become isotropic; axes of size 1 and t/c never change.
    """
    names = [axis_name(a) for a in axes]
    lateral = min(scale[i] * 2 for i, n in enumerate(names) if n in "yx")
    factors = []
    for i, n in enumerate(names):
        if n in "yx":
            f = 2
        elif n == "z":
            f = 2 if scale[i] * 2 <= lateral * (1 + 1e-9) else 1
        else:
            f = 1
        factors.append(f if shape[i] > 1 else 1)
    return tuple(factors)


def pyramid_levels(shape, axes, scale, translation, n_levels):
    """(shape, scale, translation) of each level; translations keep voxel centres of the mean-downsampling."""
    out = [(tuple(shape), list(scale), list(translation))]
    for _ in range(n_levels - 1):
        shp, scl, trn = out[-1]
        f = level_factors(shp, axes, scl)
        out.append((
            tuple(-(-n // k) for n, k in zip(shp, f)),
            [s * k for s, k in zip(scl, f)],
            [t + (k - 1) / 2 * s for t, s, k in zip(trn, scl, f)],
        ))
    return out


def auto_levels(shape, axes, min_side: int = 64) -> int:
    """Default pyramid depth: halve until the smallest lateral (y, x) side is below min_side."""
    names = [axis_name(a) for a in axes]
    side = min(shape[names.index("y")], shape[names.index("x")])
    n = 1
    while side >= min_side:
        side, n = -(-side // 2), n + 1
    return n


def create_image(path, *, shape, dtype, axes, scale, translation=None, chunks, shards=None, version="0.5",
                 n_levels=1, channel_names=None, provenance=None, overwrite=False, fill_value=0,
                 into_folder=False) -> zarr.Group:
    """Create an empty OME-Zarr image with metadata for all n_levels; provenance is stored with complete=False.

    Everything is validated before anything is written. `axes` are Axis objects, NGFF dicts or names.
    `into_folder=True`: `path` is a folder the caller made for it (empty but for hidden files such as an output lock,
    which are kept); the image is created inside it.
    """
    axes = [a if isinstance(a, Axis) else _parse_axis(a) for a in axes]
    axes = [Axis(a.name, a.type or AXIS_TYPES.get(a.name), a.unit) for a in axes]
    names, ndim, version = [a.name for a in axes], len(axes), str(version)
    shape, chunks = _int_tuple(shape, ndim, "shape"), _int_tuple(chunks, ndim, "chunks")
    translation = [0.0] * ndim if translation is None else [float(t) for t in translation]
    scale = [float(s) for s in scale]
    shards = None if shards is None else _int_tuple(shards, ndim, "shards")
    _check_new_image(names, version, shape, chunks, scale, translation, shards, axes)
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        raise UserError(f"data type {dtype} is not a real number type; choose e.g. uint16 or float32")
    if channel_names is not None:
        channel_names = [str(c) for c in channel_names]
        if "c" not in names or len(channel_names) != shape[names.index("c")]:
            raise UserError(f"{len(channel_names)} channel names given for shape {shape}; give one per channel")
    n_levels = int(n_levels)
    if n_levels < 1:
        raise UserError("the number of pyramid levels must be at least 1")
    if into_folder:
        if _looks_like_zarr(Path(path)) or any(not f.name.startswith(".") for f in Path(path).iterdir()):
            raise UserError(f"output {path} is not empty; choose another path or pass --overwrite")
    else:
        check_output_path(path, overwrite=overwrite)

    levels = pyramid_levels(shape, axes, scale, translation, n_levels)
    attrs = _image_attrs(path, axes, levels, version, channel_names, dtype, provenance)
    if Path(path).exists() and not into_folder:  # overwrite was allowed and checked above
        shutil.rmtree(path) if Path(path).is_dir() else os.remove(path)
    group = zarr.open_group(str(path), mode="a" if into_folder else "w", zarr_format=3 if version == "0.5" else 2)
    for i, (shp, _, _) in enumerate(levels):
        lchunks = tuple(min(c, n) for c, n in zip(chunks, shp))
        kwargs: dict[str, Any] = {}
        if version == "0.5":
            kwargs["dimension_names"] = names
            if shards is not None:
                # keep shards a multiple of the (clipped) chunks but no larger than the level needs
                kwargs["shards"] = tuple(min(s, -(-n // c) * c) // c * c for s, c, n in zip(shards, lchunks, shp))
        else:
            kwargs["chunk_key_encoding"] = {"name": "v2", "separator": "/"}  # NGFF 0.4 requires "/"
        group.create_array(str(i), shape=shp, dtype=dtype, chunks=lchunks, fill_value=fill_value, **kwargs)
    group.attrs.update(attrs)
    return group


def _check_new_image(names, version, shape, chunks, scale, translation, shards, axes) -> None:
    """UserError for axes, sizes, transforms, shards or units that an NGFF image cannot have."""
    ndim = len(names)
    _check_axes(names, "create_image")
    if version not in VERSIONS:
        raise UserError(f"NGFF version {version} is not supported; use 0.5 or 0.4")
    if len(scale) != ndim or len(translation) != ndim or any(not s > 0 for s in scale):
        raise UserError(f"scale and translation need {ndim} values (scale > 0); got {scale} and {translation}")
    if any(n < 1 for n in shape) or any(c < 1 for c in chunks):
        raise UserError(f"shape {shape} and chunks {chunks} must be positive")
    if shards is not None:
        if version != "0.5":
            raise UserError("sharding needs NGFF 0.5 (zarr v3); drop the shards option or use --ngff 0.5")
        if any(s % c for s, c in zip(shards, chunks)):
            raise UserError(f"shards {shards} must be whole multiples of chunks {chunks}; adjust --shards")
    for a in axes:
        if a.unit is not None and a.unit not in (SPACE_UNITS if a.type == "space" else TIME_UNITS):
            raise UserError(f"unit {a.unit!r} of axis {a.name} is not an NGFF unit; use e.g. micrometer or second")


def _image_attrs(path, axes, levels, version, channel_names, dtype, provenance) -> dict:
    """The group attributes: NGFF multiscales (and omero) metadata for the version, and volrestore's provenance."""
    datasets = [
        {"path": str(i), "coordinateTransformations": [
            {"type": "scale", "scale": scl}, {"type": "translation", "translation": trn}]}
        for i, (_, scl, trn) in enumerate(levels)
    ]
    multiscale = {"axes": [a.to_ngff() for a in axes], "datasets": datasets, "name": Path(str(path)).name,
                  "type": "mean", "metadata": {"method": "volrestore.io.pyramid.build_pyramid", "version": __version__}}
    ome: dict[str, Any] = {"multiscales": [multiscale]}
    if channel_names is not None:
        ome["omero"] = _omero(channel_names, dtype)
    prov = {**make_provenance(), **(provenance or {}), "complete": False}
    if version == "0.5":
        return {"ome": {"version": "0.5", **ome}, "volrestore": prov}
    multiscale["version"] = "0.4"
    return {**ome, "volrestore": prov}


def create_like(info, path, *, dtype=None, chunks=None, shards=None, version=None, n_levels=None,
                provenance=None, overwrite=False) -> zarr.Group:
    """Create an output with the axes, units, scale, translation and channel names of `info` (ImageInfo or path).

    shards=None inherits the input's sharding when the output is NGFF 0.5; shards=False turns sharding off.
    """
    info = info if isinstance(info, ImageInfo) else read_info(info)
    lvl = info.levels[0]
    version = str(version or info.version)
    if shards is None:
        shards = lvl.shards if version == "0.5" else None
    return create_image(
        path, shape=lvl.shape, dtype=dtype or lvl.dtype, axes=info.axes, scale=lvl.scale,
        translation=lvl.translation, chunks=chunks or lvl.chunks, shards=shards or None, version=version,
        n_levels=n_levels or len(info.levels), channel_names=info.channel_names, provenance=provenance,
        overwrite=overwrite,
    )


def set_complete(path, complete: bool = True, extra: dict | None = None) -> None:
    """Flip attrs["volrestore"]["complete"] (call only after the last chunk is written); merge `extra` in."""
    group = zarr.open_group(str(path), mode="r+")
    prov = dict(group.attrs.get("volrestore") or make_provenance())
    prov.update(extra or {})
    prov["complete"] = bool(complete)
    group.attrs["volrestore"] = prov


def _omero(channel_names, dtype) -> dict:
    lo, hi = (np.iinfo(dtype).min, np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else (0.0, 1.0)
    window = {"min": float(lo), "max": float(hi), "start": float(lo), "end": float(hi)}
    return {"channels": [{"label": n, "color": "FFFFFF", "active": True, "window": window} for n in channel_names],
            "rdefs": {"model": "greyscale"}}


def set_omero_windows(path, windows: Sequence[dict]) -> bool:
    """Merge one display window per channel ({start, end[, min, max]}) into the omero metadata; False without it.

    At creation the windows are the dtype range (no data yet); io.pyramid calls this with data percentiles once
    the data is final, so viewers (napari-ome-zarr, neuroglancer) open the image with a usable contrast.
    """
    group = zarr.open_group(str(path), mode="r+")
    attrs = group.attrs.asdict()
    holder = attrs["ome"] if isinstance(attrs.get("ome"), dict) else attrs
    omero = holder.get("omero")
    if not isinstance(omero, dict) or not isinstance(omero.get("channels"), list):
        return False
    if len(omero["channels"]) != len(windows):
        raise ValueError(f"{len(windows)} windows for {len(omero['channels'])} omero channels")
    for channel, window in zip(omero["channels"], windows):
        channel["window"] = {**channel.get("window", {}), **{k: float(v) for k, v in window.items()}}
    if holder is attrs:  # NGFF 0.4: omero at the top level
        group.attrs["omero"] = omero
    else:
        group.attrs["ome"] = holder
    return True


def _int_tuple(values, ndim, what) -> tuple[int, ...]:
    values = tuple(int(v) for v in values)
    if len(values) != ndim:
        raise UserError(f"{what} needs {ndim} values (one per axis); got {list(values)}")
    return values


def axis_name(a) -> str:
    """The name of an axis given as a name, an Axis or an NGFF dict."""
    return a if isinstance(a, str) else a.name if isinstance(a, Axis) else a["name"]


# ----------------------------------------------------------------------------------------------- pyramid


