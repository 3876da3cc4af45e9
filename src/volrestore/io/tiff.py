"""TIFF / OME-TIFF / ImageJ TIFF → OME-Zarr, streamed in slabs of whole output chunks so memory never grows with the stack."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import numpy as np

from volrestore.io import ngff, pyramid
from volrestore.errors import UserError

DEFAULT_CHUNKS = (64, 256, 256)  # z, y, x; t and c chunks are always 1

# tifffile series axes → NGFF axes; I/Q (generic page index) means z when no Z is present
_TIFF_AXES = {"T": "t", "C": "c", "S": "c", "Z": "z", "Y": "y", "X": "x", "I": "z", "Q": "z"}
_LENGTH_UNITS = {  # metres per unit, also used to convert metadata sizes into --unit
    "angstrom": 1e-10, "nanometer": 1e-9, "micrometer": 1e-6, "millimeter": 1e-3, "centimeter": 1e-2, "meter": 1.0,
}
_UNIT_ALIASES = {
    "å": "angstrom", "Å": "angstrom", "nm": "nanometer", "µm": "micrometer", "μm": "micrometer", "um": "micrometer",
    "micron": "micrometer", "microns": "micrometer", "\\u00b5m": "micrometer", "mm": "millimeter", "cm": "centimeter",
    "m": "meter", "s": "second", "sec": "second", "ms": "millisecond", "µs": "microsecond", "us": "microsecond",
    "min": "minute", "h": "hour",
}


@dataclass
class TiffLayout:
    """What the converter learned from the TIFF: axes mapping and physical metadata."""

    tiff_axes: str  # tifffile series axes, e.g. "TZCYX"
    out_shape: tuple[int, ...]  # in output (NGFF) axis order
    dtype: np.dtype
    axes: list[str]  # output NGFF axes in t,c,z,y,x order
    sizes: dict[str, float]  # axis -> physical size per voxel (z, y, x, t) found in metadata
    units: dict[str, str]  # "space" / "time" -> NGFF unit found in metadata
    channel_names: list[str] | None


def convert(src, out, *, voxel_size=None, unit=None, chunks=None, shards=None, version="0.5", n_levels=None,
            overwrite=False, progress=False, command=None) -> ngff.ImageInfo:
    """Convert a TIFF stack into an OME-Zarr image and return its ImageInfo.

    voxel_size (z, y, x) and unit override the file's metadata; chunks/shards are (z, y, x) sizes.
    Everything is validated before the output is created; a failure while streaming removes the partial output.
    """
    import tifffile

    src = str(src)
    if not os.path.exists(src):
        raise UserError(f"{src} does not exist; check the path")
    if os.path.isdir(src):
        raise UserError(f"{src} is a directory; give a TIFF file (use 'volrestore info' for OME-Zarr)")
    try:
        tif = tifffile.TiffFile(src)
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct errors...
        raise UserError(f"cannot read {src} as TIFF ({ngff.error_summary(exc)}); give a valid TIFF / OME-TIFF file") \
            from None
    with tif:
        layout = inspect_tiff(tif, src)
        ngff.check_output_path(out, inputs=[src], overwrite=overwrite)
        scale, units = _physical(layout, voxel_size, unit)
        axes = [ngff.Axis(a, ngff.AXIS_TYPES[a], units.get(ngff.AXIS_TYPES[a])) for a in layout.axes]
        shape = layout.out_shape
        out_chunks = _per_axis(layout.axes, chunks or DEFAULT_CHUNKS)
        out_shards = _per_axis(layout.axes, shards) if shards else None
        levels = n_levels or ngff.auto_levels(shape, layout.axes)
        params = {"input": os.path.abspath(src), "voxel_size": voxel_size and list(voxel_size), "unit": unit,
                  "chunks": list(out_chunks), "shards": out_shards and list(out_shards), "ngff": str(version),
                  "levels": levels, "tiff_axes": layout.tiff_axes}
        ngff.create_image(
            out, shape=shape, dtype=layout.dtype, axes=axes, scale=scale, chunks=out_chunks, shards=out_shards,
            version=version, n_levels=levels, channel_names=layout.channel_names, overwrite=overwrite,
            provenance=ngff.make_provenance(params, command),
        )
        try:
            _stream(tif, layout, out, out_shards or out_chunks, progress)
        except Exception as exc:
            shutil.rmtree(out, ignore_errors=True)
            if isinstance(exc, MemoryError):
                raise
            raise UserError(f"reading {src} failed ({ngff.error_summary(exc)}); the TIFF may be truncated or corrupt, "
                            "check it and rerun") from None
    pyramid.build_pyramid(out, progress=progress)
    ngff.set_complete(out)
    return ngff.read_info(out)


def inspect_tiff(tif, src="TIFF") -> TiffLayout:
    """Map the first series' axes to NGFF and collect voxel sizes, units and channel names from OME/ImageJ tags."""
    if not tif.series:
        raise UserError(f"{src} contains no image series; give a TIFF with image data")
    series = tif.series[0]
    tiff_axes, shape = series.axes, tuple(series.shape)
    mapped = [_TIFF_AXES.get(a) for a in tiff_axes]
    if None in mapped or len(set(mapped)) != len(mapped) or not {"y", "x"} <= set(mapped):
        raise UserError(f"{src}: TIFF axes {tiff_axes} are not supported; use a 2D/3D stack with optional T and C")
    dtype = np.dtype(series.dtype)
    if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        raise UserError(f"{src}: pixel type {dtype} is not supported; use integer or float images")
    sizes, units, names = {}, {}, None
    if tif.is_ome and tif.ome_metadata:
        sizes, units, names = _ome_metadata(tif.ome_metadata)
    elif tif.is_imagej and tif.imagej_metadata is not None:
        sizes, units = _imagej_metadata(tif.imagej_metadata, tif.pages[0])
    n_channels = shape[mapped.index("c")] if "c" in mapped else None
    if names is not None and len(names) != n_channels:
        names = None
    axes = [a for a in ngff.AXIS_ORDER if a in mapped]
    size = dict(zip(mapped, shape))
    return TiffLayout(tiff_axes, tuple(size[a] for a in axes), dtype, axes, sizes, units, names)


