"""Memory of one restorer call, measured on a worker before anything is written: a tile that cannot fit is refused
with the largest one that does, and --batch is capped to what fits.

A network's activations grow linearly with the voxels of its input (convolutions, no global operation), so one
forward on a probe tile of about an eighth of the real one, on the worker's own device, gives the bytes per voxel and
sample. On CUDA the allocator's peak is exact; on a CPU, LiveBytes follows every tensor the forward allocates."""

from __future__ import annotations

import math
import weakref

# Sampler state beside the network's activations: x, x0, the noise and the solver's history, float32 per sample.
SAMPLER_BYTES_PER_VOXEL = 8 * 4
# Share of the device's memory (CUDA) or of the worker's memory limit (CPU, where Dask's nanny kills a worker at 95 %)
# one restorer call may take: the rest is the input region, the float64 blend accumulators, the output buffers and the
# allocator's fragmentation.
USABLE_SHARE = 0.8
# On a CPU worker whose heap keeps freed memory (cluster.client.keep_freed_memory), resident memory grows this much
# more over a call than with the default allocator (measured 1.46×, small-2.5d, 4 tiles of 512²): the call gets a
# correspondingly smaller share.
KEPT_HEAP_GROWTH = 1.5
PROBE_VOXELS = 2**16


class LiveBytes:
    """Peak bytes of the tensors alive during a block of torch code on the CPU (a TorchDispatchMode over every op:
    each new storage counts from the op that made it until its last tensor is gone)."""

    def __enter__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        meter = self
        self.live = self.peak = 0
        self._owners: dict[int, int] = {}

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in (out if isinstance(out, (tuple, list)) else (out,)):
                    if isinstance(t, torch.Tensor) and not t.is_meta:
                        meter._count(t)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def _count(self, tensor):
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._owners:  # a view or an in-place result: its storage is counted already
            return
        self._owners[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self._free, key)

    def _free(self, key):
        self.live -= self._owners.pop(key, 0)

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


def probe(spec, tile: tuple[int, ...]) -> dict:
    """Worker task: {"fixed", "per_voxel": bytes of a restorer call on tiles of `tile` (spatial; per voxel of one
    tile, all its samples, see call_bytes), "capacity": the bytes a call may use, "device": where it runs}, for a
    restorer with a network (`forward_bytes`)."""
    from volrestore.cluster.client import freed_memory_kept
    from volrestore.model.restorer import restorer_for

    restorer = restorer_for(spec)
    measure = restorer.forward_bytes
    multiple = restorer.size_multiple
    # Two probes (the tile shrunk by f and 2f per axis, f >= 2 the smallest that keeps the bigger probe within
    # PROBE_VOXELS, so a huge tile costs no more to check than a default one) fit the fixed part (normalised weights,
    # embeddings) and the bytes per voxel; measured on the default model: 128² and 256² predict 512² within 0.1 %.
    factor = 2
    while math.prod(_shrunk(tile, factor, multiple)) > PROBE_VOXELS and factor < max(tile):
        factor *= 2
    half, quarter = (_shrunk(tile, f, multiple) for f in (factor, 2 * factor))
    big, small = measure(half), measure(quarter)
    dv = math.prod(half) - math.prod(quarter)
    slope = (big - small) / dv if dv > 0 else big / math.prod(half)
    fixed = max(0.0, big - slope * math.prod(half))
    samples = getattr(restorer, "samples", 1)
    per_voxel = (slope + SAMPLER_BYTES_PER_VOXEL) * samples
    device = str(getattr(restorer, "device", "cpu"))
    share = USABLE_SHARE / (KEPT_HEAP_GROWTH if device == "cpu" and freed_memory_kept() else 1.0)
    return {"per_voxel": per_voxel, "fixed": fixed, "capacity": share * _capacity(device), "device": device}


def call_bytes(measured: dict, tile: tuple[int, ...], batch: int = 1) -> float:
    """Bytes of one restorer call of `batch` tiles of `tile`, from probe's measurement."""
    return measured["fixed"] + measured["per_voxel"] * math.prod(tile) * batch


def largest_batch(measured: dict, tile: tuple[int, ...]) -> int:
    """The most tiles of `tile` one call may hold within the measured capacity (at least 1)."""
    return max(1, int((measured["capacity"] - measured["fixed"]) // (measured["per_voxel"] * math.prod(tile))))


def _shrunk(tile, factor: int, multiple: int) -> tuple[int, ...]:
    return tuple(max(multiple, -(-(t // factor) // multiple) * multiple) if t > 1 else 1 for t in tile)


def _capacity(device: str) -> float:
    """Bytes of the device: a GPU's total memory, else this worker's memory limit (or the machine's free memory)."""
    if device.startswith("cuda"):
        import torch

        return float(torch.cuda.mem_get_info(torch.device(device))[1])
    try:
        from distributed import get_worker

        limit = get_worker().memory_manager.memory_limit
    except (ValueError, AttributeError):
        limit = None
    if not limit:
        import psutil

        limit = psutil.virtual_memory().available
    return float(limit)


def largest_tile(tile: tuple[int, ...], measured: dict, multiple: int, overlap: int) -> tuple[int, ...] | None:
    """The tile of the same proportions, each tiled axis a multiple of `multiple` and >= 2·overlap, whose call of
    one tile fits the measured capacity; None when not even the smallest does."""
    tiled = [i for i, t in enumerate(tile) if t > 1]
    room = measured["capacity"] - measured["fixed"]
    if room <= 0:
        return None
    scale = (room / (measured["per_voxel"] * math.prod(tile))) ** (1 / max(len(tiled), 1))
    out = list(tile)
    for i in tiled:
        out[i] = int(tile[i] * scale) // multiple * multiple
        if out[i] < max(multiple, 2 * overlap):
            return None
    return tuple(out)
