"""Validate restore arguments into a Plan (tile grid, write-blocks, output chunks, mask mapping, intensity range,
batch, the precision the input is read in)."""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass

import numpy as np

from volrestore.blockwise.grid import Grid, validate_tile
from volrestore.blockwise.blocks import PROGRESS_DIR, progress_group_for
from volrestore.errors import UserError
from volrestore.io import ngff
from volrestore.config import RESULT_FIELDS, ModelRef, RestoreConfig, resolved_path
from volrestore.evaluation.metrics import noise_free_median, photons_at, shot_noise_fit
from volrestore.model import registry
from volrestore.model.restorer import RestorerSpec


# Auto write-blocks span this many tile strides per overlapping axis, by how many axes overlap. Each tile is computed
# once whatever the blocks (blockwise.spill: its owner sends the parts reaching into other blocks); until 2026-12-06 a
# tile straddling a block border was computed by every block it touched, ~((n+1)/n) per axis: 1.30 for 3D at 8
# strides (64³ tiles: 384³ blocks, ≈ 0.45 GB of float64 accumulator), 1.36 for 2.5D at 4. Bigger blocks still mean
# fewer parts written and read (their share falls as 1/n per axis) and fewer tasks; 2D/2.5D tiles keep 4 (512² tiles:
# 1792² per z chunk, already large).
BLOCK_TARGET_STRIDES = {1: 4, 2: 4, 3: 8}
# ... unless that block's float64 accumulators (one per output: mean, std) would exceed this: then its overlapping
# axes give up whole chunks, the longest first (smaller tasks, more parts passed; --block overrides). A 2.5D model on
# 64-slice z chunks holds 2048² x 64 x 8 bytes = 2 GiB per block task, which stays; with --std (4 GiB) or 128-slice
# chunks it shrinks to 1280 x 1536, as a worker runs 2 tasks at a time.
BLOCK_BUDGET_BYTES = 2 << 30



@dataclass(frozen=True)
class Plan:
    """Everything a block task needs besides its index (small, sent with each task)."""

    run: str  # unique per restore() call: keys worker-side caches of opened arrays
    input: str
    input_array: str
    outputs: tuple[tuple[str, str, str], ...]  # (restorer output name, image path, level-0 array path)
    progress: str
    axes: tuple[str, ...]
    shape: tuple[int, ...]
    block: tuple[int, ...]  # write-block size per axis (a multiple of the output chunk/shard)
    grid: Grid  # over the spatial axes
    seed: int
    batch: int
    dtype: str
    fill_nan: bool
    mask: tuple | None  # (path, array path, per-spatial-axis (offset, step) mapping image index -> mask index)
    read_dtype: str = "float32"  # what tiles are read as: "float64" for inputs float32 cannot hold (input_precision)
    progress_group: int = 1  # write-blocks per progress record (blocks.progress_group_for: > 1 only for huge plans)

    @property
    def spatial_axes(self) -> list[int]:
        """Positions of z, y, x among the plan's axes (the grid's axes, in order)."""
        return [d for d, a in enumerate(self.axes) if a in "zyx"]

    @property
    def other_axes(self) -> list[int]:
        """Positions of the other axes (time, channel): restored one index at a time."""
        return [d for d, a in enumerate(self.axes) if a not in "zyx"]



def plan(input, model="identity", level=0, tile=None, overlap=None, batch=4, seed=0, block=None, **model_options):
    """(Plan, RestorerSpec) that restore() would use for these arguments, validated, nothing written (benchmarks)."""
    config = RestoreConfig.validated(input=str(input), output="", model=ModelRef.parse(model, **model_options),
                                     level=level, tile=tile, overlap=overlap, batch=batch, seed=seed, block=block)
    prepared = prepare(config)
    return prepared.plan, prepared.spec


@dataclass(frozen=True)
class Prepared:
    """A validated run: the Plan the tasks get, the restorer spec, the input's metadata and the resolved config
    (every default filled in; recorded in provenance and compared by --resume)."""

    plan: Plan
    spec: RestorerSpec
    info: ngff.ImageInfo
    config: RestoreConfig
    chunks: list[int]  # output chunks over all axes
    shards: list[int] | None
    precision: str | None = None  # why a wide input is read as float32 (input_precision), else None

    def parameters(self) -> dict:
        """The result-defining fields of the resolved config, as JSON values (provenance, --resume), and the
        input's reduced precision when there is one (recorded, not compared: it follows from input and model)."""
        fields = self.config.model_dump(mode="json", include=set(RESULT_FIELDS))
        return {**fields, "input_precision": self.precision} if self.precision else fields


