"""Write-blocks of a restore plan: index ranges, boxes, lazy iteration and the per-block progress markers."""

from __future__ import annotations

import itertools
import math
import os


PROGRESS_DIR = ".volrestore-progress"  # inside the output: one empty file per finished write-block



def block_counts(plan):
    return [-(-n // b) for n, b in zip(plan.shape, plan.block)]



def n_blocks(plan) -> int:
    return math.prod(block_counts(plan))



def marker_path(plan, index) -> str:
    """Marker file of a block: <progress>/<i0>_..._<in-2>/<in-1> (one folder per row keeps folders small)."""
    return os.path.join(plan.progress, "_".join(map(str, index[:-1])) or "0", str(index[-1]))



def iter_blocks(plan, skip_done=False):
    """Block indices in order, generated lazily (never a list of all blocks)."""
    for index in itertools.product(*map(range, block_counts(plan))):
        if not (skip_done and os.path.exists(marker_path(plan, index))):
            yield index



def done_markers(plan):
    for root, _, files in os.walk(plan.progress):
        yield from files



def block_box(plan, index):
    return [(i * b, min((i + 1) * b, n)) for i, b, n in zip(index, plan.block, plan.shape)]



def mark_done(plan, index):
    path = marker_path(plan, index)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w"):
        pass