def _ome_metadata(xml: str):
    import tifffile

    image = tifffile.xml2dict(xml)["OME"]["Image"]
    pixels = (image[0] if isinstance(image, list) else image)["Pixels"]
    sizes, units = {}, {}
    for ax in "ZYX":
        if f"PhysicalSize{ax}" in pixels:
            sizes[ax.lower()] = float(pixels[f"PhysicalSize{ax}"])
            units["space"] = _ngff_unit(pixels.get(f"PhysicalSize{ax}Unit", "µm"))
    if "TimeIncrement" in pixels:
        sizes["t"] = float(pixels["TimeIncrement"])
        units["time"] = _ngff_unit(pixels.get("TimeIncrementUnit", "s"))
    channels = pixels.get("Channel", [])
    channels = channels if isinstance(channels, list) else [channels]
    names = [c.get("Name") for c in channels]
    return sizes, units, names if names and all(isinstance(n, str) for n in names) else None


def _imagej_metadata(meta: dict, page):
    sizes, units = {}, {}
    unit = _ngff_unit(meta.get("unit"))
    if unit in ngff.SPACE_UNITS:  # without a real unit ImageJ's resolution is just DPI
        units["space"] = unit
        if "spacing" in meta:
            sizes["z"] = float(meta["spacing"])
        for ax, tag in (("y", "YResolution"), ("x", "XResolution")):
            if tag in page.tags:
                num, den = page.tags[tag].value
                if num:
                    sizes[ax] = den / num
    if meta.get("finterval"):
        sizes["t"], units["time"] = float(meta["finterval"]), "second"
    return sizes, units


def _ngff_unit(unit) -> str | None:
    if unit is None:
        return None
    unit = str(unit).strip()
    return _UNIT_ALIASES.get(unit, _UNIT_ALIASES.get(unit.lower(), unit.lower()))


