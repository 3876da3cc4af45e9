"""Evaluate restored OME-Zarr images blockwise (any size): metrics against a reference, method comparison, no-reference checks."""

from __future__ import annotations

import csv
import math
import uuid
from dataclasses import dataclass
from functools import lru_cache, partial
from itertools import product
from pathlib import Path

import numpy as np

from volrestore.blockwise.blocks import grid_blocks, grid_size
from volrestore.blockwise.runner import run_blockwise
from volrestore.cluster.client import connect
from volrestore.config import resolved_path
from volrestore.evaluation import metrics
from volrestore.io import ngff
from volrestore.errors import UserError

# z-planes read at once per block: memory stays bounded (a slab plus the SSIM margin) whatever the volume size.
DEFAULT_BLOCK_PLANES = 32


class _Image:
    """One OME-Zarr level, viewed as a sequence of 3D (z, y, x) volumes, one per t/c index."""

    def __init__(self, path, level=0, role="image"):
        self.info = ngff.read_info(path)
        ngff.check_level(self.info, level)  # negative levels too: -1 would silently mean the smallest one
        self.path, self.level, self.role = str(path), level, role
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

    def slab_grid(self, planes):
        """(shape, block) of the grid of slabs over (t/c..., z): one t/c index and `planes` z planes per slab."""
        leads = tuple(self.array.shape[i] for i in self.lead)
        return (*leads, self.depth), (1,) * len(leads) + (planes,)

    def slabs(self, planes, margin=0):
        """Slab Blocks in volume order, lazily: write = the planes a slab owns, read = those and `margin` around."""
        shape, block = self.slab_grid(planes)
        return grid_blocks(shape, block, (0,) * (len(shape) - 1) + (margin,))


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


@lru_cache(maxsize=16)
def _opened(run, path, level, role) -> _Image:
    """An image opened once per process and evaluation (the run id keeps a rewritten image from a stale handle)."""
    return _Image(path, level, role)


def _slab(block):
    """(t/c index, (read z0, z1), (keep z0, z1)) of a slab Block."""
    return block.origin[:-1], block.read[-1], block.write[-1]


def _read_slab(run, path, level, role, block) -> np.ndarray:
    lead, (r0, r1), _ = _slab(block)
    return _opened(run, path, level, role).read(lead, r0, r1)


def _reference_range(ref: _Image, planes: int, mode: str, run: str, client=None, progress=False):
    """(offset, scale) mapping the reference to [0, 1], computed blockwise (two passes for percentiles)."""
    lo, hi, (p_lo, p_hi) = metrics.run_percentiles(
        partial(_read_slab, run, ref.path, ref.level, ref.role), lambda: ref.slabs(planes), client=client,
        progress=progress, what="the reference", total=grid_size(*ref.slab_grid(planes)))
    if not hi > lo:
        raise UserError(f"reference {ref.path} has no dynamic range (all voxels are {lo}); give a real reference")
    if mode == "raw":
        return lo, hi - lo
    if not p_hi > p_lo:
        raise UserError(f"reference {ref.path} has no dynamic range between its 0.1 and 99.9 percentiles; use --range raw")
    return p_lo, p_hi - p_lo


def _open_inputs(pred, ref, mask, std, level):
    """(prediction, reference, mask or None, std or None) images, checked against each other before any work."""
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
    return p_img, r_img, m_img, s_img


def evaluate(pred, ref, *, mask=None, level=0, mode="percentile", std=None, per_slice_csv=None,
             block_planes=DEFAULT_BLOCK_PLANES, ms_ssim=True, cluster=None, workers=None, progress=False,
             echo=print) -> dict:
    """Metrics of PRED against REF, computed blockwise (one task per slab of z planes) so any size fits in memory.

    Returns PSNR/SSIM(3D)/NRMSE/MAE over the whole image, the per-slice (2D) PSNR/SSIM/MS-SSIM distributions,
    and, with `std`, the share of voxels within 2·std of the reference (uncertainty calibration). `cluster`: None
    runs the slab tasks in threads here; "local", "tcp://host:port" or a Client run them on Dask. Slab results are
    added up in slab order, so the numbers do not depend on where or in which order the tasks ran.
    """
    if mode not in ("percentile", "raw"):
        raise UserError(f"unknown range rule {mode!r}; use percentile or raw")
    # absolute paths: the workers of a remote or batch cluster do not share this process's folder
    p_img, r_img, m_img, s_img = _open_inputs(*map(resolved_path, (pred, ref, mask, std)), level)
    run = uuid.uuid4().hex
    with connect(cluster, workers, echo=echo) as client:
        offset, scale = _reference_range(r_img, block_planes, mode, run, client, progress)
        three_d = len(r_img.shape) == 3 and min(r_img.shape) >= 2 * metrics.SSIM_MARGIN + 1
        margin = metrics.SSIM_MARGIN if three_d else 0
        block_planes = max(block_planes, 2 * margin + 1)  # every slab read must hold one whole SSIM window
        job = SlabJob(run, level, p_img.path, r_img.path, m_img and m_img.path, s_img and s_img.path, offset, scale,
                      three_d, margin, r_img.depth, ms_ssim)
        parts = {}
        run_blockwise(client, slab_metrics, r_img.slabs(block_planes, margin), args=(job,),
                      on_result=lambda block, part: parts.update({block.index: part}), progress=progress,
                      what="evaluating", total=grid_size(*r_img.slab_grid(block_planes)))
    result = {"prediction": str(pred), "reference": str(ref), "range_rule": mode,
              "normalisation": {"offset": offset, "scale": scale}}
    rows = _combine([parts[index] for index in sorted(parts)], result, scale, mask, s_img is not None)
    result["seam_ratio"] = seam_check(pred, level=level)
    if per_slice_csv:
        write_rows(per_slice_csv, rows)
    result["slices"] = rows
    return result


