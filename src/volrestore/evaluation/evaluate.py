"""Evaluate restored OME-Zarr images blockwise (any size): metrics against a reference, method comparison, no-reference checks."""

from __future__ import annotations

import csv
import math
from itertools import product
from pathlib import Path

import numpy as np

from volrestore.evaluation import metrics
from volrestore.io import ngff
from volrestore.errors import UserError

# z-planes read at once per block: memory stays bounded (a slab plus the SSIM margin) whatever the volume size.
DEFAULT_BLOCK_PLANES = 32


class _Image:
    """One OME-Zarr level, viewed as a sequence of 3D (z, y, x) volumes, one per t/c index."""

    def __init__(self, path, level=0, role="image"):
        self.info = ngff.read_info(path)
        if level >= len(self.info.levels):
            raise UserError(f"{path} has {len(self.info.levels)} level(s); choose --level below that")
        self.path, self.role = str(path), role
        self.array = ngff.open_level(path, level)
        names = self.info.axis_names
        missing = [a for a in "yx" if a not in names]
        if missing:
            raise UserError(f"{path} has no {'/'.join(missing)} axis; evaluation needs at least y and x")
        self.names = names
        self.lead = [i for i, n in enumerate(names) if n in "tc"]
        self.space = [i for i, n in enumerate(names) if n in "zyx"]
        self.shape = tuple(self.array.shape[i] for i in self.space)
        lvl = self.info.levels[level]
        self.scale = [lvl.scale[i] for i in self.space]
        self.leads = list(product(*(range(self.array.shape[i]) for i in self.lead)))

    def read(self, lead, z0, z1):
        """float64 (z, y, x) slab [z0, z1) of the volume at a t/c index."""
        index = [slice(None)] * len(self.names)
        for axis, i in zip(self.lead, lead):
            index[axis] = i
        if "z" in self.names:
            index[self.names.index("z")] = slice(z0, z1)
        block = np.asarray(self.array[tuple(index)], dtype=np.float64)
        return block if "z" in self.names else block[None]

    @property
    def depth(self):
        return self.shape[0] if len(self.shape) == 3 else 1


def _match(a: _Image, b: _Image):
    if a.array.shape != b.array.shape:
        raise UserError(
            f"images differ in shape: {a.path} is {a.array.shape} and {b.path} is {b.array.shape}; "
            "compare images of the same region and level"
        )
    if not np.allclose(a.scale, b.scale, rtol=1e-6):
        raise UserError(
            f"images differ in voxel size: {a.path} has {a.scale} and {b.path} has {b.scale}; "
            "compare images at the same physical scale"
        )


def _slabs(depth, planes, margin=0):
    """(read_lo, read_hi, keep_lo, keep_hi) z ranges: keep [keep_lo, keep_hi), read it with `margin` planes around."""
    for z0 in range(0, depth, planes):
        z1 = min(depth, z0 + planes)
        yield max(0, z0 - margin), min(depth, z1 + margin), z0, z1


def _reference_range(ref: _Image, planes: int, mode: str):
    """(offset, scale) mapping the reference to [0, 1], computed blockwise (two passes for percentiles)."""

    def blocks():
        for lead in ref.leads:
            for r0, r1, _, _ in _slabs(ref.depth, planes):
                yield ref.read(lead, r0, r1)

    lo, hi, (p_lo, p_hi) = metrics.blockwise_percentiles(blocks)
    if not hi > lo:
        raise UserError(f"reference {ref.path} has no dynamic range (all voxels are {lo}); give a real reference")
    if mode == "raw":
        return lo, hi - lo
    if not p_hi > p_lo:
        raise UserError(f"reference {ref.path} has no dynamic range between its 0.1 and 99.9 percentiles; use --range raw")
    return p_lo, p_hi - p_lo