def _physical(layout: TiffLayout, voxel_size, unit) -> tuple[list[float], dict[str, str]]:
    """Per-axis scale and units: options override metadata; metadata sizes are converted into --unit."""
    sizes, units = dict(layout.sizes), dict(layout.units)
    if unit is not None:
        unit = _ngff_unit(unit)
        if unit not in ngff.SPACE_UNITS:
            raise UserError(f"--unit {unit} is not an NGFF length unit; use e.g. micrometer or nanometer")
        old = units.get("space")
        if voxel_size is None and old and old != unit:
            if old not in _LENGTH_UNITS or unit not in _LENGTH_UNITS:
                raise UserError(f"cannot convert the file's {old} into {unit}; give --voxel-size in {unit}")
            for ax in "zyx":
                if ax in sizes:
                    sizes[ax] *= _LENGTH_UNITS[old] / _LENGTH_UNITS[unit]
        units["space"] = unit
    if voxel_size is not None:
        if len(voxel_size) != 3 or any(not float(v) > 0 for v in voxel_size):
            raise UserError(f"--voxel-size needs three positive numbers Z Y X; got {voxel_size}")
        sizes.update(zip("zyx", map(float, voxel_size)))
        units["space"] = unit or "micrometer"  # --voxel-size is in --unit, micrometre by default
    if not any(ax in sizes for ax in "zyx"):
        units.pop("space", None)  # no physical size known: scale 1 and no unit rather than a made-up micrometre
    return [sizes.get(a, 1.0) for a in layout.axes], units


def _per_axis(axes, zyx) -> tuple[int, ...]:
    """Expand a (z, y, x) size to all output axes (t, c get 1); create_image clips it to each level."""
    zyx = [int(v) for v in zyx]
    if len(zyx) != 3 or any(v < 1 for v in zyx):
        raise UserError(f"chunk/shard sizes need three positive integers Z Y X; got {zyx}")
    size = dict(zip("zyx", zyx))
    return tuple(size.get(a, 1) for a in axes)

def _stream(tif, layout: TiffLayout, out, block, progress) -> None:
    """Copy level 0 one write-block (chunk or shard) per task through the blockwise runner, in threads here.

    The TIFF is read in this thread, not in the tasks: its pages hold whole planes (as strips or tiles), so a task
    reading its own region would decode every plane once per write-block across it and hold whole planes per task.
    Instead a slab (one write-block deep along t, c and z, whole planes) is read once, one z plane at a time, into
    a reused buffer, and each of its write-blocks is handed, copied, to a writer thread (compression and storage
    run in parallel). The runner takes the next block only as one is written, so peak memory is about one slab
    plus the blocks in flight, whatever the stack size.
    """
    import zarr

    from volrestore.blockwise.blocks import grid_blocks, grid_size
    from volrestore.blockwise.runner import run_blockwise

    source = zarr.open(tif.series[0].aszarr(), mode="r")  # tifffile's store: a read touches only its pages
    target = ngff.open_level(out, 0, mode="r+")
    axes = layout.axes
    deep = [i for i, a in enumerate(axes) if a in "tcz"]  # a slab is one block deep along these, whole along y, x
    buffer = np.empty([min(b, n) if i in deep else n for i, (n, b) in enumerate(zip(target.shape, block))],
                      target.dtype)
    staged = {}  # block index -> its data, from this (reading) thread to the writer threads

    def blocks():
        slab = None
        for blk in grid_blocks(target.shape, block):  # C order: a slab's blocks come one after another
            if slab is None or any(blk.write[i] != slab[i] for i in deep):
                slab = [blk.write[i] if i in deep else (0, n) for i, n in enumerate(target.shape)]
                buf = buffer[tuple(slice(0, b - a) for a, b in slab)]
                _read_slab(source, layout, [slice(a, b) for a, b in slab], buf)
            staged[blk.index] = buf[tuple(slice(w0 - s0, w1 - s0) for (w0, w1), (s0, _) in zip(blk.write, slab))].copy()
            yield blk

    def write(blk):
        target[blk.write_slices] = staged[blk.index]
        del staged[blk.index]  # only once written: a retried write finds its data again

    run_blockwise(None, write, blocks(), progress=progress, what="converting", total=grid_size(target.shape, block))


def _read_slab(source, layout: TiffLayout, slab, buf) -> None:
    """Fill buf with the slab (slices in output axis order) of the TIFF series, one z plane at a time."""
    axes = layout.axes
    pos = [axes.index(_TIFF_AXES[t]) for t in layout.tiff_axes]  # output position of each tiff axis
    perm = np.argsort(pos)  # tiff order -> output order
    zi = axes.index("z") if "z" in axes else None
    for z in range(slab[zi].start, slab[zi].stop) if zi is not None else [None]:
        sel = list(slab)
        if z is not None:
            sel[zi] = slice(z, z + 1)
        local = tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(sel, slab))
        buf[local] = np.transpose(source[tuple(sel[p] for p in pos)], perm)
