"""The Restorer interface (what the blockwise engine calls), RestorerSpec (how a worker builds one) and the worker
plugin that builds it once per worker process."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from distributed.diagnostics.plugin import WorkerPlugin


class Restorer(Protocol):
    """Restores a batch of tiles.

    `__call__(tiles, origins, seed)` gets float32 tiles (B, *tile) — for a 2.5D model (z_context > 0) (B, 1 + 2·c, Y, X)
    with c neighbouring z-slices on each side — their global origins (one tuple per tile, over all axes of the image)
    and the run's seed, and returns {output name: float32 array (B, *spatial tile)} for every name in `outputs`. A tile's
    result must depend only on its own data, origin and the seed (never on the other tiles of the batch), so outputs
    stay bitwise identical whatever the blocks, chunks, workers or restarts.
    """

    spatial_dims: int  # 2: tiles are single z-slices (B, Y, X); 3: (B, Z, Y, X)
    size_multiple: int  # every tile size must be a multiple of this (the network's pooling)
    outputs: tuple[str, ...]  # ("mean",) or ("mean", "std")
    z_context: int  # 2D restorers only: neighbouring slices per side that come with every tile

    def __call__(self, tiles: np.ndarray, origins: list[tuple[int, ...]], seed: int) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class RestorerSpec:
    """What a worker needs to build a restorer: small, hashable and picklable (tasks carry it, never a model).

    `restorer` is the class; a worker builds `restorer(**options, **extras)`. `options` define the result and are
    recorded in provenance (and compared by --resume); `extras` are what building needs without changing the result
    (a checkpoint's path, the device, torch.compile). The other fields let the client plan tiles and outputs
    without building anything.
    """

    name: str
    restorer: type
    options: tuple[tuple[str, object], ...] = ()
    extras: tuple[tuple[str, object], ...] = ()
    spatial_dims: int = 3
    size_multiple: int = 1
    outputs: tuple[str, ...] = ("mean",)
    default_tile: tuple[int, ...] = (64, 64, 64)
    default_overlap: int = 8
    z_context: int = 0  # see Restorer.z_context

    def build(self) -> Restorer:
        """A new restorer for this spec (workers keep theirs in BuildRestorer; see `restorer_for`)."""
        return self.restorer(**dict(self.options), **dict(self.extras))

    @property
    def parameters(self) -> dict:
        """The result-defining parameters, for provenance and the --resume check."""
        return {"model": self.name, **dict(self.options)}

    @property
    def plugin_name(self) -> str:
        return "volrestore-restorer-" + hashlib.sha1(repr(self).encode()).hexdigest()[:16]


class BuildRestorer(WorkerPlugin):
    """Builds the restorer as each worker starts or joins (restarted ones too), so no task pays the model load; the
    worker keeps it in this plugin for as long as it lives."""

    idempotent = True

    def __init__(self, spec: RestorerSpec):
        self.spec, self.name, self.restorer = spec, spec.plugin_name, None

    def setup(self, worker):
        self.restorer = self.spec.build()

    def __getstate__(self):  # ship the spec, never a built model
        return {"spec": self.spec, "name": self.name, "restorer": None}


_LOCAL_RESTORER: dict = {}
_LOCAL_LOCK = threading.Lock()


def restorer_for(spec: RestorerSpec) -> Restorer:
    """The restorer this worker built for `spec` (BuildRestorer); outside a worker (a run without a cluster, whose
    block tasks are threads of this process) the one this process built last for the same spec; else a new one."""
    from distributed import get_worker

    try:
        plugin = get_worker().plugins.get(spec.plugin_name)
    except ValueError:  # not inside a Dask worker
        with _LOCAL_LOCK:
            if spec.plugin_name not in _LOCAL_RESTORER:
                _LOCAL_RESTORER.clear()  # one model at a time: a process restoring with another spec drops the old
                _LOCAL_RESTORER[spec.plugin_name] = spec.build()
            return _LOCAL_RESTORER[spec.plugin_name]
    if plugin is None:
        return spec.build()
    if plugin.restorer is None:
        plugin.restorer = spec.build()
    return plugin.restorer