@dataclass(frozen=True)
class SlabJob:
    """What a slab_metrics task needs besides its slab (small, sent with each task)."""

    run: str
    level: int
    pred: str
    ref: str
    mask: str | None
    std: str | None
    offset: float  # the reference normalisation: (x - offset) / scale
    scale: float
    three_d: bool  # also the 3D SSIM map, which needs `margin` planes of context around a slab
    margin: int
    depth: int
    ms_ssim: bool


def slab_metrics(job: SlabJob, block) -> dict:
    """One slab's partial sums (squared/absolute errors, voxels, 2·std coverage, 3D SSIM) and per-slice rows."""
    lead, (r0, r1), (k0, k1) = _slab(block)
    p = (_opened(job.run, job.pred, job.level, "prediction").read(lead, r0, r1) - job.offset) / job.scale
    r = (_opened(job.run, job.ref, job.level, "reference").read(lead, r0, r1) - job.offset) / job.scale
    keep = slice(k0 - r0, k1 - r0)
    pk, rk = p[keep], r[keep]
    mask = _opened(job.run, job.mask, job.level, "mask") if job.mask is not None else None
    sel = mask.read(lead, k0, k1) > 0 if mask is not None else np.ones(pk.shape, bool)
    diff = pk - rk
    part = {"sse": float(np.sum(diff[sel] ** 2)), "sae": float(np.sum(np.abs(diff[sel]))),
            "ref_sq": float(np.sum(rk[sel] ** 2)), "count": int(sel.sum()), "covered": 0, "cov_n": 0,
            "ssim_sum": 0.0, "ssim_n": 0}
    if job.std is not None:
        s = _opened(job.run, job.std, job.level, "std").read(lead, k0, k1) / job.scale
        part["covered"], part["cov_n"] = int(np.sum((np.abs(diff) <= 2 * s)[sel])), int(sel.sum())
    # 3D SSIM: the map needs `margin` planes of context; skimage crops `margin` at every border.
    if job.three_d:
        full = metrics.ssim_map(p, r)[keep]
        zs = np.arange(k0, k1)
        zsel = (zs >= job.margin) & (zs < job.depth - job.margin)
        inner = full[zsel][:, job.margin:-job.margin, job.margin:-job.margin]
        part["ssim_sum"], part["ssim_n"] = float(inner.sum(dtype=np.float64)), inner.size
    part["rows"] = [_slice_row(lead, k0 + j, pk[j], rk[j], job.ms_ssim) for j in range(pk.shape[0])]
    return part


def _slice_row(lead, z, pk, rk, ms_ssim) -> dict:
    """Per-slice (2D) PSNR, SSIM and optionally MS-SSIM of one z plane."""
    row = {"lead": list(lead), "z": z}
    mse = float(np.mean((pk - rk) ** 2))
    row["psnr"] = metrics.psnr_from_mse(mse)
    m2 = metrics.ssim_map(pk, rk)
    crop = tuple(slice(metrics.SSIM_MARGIN, max(metrics.SSIM_MARGIN, n - metrics.SSIM_MARGIN)) for n in m2.shape)
    row["ssim"] = float(m2[crop].mean(dtype=np.float64))
    if ms_ssim:
        row["ms_ssim"] = metrics.ms_ssim_2d(pk, rk, 0.0, 1.0)
    return row


def _combine(parts, result, scale, mask, calibrate) -> list[dict]:
    """Add the slab results (in slab order: float sums are then those of one serial pass) into `result`;
    return the per-slice rows."""
    sse = sae = ref_sq = ssim_sum = 0.0
    count = covered = cov_n = ssim_n = 0
    rows = []
    for part in parts:
        sse += part["sse"]
        sae += part["sae"]
        ref_sq += part["ref_sq"]
        count += part["count"]
        covered += part["covered"]
        cov_n += part["cov_n"]
        ssim_sum += part["ssim_sum"]
        ssim_n += part["ssim_n"]
        rows.extend(part["rows"])
    if count == 0:
        raise UserError(f"mask {mask} selects no voxel; give a mask with foreground")
    result.update({
        "voxels": count,
        "psnr": metrics.psnr_from_mse(sse / count),
        "nrmse": math.sqrt(sse) / math.sqrt(ref_sq) if ref_sq else float("nan"),
        "mae": sae / count * scale,  # in the reference's intensity units
        "ssim_3d": ssim_sum / ssim_n if ssim_n else None,
    })
    for key in ("psnr", "ssim", "ms_ssim"):
        values = np.array([row[key] for row in rows if key in row], np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            result[f"slice_{key}_median"] = float(np.median(values))
            result[f"slice_{key}_mean"] = float(np.mean(values))
    if calibrate:
        result["calibration_2std"] = covered / cov_n
    return rows


def write_rows(path, rows):
    """Write per-slice metric rows as CSV (lead indices joined by '/'); UserError when the path is not writable."""
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
            block_planes=DEFAULT_BLOCK_PLANES, cluster=None, workers=None, progress=False, echo=print) -> dict:
    """Per-slice metric distributions of several methods against one reference, with Mood's median test per pair;
    every method is evaluated on the same `cluster` (see evaluate)."""
    if len(methods) < 2:
        raise UserError("--compare needs at least two methods; give two or more restored images")
    with connect(cluster, workers, echo=echo) as client:
        results = {
            name: evaluate(path, reference, level=level, mode=mode, block_planes=block_planes,
                           ms_ssim=metric == "ms_ssim", cluster=client, progress=progress)
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