def evaluate(pred, ref, *, mask=None, level=0, mode="percentile", std=None, per_slice_csv=None,
             block_planes=DEFAULT_BLOCK_PLANES, ms_ssim=True) -> dict:
    """Metrics of PRED against REF, computed blockwise so that any size fits in memory.

    Returns PSNR/SSIM(3D)/NRMSE/MAE over the whole image, the per-slice (2D) PSNR/SSIM/MS-SSIM distributions,
    and, with `std`, the share of voxels within 2·std of the reference (uncertainty calibration).
    """
    if mode not in ("percentile", "raw"):
        raise UserError(f"unknown range rule {mode!r}; use percentile or raw")
    p_img, r_img = _Image(pred, level, "prediction"), _Image(ref, level, "reference")
    _match(p_img, r_img)
    m_img = s_img = None
    if mask is not None:
        m_img = _Image(mask, level, "mask")
        if m_img.array.shape != r_img.array.shape:
            raise UserError(
                f"mask {mask} has shape {m_img.array.shape} but the images have {r_img.array.shape}; "
                "give a mask of the same level and region"
            )
    if std is not None:
        s_img = _Image(std, level, "std")
        _match(s_img, r_img)
    offset, scale = _reference_range(r_img, block_planes, mode)

    sse = sae = ref_sq = 0.0
    count = 0
    ssim_sum, ssim_n = 0.0, 0
    covered, cov_n = 0, 0
    rows = []
    three_d = len(r_img.shape) == 3 and min(r_img.shape) >= 2 * metrics.SSIM_MARGIN + 1
    margin = metrics.SSIM_MARGIN if three_d else 0
    block_planes = max(block_planes, 2 * margin + 1)  # every slab read must hold one whole SSIM window
    for lead in r_img.leads:
        depth = r_img.depth
        for r0, r1, k0, k1 in _slabs(depth, block_planes, margin):
            p = (p_img.read(lead, r0, r1) - offset) / scale
            r = (r_img.read(lead, r0, r1) - offset) / scale
            keep = slice(k0 - r0, k1 - r0)
            pk, rk = p[keep], r[keep]
            sel = m_img.read(lead, k0, k1) > 0 if m_img is not None else np.ones(pk.shape, bool)
            diff = pk - rk
            sse += float(np.sum(diff[sel] ** 2))
            sae += float(np.sum(np.abs(diff[sel])))
            ref_sq += float(np.sum(rk[sel] ** 2))
            count += int(sel.sum())
            if s_img is not None:
                s = s_img.read(lead, k0, k1) / scale
                covered += int(np.sum((np.abs(diff) <= 2 * s)[sel]))
                cov_n += int(sel.sum())
            # 3D SSIM: the map needs `margin` planes of context; skimage crops `margin` at every border.
            if three_d:
                full = metrics.ssim_map(p, r)[keep]
                zs = np.arange(k0, k1)
                zsel = (zs >= margin) & (zs < depth - margin)
                inner = full[zsel][:, margin:-margin, margin:-margin]
                ssim_sum += float(inner.sum(dtype=np.float64))
                ssim_n += inner.size
            for j in range(pk.shape[0]):
                row = {"lead": list(lead), "z": k0 + j}
                mse = float(np.mean((pk[j] - rk[j]) ** 2))
                row["psnr"] = metrics.psnr_from_mse(mse)
                m2 = metrics.ssim_map(pk[j], rk[j])
                crop = tuple(slice(metrics.SSIM_MARGIN, max(metrics.SSIM_MARGIN, n - metrics.SSIM_MARGIN)) for n in m2.shape)
                row["ssim"] = float(m2[crop].mean(dtype=np.float64))
                if ms_ssim:
                    row["ms_ssim"] = metrics.ms_ssim_2d(pk[j], rk[j], 0.0, 1.0)
                rows.append(row)
    if count == 0:
        raise UserError(f"mask {mask} selects no voxel; give a mask with foreground")
    result = {
        "prediction": str(pred),
        "reference": str(ref),
        "range_rule": mode,
        "normalisation": {"offset": offset, "scale": scale},
        "voxels": count,
        "psnr": metrics.psnr_from_mse(sse / count),
        "nrmse": math.sqrt(sse) / math.sqrt(ref_sq) if ref_sq else float("nan"),
        "mae": sae / count * scale,  # in the reference's intensity units
        "ssim_3d": ssim_sum / ssim_n if ssim_n else None,
    }
    for key in ("psnr", "ssim", "ms_ssim"):
        values = np.array([row[key] for row in rows if key in row], np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            result[f"slice_{key}_median"] = float(np.median(values))
            result[f"slice_{key}_mean"] = float(np.mean(values))
    if s_img is not None:
        result["calibration_2std"] = covered / cov_n
    result["seam_ratio"] = seam_check(pred, level=level)
    if per_slice_csv:
        write_rows(per_slice_csv, rows)
    result["slices"] = rows
    return result


def write_rows(path, rows):
    path = Path(path)
    try:
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                writer.writerow({**row, "lead": "/".join(map(str, row["lead"]))})
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}; choose a writable path") from None


def compare(methods: dict[str, str], reference, *, level=0, metric="psnr", mode="percentile",
            block_planes=DEFAULT_BLOCK_PLANES) -> dict:
    """Per-slice metric distributions of several methods against one reference, with Mood's median test per pair."""
    if len(methods) < 2:
        raise UserError("--compare needs at least two methods; give two or more restored images")
    results = {
        name: evaluate(path, reference, level=level, mode=mode, block_planes=block_planes, ms_ssim=metric == "ms_ssim")
        for name, path in methods.items()
    }
    samples = {name: np.array([row[metric] for row in r["slices"]]) for name, r in results.items()}
    return {
        "metric": metric,
        "reference": str(reference),
        "summary": {name: {k: v for k, v in r.items() if k != "slices"} for name, r in results.items()},
        "samples": {k: v.tolist() for k, v in samples.items()},
        "moods_test": metrics.moods_median_test(samples),
    }


