"""PNG figures: side-by-side slices / orthogonal views / MIPs with shared contrast and a scale bar, metric plots."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from volrestore.io import ngff
from volrestore.errors import UserError


def check_writable(path) -> Path:
    """Fail before any computation when a figure or table cannot be written there."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"cannot write {path}: its folder does not exist or is not writable; choose another path")
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def comparison_boxplot(samples: dict[str, list[float]], metric: str, path, moods=None) -> None:
    """A box plot of each method's per-slice metric (with Mood's median test p-values in the title when given)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(samples), 3.6), dpi=120)
    names = list(samples)
    ax.violinplot([samples[n] for n in names], showextrema=False)
    ax.boxplot([samples[n] for n in names], widths=0.25, showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=20)
    ax.set_ylabel(f"per-slice {metric.upper().replace('_', '-')}")
    if moods:
        text = "\n".join(f"{r['a']} vs {r['b']}: p = {r['p_value']:.2g}" for r in moods[:4])
        ax.set_title("Mood's median test\n" + text, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def reliability_plot(predicted, observed, path) -> None:
    """Observed RMS error against predicted std per bin, with the diagonal a calibrated uncertainty follows."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(3.6, 3.6), dpi=120)
    top = float(np.nanmax([np.nanmax(predicted), np.nanmax(observed)]))
    ax.plot([0, top], [0, top], "k--", lw=1, label="calibrated")
    ax.plot(predicted, observed, "o-", label="restoration")
    ax.set_xlabel("predicted std")
    ax.set_ylabel("observed RMS error")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _volume(path, level, lead_index=None):
    """A lazy (z, y, x) dask array of one t/c index of an image, plus its (z, y, x) voxel size and unit."""
    image = ngff.open_image(path, level=level)
    for dim in ("t", "c"):
        if dim in image.dims:
            image = image.isel({dim: (lead_index or {}).get(dim, 0)})
    info = ngff.read_info(path)
    scale = dict(zip(info.axis_names, info.levels[level].scale))
    unit = next((a.unit for a in info.axes if a.name == "x" and a.unit), None)
    if "z" not in image.dims:
        image = image.expand_dims("z")
    return image.transpose("z", "y", "x").data, [scale.get(a, 1.0) for a in "zyx"], unit


def _scale_bar(ax, width_px, pixel_size, unit):
    """A bar of a round physical length, about a fifth of the panel width."""
    if not unit:
        return
    target = width_px * pixel_size / 5
    length = 10 ** np.floor(np.log10(target))
    for step in (5, 2, 1):
        if step * length <= target:
            length *= step
            break
    px = length / pixel_size
    ax.plot([width_px * 0.95 - px, width_px * 0.95], [0.93, 0.93], transform=ax.get_xaxis_transform(),
            color="white", lw=3, solid_capstyle="butt")
    short = {"micrometer": "µm", "nanometer": "nm", "millimeter": "mm"}.get(unit, unit)
    ax.text(width_px * 0.95 - px / 2, 0.88, f"{length:g} {short}", transform=ax.get_xaxis_transform(),
            color="white", ha="center", va="top", fontsize=7)


def _view_rows(volumes, views, zc):
    """Per image, the 2D planes of every requested view in order; and the views' names."""
    shape = volumes[0][0].shape
    rows, view_names = [[] for _ in volumes], []
    for kind in views:
        view_names += {"slices": [f"z = {zc}"], "ortho": ["xy", "xz", "yz"], "mip": ["MIP z", "MIP y", "MIP x"]}[kind]
        for row, (v, _, _) in zip(rows, volumes):
            if kind == "slices":
                row.append(np.asarray(v[zc], np.float64))
            elif kind == "ortho":
                row += [np.asarray(v[zc], np.float64), np.asarray(v[:, shape[1] // 2, :], np.float64),
                        np.asarray(v[:, :, shape[2] // 2], np.float64)]
            else:
                row += [np.asarray(v.max(axis=a).compute(), np.float64) for a in (0, 1, 2)]
    return rows, view_names


def _panel(ax, img, lo, hi, title, ylabel, aspect="auto"):
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest", aspect=aspect)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=8)


def panels(paths, out, *, level=0, view="slices", z=None, titles=None, zoom=None, percentiles=(0.5, 99.8),
           contrast_from=0, own_contrast=()) -> Path:
    """Draw the same slice (or orthogonal views, or MIPs) of several images side by side with one contrast.

    view: "slices" (z plane), "ortho" (xy, xz, yz through the centre), "mip" (max projections along z, y, x), or
    several of them ("slices,mip" or a list), drawn as rows one after the other.
    contrast_from: index of the image whose percentiles set the shared contrast (e.g. the clean reference).
    own_contrast: indices of images drawn each with their own contrast (e.g. a std image, in other units).
    zoom: optional (y0, y1, x0, x1) region of the first row drawn as an inset row below.
    """
    out = check_writable(out)
    if not paths:
        raise UserError("give at least one image to draw")
    views = view.split(",") if isinstance(view, str) else list(view)
    bad = [v for v in views if v not in ("slices", "ortho", "mip")]
    if bad or not views:
        raise UserError(f"unknown view {','.join(bad) or view!r}; use slices, ortho or mip (or several, comma-separated)")
    volumes = [_volume(p, level) for p in paths]
    shape = volumes[0][0].shape
    for p, (v, _, _) in zip(paths, volumes):
        if v.shape != shape:
            raise UserError(f"{p} has shape {v.shape} but {paths[0]} has {shape}; draw images of the same region")
    zc = shape[0] // 2 if z is None else int(z)
    if not 0 <= zc < shape[0]:
        raise UserError(f"slice z={zc} is outside 0..{shape[0] - 1}; choose another --z")
    if not 0 <= contrast_from < len(paths):
        raise UserError(f"contrast_from={contrast_from} is not an image index 0..{len(paths) - 1}")
    rows, view_names = _view_rows(volumes, views, zc)
    # The yz and MIP-x panels are (z, y): their width runs along y.
    width_axis = [1 if name in ("yz", "MIP x") else 2 for name in view_names]

    def contrast(row):
        return np.percentile(np.concatenate([p.ravel() for p in row]), percentiles)

    shared = contrast(rows[contrast_from])  # one contrast for all panels, so intensities compare directly
    plt = _pyplot()
    ncol, nrow = len(paths), len(rows[0]) + (1 if zoom else 0)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.6 * ncol, 2.6 * nrow), dpi=110, squeeze=False)
    names = titles or [Path(p).name.replace(".ome.zarr", "") for p in paths]
    for j, (row, (_, scale, unit)) in enumerate(zip(rows, volumes)):
        lo, hi = contrast(row) if j in own_contrast else shared
        for i, img in enumerate(row):
            title = (names[j] + (" (own contrast)" if j in own_contrast else "")) if i == 0 else None
            _panel(axes[i][j], img, lo, hi, title, view_names[i] if j == 0 else None)
            _scale_bar(axes[i][j], img.shape[1], scale[width_axis[i]], unit)
        if zoom:
            y0, y1, x0, x1 = zoom
            _panel(axes[-1][j], row[0][y0:y1, x0:x1], lo, hi, None, "zoom" if j == 0 else None, aspect="equal")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