def prepare(config: RestoreConfig) -> Prepared:
    """Validate a RestoreConfig against its input and model and build the Plan; nothing is written."""
    info = ngff.read_info(config.input)
    ngff.check_level(info, config.level)
    spec, noise_fit = _resolve_model(config)
    lvl = info.levels[config.level]
    axes = tuple(info.axis_names)
    spatial = [a for a in axes if a in "zyx"]
    sp_idx = [axes.index(a) for a in spatial]
    grid, tiles, overlap = _tile_grid(config, spec, spatial, [lvl.shape[i] for i in sp_idx])
    chunks_all, shards, blk = _chunks_and_block(config, info, grid, spatial, sp_idx, len(spec.outputs))
    mask_plan = _mask_plan(config.mask, info, config.level, spatial, sp_idx) if config.mask is not None else None
    read_dtype, precision = input_precision(lvl.dtype, spec)
    batch = effective_batch(config.batch, grid)
    resolved = config.model_copy(update={"batch": batch,
        "input": resolved_path(config.input), "mask": resolved_path(config.mask),
        "model": ModelRef(name=spec.name, options=dict(spec.options)), "tile": tiles, "overlap": overlap,
        "chunks": [chunks_all[i] for i in sp_idx], "block": [blk[i] for i in sp_idx]})
    plan = Plan(
        # absolute paths: the workers of a remote or batch cluster do not share this process's folder
        run=uuid.uuid4().hex, input=resolved_path(config.input), input_array=lvl.path, outputs=(),
        progress=os.path.join(os.path.abspath(config.output), PROGRESS_DIR), axes=axes, shape=tuple(lvl.shape),
        block=tuple(blk),
        grid=grid, seed=config.seed, batch=batch,
        dtype="float32" if config.dtype == "float32" else lvl.dtype, fill_nan=config.nan == "fill", mask=mask_plan,
        read_dtype=read_dtype, progress_group=progress_group_for(lvl.shape, blk),
    )
    if noise_fit is not None:  # a one-pass model's blend or a diffusion model's std scale, chosen on this image
        spec = _with_sure(config, spec, plan, noise_fit)
        resolved = resolved.model_copy(update={"model": ModelRef(name=spec.name, options=dict(spec.options))})
    return Prepared(plan, spec, info, resolved, chunks_all, shards, precision)


def effective_batch(batch: int, grid: Grid) -> int:
    """Tiles per restorer call: the asked --batch, at most the tiles of the whole grid.

    Every call is padded to exactly this many tiles (the bitwise contract, see blockwise.tasks), so an uncapped
    `--batch 100000` on a 4-tile volume would allocate 100000 tiles. The cap depends only on the global tile grid,
    never on blocks, chunks or workers, so results stay bitwise equal across them; a capped run equals one asked
    for exactly the grid's tile count. The resolved config (and the run's summary) carry the capped value.
    """
    return max(1, min(int(batch), grid.n_tiles))


# Integer and float types that float32 (24-bit significand) holds exactly; wider ones go through float64.
_FLOAT32_EXACT = {"bool", "uint8", "int8", "uint16", "int16", "float16", "float32"}