def no_reference(restored, raw, *, level=0, block_planes=DEFAULT_BLOCK_PLANES) -> dict:
    """Checks without ground truth: residual (raw − restored) whiteness and mean–variance; time-point agreement."""
    out_img, raw_img = _Image(restored, level, "restored"), _Image(raw, level, "input")
    _match(out_img, raw_img)
    # Whiteness and mean-variance on a bounded sample: the central slab of the first t/c index.
    lead = raw_img.leads[0]
    z0 = max(0, raw_img.depth // 2 - block_planes // 2)
    z1 = min(raw_img.depth, z0 + block_planes)
    restored_block, raw_block = out_img.read(lead, z0, z1), raw_img.read(lead, z0, z1)
    residual = raw_block - restored_block
    axes = ["z", "y", "x"] if residual.shape[0] > 1 else ["y", "x"]
    offset = 3 - len(axes)
    whiteness = {a: metrics.lag1_autocorrelation(residual, i + offset) for i, a in enumerate(axes)}
    raw_white = {a: metrics.lag1_autocorrelation(raw_block - raw_block.mean(), i + offset) for i, a in enumerate(axes)}
    means, variances = metrics.mean_variance(restored_block, residual)
    result = {
        "residual_lag1_autocorrelation": whiteness,
        "input_lag1_autocorrelation": raw_white,
        "residual_mean": float(residual.mean()),
        "residual_mean_variance": {"mean": means.tolist(), "variance": variances.tolist()},
    }
    result["seam_ratio"] = seam_check(restored, level=level)
    if "t" in raw_img.names and raw_img.array.shape[raw_img.names.index("t")] > 1:
        result["neighbour_frames"] = _frame_agreement(out_img, raw_img, z0, z1)
    return result


def _frame_agreement(out_img: _Image, raw_img: _Image, z0, z1) -> dict:
    """Mean correlation between consecutive time points, before (input) and after (restored) restoration."""
    t_axis = raw_img.lead.index(raw_img.names.index("t"))
    by_t = {}
    for lead in raw_img.leads:
        if all(v == 0 for i, v in enumerate(lead) if i != t_axis):
            by_t[lead[t_axis]] = lead

    def corr(img):
        values = []
        frames = [img.read(by_t[t], z0, z1).ravel() for t in sorted(by_t)]
        for a, b in zip(frames, frames[1:]):
            values.append(float(np.corrcoef(a, b)[0, 1]))
        return float(np.mean(values))

    return {"input_correlation": corr(raw_img), "restored_correlation": corr(out_img)}


def reliability(pred, std, ref, *, level=0, max_voxels=2_000_000):
    """Reliability curve (mean predicted std vs RMS error per std bin) on an evenly strided voxel sample."""
    arrays = []
    for path in (pred, std, ref):
        array = ngff.open_level(path, level)
        arrays.append(np.asarray(array) if array.size <= max_voxels else _strided(array, max_voxels))
    return metrics.reliability_curve(*arrays)


def _strided(array, max_voxels):
    step = int(np.ceil((np.prod(array.shape) / max_voxels) ** (1 / array.ndim)))
    return np.asarray(array[tuple(slice(None, None, step) for _ in array.shape)])


def seam_check(restored, *, level=0, max_planes=64) -> float | None:
    """Gradient energy across the engine's tile borders ÷ elsewhere (≈ 1: no seams), on a central slab.

    The tile grid comes from the image's volrestore provenance; None when the image has none (not written by
    `volrestore restore`) or a level other than the one restored is asked for.
    """
    from volrestore.blockwise.grid import AxisGrid, fitted_tile

    image = _Image(restored, level, "restored")
    params = (image.info.provenance or {}).get("parameters", {})
    if "tile" not in params or level != params.get("level", 0) or level != 0:
        return None
    spatial = [n for n in image.names if n in "zyx"]
    tile = list(params["tile"])
    tile = [1] * (len(spatial) - len(tile)) + tile  # 2D restorers record (y, x) tiles: z tiles are single planes
    overlap = params.get("overlap", 0)
    overlap = [overlap] * len(spatial) if isinstance(overlap, int) else [0] * (len(spatial) - len(overlap)) + list(overlap)
    z0 = max(0, image.depth // 2 - max_planes // 2)
    z1 = min(image.depth, z0 + max_planes)
    block = image.read(image.leads[0], z0, z1)
    borders = {}
    shape3 = image.shape if len(image.shape) == 3 else (1, *image.shape)
    for axis, (n, t, o) in enumerate(zip(shape3[-len(spatial):], tile, overlap)):
        grid = AxisGrid(n, fitted_tile(n, t, o, 1), o)
        edges = set()
        for k in range(grid.count):
            for p in (grid.start(k), grid.start(k) + grid.tile, grid.start(k) + o, grid.start(k) + grid.tile - o):
                if 0 < p < n:
                    edges.add(p)
        axis3 = axis + 3 - len(spatial)
        if axis3 == 0:
            edges = {p - z0 for p in edges if z0 < p < z1}
        if edges and block.shape[axis3] > 1 and t > 1:  # single-plane tiles (2D restorers): every step is a border
            borders[axis3] = sorted(edges)
    ratio = metrics.seam_ratio(block, borders) if borders else None
    return None if ratio is None or not math.isfinite(ratio) else ratio