def input_precision(dtype: str, spec: RestorerSpec) -> tuple[str, str | None]:
    """(the dtype tiles are read as, a note for provenance or None), decided from the input's dtype, never its data.

    - complex inputs are refused (a restorer would silently drop the imaginary part);
    - inputs float32 holds exactly (8/16-bit integers, float16/32) are read as float32, as always;
    - wider ones (32/64-bit integers, float64) are read as float64 when the restorer class says it takes float64
      tiles (`takes_float64 = True`, e.g. identity: then `--dtype input` round-trips 32-bit integers bit-exactly,
      64-bit ones up to 2**48: above that the float64 blending of overlapping tiles can move a value by one);
    - any other restorer (the networks, gaussian, ...) needs float32: it gets the input rounded to float32 (relative
      precision 6e-8, below any restoration's error) and the output's provenance records why ("input_precision").
    """
    kind = np.dtype(dtype)
    if np.issubdtype(kind, np.complexfloating):
        raise UserError(f"the input's data type {kind} is complex; restore its real part or magnitude instead "
                        "(e.g. convert them into a float32 image)")
    if kind.name in _FLOAT32_EXACT:
        return "float32", None
    if getattr(spec.restorer, "takes_float64", False):
        return "float64", None
    return "float32", (f"input {kind.name} read as float32 (24-bit significand): model {spec.name} takes float32 "
                       "tiles")


def _resolve_model(config: RestoreConfig) -> tuple[RestorerSpec, tuple[float, float] | None]:
    """The restorer spec with what it measures on the image filled in (intensity range for --normalise image, noise
    level for a noise-conditioned model), and the image's noise fit (gain, intercept: metrics.shot_noise_fit, and the
    photons at its bright intensity) when SURE is still to choose the blend weights or std scale (blockwise.sure), else
    None."""
    spec = registry.resolve(config.model)
    options = dict(spec.options)
    wants_range = options.get("normalise") == "image" and options.get("input_range") is None
    wants_photons = "photons" in options and options["photons"] is None  # a model conditioned on the noise level
    wants_fit = any(key in options and options[key] is None for key in ("blend", "std_scale"))
    if not (wants_range or wants_photons or wants_fit):
        return spec, None
    # The model adapts to this image's intensities (and noise): measure them once, record them (provenance, --resume
    # compares them).
    # The noise fit costs a pass over the sampled voxels: only for a model that uses it.
    background, bright, *fit = input_range(config.input, config.level, noise=wants_photons or wants_fit)
    measured = {"normalise": "image", "input_range": (background, bright)} if wants_range else {}
    photons = photons_at(*fit, bright) if fit else math.nan
    if wants_photons:
        if not photons > 0 or math.isinf(photons):
            raise UserError(f"cannot measure the noise level of {config.input} (no shot noise seen): give it "
                            "with --photons N (photons at its bright intensity)")
        measured["photons"] = round(photons, 3)
    if measured:
        spec = registry.resolve(config.model.with_options(**measured))
    return spec, ((*fit, photons) if wants_fit else None)


def _with_sure(config: RestoreConfig, spec: RestorerSpec, plan: Plan, fit) -> RestorerSpec:
    """The spec with what SURE chooses on sampled tiles (blockwise.sure), run here on the client: a one-pass model's
    blend weights, or the factor and floor of a diffusion model's std."""
    from volrestore.blockwise import sure

    options = {k: v for k, v in spec.options if k in ("normalise", "input_range", "photons")}
    base = config.model.with_options(**options)
    gain, intercept, photons = fit
    if dict(spec.options).get("std_scale", 0) is None:
        scale = sure.std_scale(plan, registry.resolve(base.with_options(std_scale="off")), (gain, intercept),
                               config.seed)
        return registry.resolve(base.with_options(std_scale=list(scale)))
    weights = sure.blend_weights(plan, registry.resolve(base.with_options(blend="off")), (gain, intercept), photons,
                                 config.seed)
    return registry.resolve(base.with_options(blend=list(weights)))


def _tile_grid(config: RestoreConfig, spec: RestorerSpec, spatial: list[str], sp_shape: list[int]):
    """(Grid, tile per spatial axis, overlap). A 2D restorer works slice-wise (z tile 1, no z overlap)."""
    r_axes = ["z", "y", "x"][3 - spec.spatial_dims :]
    if spec.spatial_dims == 3 and "z" not in spatial:
        raise UserError(f"model {spec.name} is 3D but {config.input} has no z axis; use a 2D model (e.g. dims=2)")
    tile = list(spec.default_tile if config.tile is None else config.tile)
    if spec.spatial_dims == 2 and len(tile) == 3:
        if tile[0] != 1:
            raise UserError(f"model {spec.name} is 2D: give --tile 1 Y X (or Y X), not a z size of {tile[0]}")
        tile = tile[1:]
    if len(tile) != spec.spatial_dims:
        raise UserError(f"--tile needs {spec.spatial_dims} sizes ({' '.join(a.upper() for a in r_axes)}), got {tile}")
    overlap = spec.default_overlap if config.overlap is None else config.overlap
    for a, t in zip(r_axes, tile):
        validate_tile(a, t, overlap, spec.size_multiple, spec.name)
    by_axis = dict(zip(r_axes, tile))
    tiles = [by_axis.get(a, 1) for a in spatial]
    overlaps = [overlap if a in r_axes else 0 for a in spatial]
    multiples = [spec.size_multiple if a in r_axes else 1 for a in spatial]
    contexts = [spec.z_context if (a == "z" and spec.spatial_dims == 2) else 0 for a in spatial]
    return Grid.build(sp_shape, tiles, overlaps, multiples, contexts), tiles, overlap


def _chunks_and_block(config: RestoreConfig, info: ngff.ImageInfo, grid: Grid, spatial, sp_idx, n_outputs: int = 1):
    """(output chunks, output shards or None, write-block), each over all axes. Write-blocks are whole chunks
    (shards), so no two tasks ever write the same chunk; by default they span BLOCK_TARGET_STRIDES tile strides,
    within BLOCK_BUDGET_BYTES of accumulators (`n_outputs` of them)."""
    lvl = info.levels[config.level]
    chunks_all = list(lvl.chunks)
    if config.chunks is not None:
        if len(config.chunks) != len(spatial) or any(c < 1 for c in config.chunks):
            raise UserError(f"--chunks needs {len(spatial)} positive sizes ({' '.join(spatial).upper()}), "
                            f"got {config.chunks}")
        for i, c in zip(sp_idx, config.chunks):
            chunks_all[i] = c
    shards = list(lvl.shards) if (lvl.shards and config.chunks is None and info.version == "0.5") else None
    unit = [min(u, n) for u, n in zip(shards or chunks_all, lvl.shape)]
    blk = list(unit)
    if config.block is None:
        strides = BLOCK_TARGET_STRIDES.get(sum(1 for ax in grid.axes if ax.overlap), 4)
        for d, i in enumerate(sp_idx):
            ax = grid.axes[d]
            if ax.overlap:  # along axes without overlap tiles never straddle blocks: keep one unit
                target = min(lvl.shape[i], strides * ax.stride)
                blk[i] = max(1, -(-target // unit[i])) * unit[i]
        overlapping = [i for d, i in enumerate(sp_idx) if grid.axes[d].overlap]
        while math.prod(blk) * 8 * n_outputs > BLOCK_BUDGET_BYTES:
            shrinkable = [i for i in overlapping if blk[i] > unit[i]]
            if not shrinkable:
                break  # one chunk per overlapping axis: the chunks themselves are that big
            longest = max(shrinkable, key=lambda i: (blk[i], -i))
            blk[longest] -= unit[longest]
        return chunks_all, shards, blk
    if len(config.block) != len(spatial) or any(b < 1 or b % unit[i] for b, i in zip(config.block, sp_idx)):
        raise UserError(f"--block needs {len(spatial)} sizes that are multiples of the output "
                        f"{'shards' if shards else 'chunks'} {[unit[i] for i in sp_idx]}, got {config.block}")
    for b, i in zip(config.block, sp_idx):
        blk[i] = b
    return chunks_all, shards, blk


# The intensity range for --normalise image reads at most this much (float64 voxels: 256 MB), whatever the size.
RANGE_SAMPLE_VOXELS = 32_000_000
RANGE_SAMPLE_SEED = 20261202


def input_range(path, level, max_voxels=None, noise: bool = False) -> tuple[float, ...]:
    """(background, bright) intensities of an image level: the median of its noise-free intensities (the noise
    measured on the same voxels, evaluation.metrics.shot_noise_fit, is deconvolved: metrics.noise_free_median), and
    the 99.9th percentile after a light in-plane smoothing (σ = 1 voxel) so noise does not inflate it; with `noise`,
    also (gain, intercept) of that noise fit. The plain median of a noisy image sat above the clean image's (which the
    shipped model's training units start from) and cost the shipped default 0.1-0.75 dB at 3-30 photons on the quality
    crops, up to 1 dB with the true background (benchmarks/README.md). Reading is
    bounded by max_voxels (default RANGE_SAMPLE_VOXELS): all planes when they fit, else a fixed seeded sample of
    chunks (each read with a 4-voxel in-plane margin so its smoothing matches the whole plane's), so a petabyte
    volume costs the same as a gigabyte."""
    from scipy import ndimage

    array = ngff.open_level(path, level)
    names = ngff.read_info(path).axis_names
    max_voxels = max_voxels or RANGE_SAMPLE_VOXELS
    if array.size <= max_voxels:
        regions = [(tuple(slice(None) for _ in names), tuple(slice(None) for _ in names))]
    else:
        regions = _sampled_chunks(array, names, max_voxels)
    raw, smooth = [], []
    for read, inner in regions:
        values = np.nan_to_num(np.asarray(array[read], np.float64))
        sigma = [1.0 if a in "yx" else 0.0 for a in names]  # in-plane only, as a 2D filter of each plane
        raw.append(values[inner])
        smooth.append(ndimage.gaussian_filter(values, sigma)[inner].ravel())
    fit = shot_noise_fit(raw)
    background = noise_free_median(np.concatenate([r.ravel() for r in raw]), *fit)
    bright = float(np.percentile(np.concatenate(smooth), 99.9))
    if not bright > background:
        raise UserError(f"{path} has no bright structure above its background to normalise by; check the input")
    if noise:
        return (background, bright, *fit)
    return background, bright


def _sampled_chunks(array, names, max_voxels, margin=4) -> list[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """(read region, its chunk inside it) for a seeded sample of chunks, about max_voxels read in all; regions are
    grown by `margin` in y and x so the σ=1 smoothing of each chunk equals that of its whole plane."""
    chunks = array.chunks
    counts = [-(-n // c) for n, c in zip(array.shape, chunks)]
    total = int(np.prod(counts, dtype=np.float64))
    per_chunk = int(np.prod([c + (2 * margin if a in "yx" else 0) for c, a in zip(chunks, names)], dtype=np.float64))
    n = max(1, min(total, max_voxels // max(per_chunk, 1)))
    regions = []
    for f in sorted(int(i) for i in np.random.default_rng(RANGE_SAMPLE_SEED).choice(total, n, replace=False)):
        read, inner = [], []
        for c, k, size, a in zip(np.unravel_index(f, counts), chunks, array.shape, names):
            lo, hi = int(c) * k, min((int(c) + 1) * k, size)
            grow = margin if a in "yx" else 0
            rlo, rhi = max(0, lo - grow), min(size, hi + grow)
            read.append(slice(rlo, rhi))
            inner.append(slice(lo - rlo, hi - rlo))
        regions.append((tuple(read), tuple(inner)))
    return regions


def _mask_plan(mask, info, level, spatial, sp_idx):
    """Map image voxel indices to mask voxel indices; the physical extents must match within one mask voxel."""
    minfo = ngff.read_info(mask)
    if [a for a in minfo.axis_names if a in "zyx"] != spatial:
        raise UserError(f"mask {mask} has spatial axes {minfo.spatial_axes}, the image {spatial}; give a matching mask")
    lvl, mlvl = info.levels[level], minfo.levels[0]
    mapping = []
    for a, i in zip(spatial, sp_idx):
        mi = minfo.axis_names.index(a)
        s, t, n = lvl.scale[i], lvl.translation[i], lvl.shape[i]
        ms, mt, mn = mlvl.scale[mi], mlvl.translation[mi], mlvl.shape[mi]
        lo, hi, mlo, mhi = t - s / 2, t + (n - 0.5) * s, mt - ms / 2, mt + (mn - 0.5) * ms
        if abs(lo - mlo) > ms * 1.001 or abs(hi - mhi) > ms * 1.001:
            raise UserError(
                f"mask {mask} covers {mlo:g}..{mhi:g} on {a} but the image covers {lo:g}..{hi:g}; "
                "give a mask of the same field of view (any pyramid level of it)"
            )
        mapping.append(((t - mt) / ms, s / ms))  # mask index of image voxel i = offset + i * step (rounded)
    return (resolved_path(mask), mlvl.path, tuple(mapping))
