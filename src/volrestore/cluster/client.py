"""Turn --cluster (local, cuda, tcp://host:port, a jobqueue YAML) into a distributed.Client; GPU task resources."""

from __future__ import annotations

import os
import sys
import weakref
from contextlib import contextmanager

import dask

from volrestore.errors import UserError

CONNECT_TIMEOUT_S = 10
# A task that kills its worker this many times is declared bad (default 3): bounded retries, never endless respawn.
ALLOWED_FAILURES = 3


def machine_cores() -> int:
    """Cores this process may run on (its CPU affinity), for sizing local clusters."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


GUARD_ADVICE = ('put the code that starts it under `if __name__ == "__main__":` (Dask starts worker processes '
                "that re-import the script: without the guard each would start the run again)")


def check_spawn_guard() -> None:
    """Refuse to start local worker processes from a script's top level without the `__main__` guard.

    Worker processes are spawned: each re-imports the main script, so an unguarded script would start the run again
    in every worker (and hang or fail). Here (the script's process) that is a UserError before anything starts;
    in a spawned process that is still re-importing the script (multiprocessing's bootstrapping phase) it exits
    quietly with one line on stderr, so the worker fails fast instead of recursing.
    """
    import multiprocessing
    import re

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        sys.stderr.write(f"error: a volrestore script started a local Dask cluster while being re-imported by a "
                         f"worker process; {GUARD_ADVICE}\n")
        raise SystemExit(UserError.exit_code)
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if not path or not os.path.isfile(path) or os.path.basename(path) == "__main__.py" or \
            dask.config.get("distributed.worker.multiprocessing-method", "spawn") == "fork":
        return  # interactive, -c, python -m pkg (never re-imported) or forked workers
    frame = sys._getframe()
    while frame is not None and not (frame.f_code.co_name == "<module>" and frame.f_code.co_filename == path):
        frame = frame.f_back
    try:
        guarded = re.search(r"__name__\s*==\s*['\"]__main__['\"]", open(path, errors="replace").read())
    except OSError:
        return
    if frame is not None and not guarded:
        raise UserError(f"{os.path.basename(path)} starts a local Dask cluster at its top level; {GUARD_ADVICE}")


def _start(spec="local", workers: int | None = None, threads_per_worker: int = 1, echo=print):
    """(Client, the cluster started for it or None, whether its workers have GPUs) for a --cluster spec.

    See `connect` for the specs.
    """
    from distributed import Client

    if not isinstance(spec, str):
        raise UserError(f"--cluster must be local, cuda, tcp://host:port or a jobqueue YAML, got {spec!r}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if spec == "local":
        from distributed import LocalCluster

        check_spawn_guard()
        n = workers or max(1, machine_cores() // threads_per_worker)
        with dask.config.set(_worker_config(threads_per_worker)):  # read by the scheduler and nannies as they start
            try:
                cluster = LocalCluster(
                    n_workers=n, threads_per_worker=threads_per_worker, processes=True, dashboard_address=":0"
                )
            except RuntimeError as exc:  # e.g. a worker that re-imported an unguarded script and stopped there
                script = getattr(sys.modules.get("__main__"), "__file__", None)
                if not script or not os.path.isfile(script):
                    raise
                raise UserError(f"the local Dask workers failed to start ({exc}); if {os.path.basename(script)} "
                                f"starts the run outside its main block, {GUARD_ADVICE}") from None
        return Client(cluster), cluster, False
    if spec == "cuda":
        check_spawn_guard()
        cluster = _cuda_cluster(workers)
        return Client(cluster), cluster, True
    from volrestore.cluster.jobqueue import is_jobqueue_spec, load_spec, make_cluster

    if is_jobqueue_spec(spec):
        with dask.config.set(_worker_config(threads_per_worker)):
            cluster = make_cluster(spec, echo=echo)  # returns once a worker joined; UserError on failed submissions
        return Client(cluster), cluster, load_spec(spec).gpus > 0
    if spec.startswith("tcp://"):
        try:
            return Client(spec, timeout=CONNECT_TIMEOUT_S), None, False
        except (OSError, TimeoutError) as exc:
            raise UserError(
                f"cannot reach the Dask scheduler at {spec} within {CONNECT_TIMEOUT_S}s ({type(exc).__name__}); "
                "check the address and that the scheduler is running"
            ) from None
    raise UserError(f"unknown --cluster {spec!r}; use local, cuda, tcp://host:port or a jobqueue YAML file")


def _worker_config(threads_per_worker: int) -> dict:
    """Dask config for clusters started here: BLAS/torch threads per worker process and bounded task failures."""
    threads = os.environ.get("OMP_NUM_THREADS") or str(threads_per_worker)
    env = {k: threads for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    env.update(heap_environ())
    return {
        "distributed.nanny.pre-spawn-environ": {**dask.config.get("distributed.nanny.pre-spawn-environ"), **env},
        "distributed.scheduler.allowed-failures": ALLOWED_FAILURES,
    }


def visible_gpus() -> int:
    """CUDA devices torch sees here (0 when CUDA is missing or broken)."""
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # a broken CUDA install counts as no GPU
        return 0


def _cuda_cluster(workers):
    if visible_gpus() == 0:
        raise UserError("--cluster cuda: no GPU is visible to this process; use --cluster local to run on the CPU")
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        raise UserError("--cluster cuda needs dask-cuda; install it with: pip install 'volrestore[gpu]'") from None
    devices = None
    if workers:
        if workers > visible_gpus():
            raise UserError(f"--workers {workers} but only {visible_gpus()} GPU(s) are visible; use at most that many")
        devices = list(range(workers))
    # Two threads per GPU worker: one runs the model while the other reads and decompresses the next block.
    with dask.config.set(_worker_config(1)):
        return LocalCUDACluster(CUDA_VISIBLE_DEVICES=devices, threads_per_worker=2, resources={"GPU": 1},
                                dashboard_address=":0")


def task_resources(client) -> dict | None:
    """{"GPU": 1} when the cluster's workers advertise GPUs (model tasks then run one per GPU), else None."""
    if is_gpu_cluster(client):  # GPU clusters started here, before their workers have joined
        return {"GPU": 1}
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    return {"GPU": 1} if any(w.get("resources", {}).get("GPU") for w in workers.values()) else None


# Clients of GPU clusters started by `connect` (a jobqueue cluster's GPU workers may not have joined yet).
_GPU_CLIENTS: "weakref.WeakSet" = weakref.WeakSet()


@contextmanager
def connect(spec="local", workers: int | None = None, echo=print, threads_per_worker: int = 1):
    """Yield a Client for a --cluster `spec` (or `spec` itself when it already is a Client) and close what was
    started here, cluster included, when the block ends.

    local        : a LocalCluster of worker processes sized to the machine, `threads_per_worker` each, with
                   OMP/MKL/OpenBLAS threads set to match before the workers spawn (so torch uses them too),
                   unless OMP_NUM_THREADS is already set.
    cuda         : dask-cuda's LocalCUDACluster: one worker per visible GPU, pinned with CUDA_VISIBLE_DEVICES,
                   advertising the resource GPU=1 that model tasks require.
    tcp://h:port : an existing scheduler; UserError when it cannot be reached within CONNECT_TIMEOUT_S.
    FILE.yaml    : a dask-jobqueue cluster (SLURM, PBS, LSF) described by the file, or a packaged one by name
                   (see volrestore.cluster.jobqueue); returns once its first worker joined, UserError when a job
                   submission fails or no worker joins within the file's worker_timeout.
    None         : no cluster: yields None (the blockwise runner then uses threads of this process).
    The dashboard link is echoed only when bokeh is installed (without it the link would be dead).
    """
    from distributed import Client

    if spec is None:
        yield None
        return
    if isinstance(spec, Client):
        yield spec
        return
    client, cluster, gpu = _start(spec, workers, threads_per_worker, echo)
    if gpu:
        _GPU_CLIENTS.add(client)
    try:
        link = dashboard_link(client)
        if link:
            echo(f"Dask dashboard: {link}")
        yield client
    finally:
        # Shutting down must not fail a command whose work is done: on an overloaded machine a worker process can
        # take longer than distributed's kill timeout to exit, and that TimeoutError used to discard a finished
        # training run (its checkpoint is written after this block).
        try:
            client.close()
            if cluster is not None:
                cluster.close()
        except TimeoutError:
            echo("warning: the local Dask cluster was slow to shut down (timeout); its processes are being killed")


def dashboard_link(client) -> str | None:
    """The Dask dashboard's address, or None when it would be a dead link: distributed starts its HTTP service
    without bokeh, but the pages need bokeh (not a dependency of volrestore: `pip install bokeh` adds them)."""
    from importlib.util import find_spec

    if find_spec("bokeh") is None or "dashboard" not in client.scheduler_info().get("services", {}):
        return None
    return client.dashboard_link


def is_gpu_cluster(client) -> bool:
    """Whether `client`'s cluster was started here with GPU workers (they may still be joining)."""
    return client in _GPU_CLIENTS


def pin_torch_threads() -> None:
    """Use the worker's share of the cores for torch (OMP_NUM_THREADS, set by the clusters started here; 1 when
    unset): a fixed thread count keeps CPU results bitwise stable from run to run. Also keeps freed memory in the
    process (keep_freed_memory)."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    keep_freed_memory()


# glibc's mallopt parameters, and the values set: blocks up to 1 GiB come from the heap, and up to 2 GiB of free
# memory at its top is kept rather than returned to the system.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD, TRIM_THRESHOLD = 2**30, 2**31 - 1


def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse the big blocks that torch frees and asks for again at every network call on a CPU.

    By default a block over 32 MB is mapped fresh from the system each time and unmapped when freed, so every call's
    activations fault in page by page again: measured with `volrestore benchmark` (small-2.5d, 512² tiles, 2-core
    AMD EPYC VM), 5.5 M page faults and 40 % of the CPU time in the kernel; with these two settings the bare model ran
    2.1× faster (52 k → 112 k voxels/s). The price is that a process keeps its peak heap (what one call needs) between
    calls: its resident memory grew 1.46× as much over a call (2.26 GB against 1.55 GB for one of 4 512² tiles), which
    model.memory's CPU check allows for. Values are bitwise the same. A no-op (False) where the C library is not glibc
    or refuses the settings, or when the worker's environment opts out (_keep_freed_memory_wanted)."""
    import ctypes
    import ctypes.util
    import platform

    if not _keep_freed_memory_wanted():
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    global _FREED_MEMORY_KEPT
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _FREED_MEMORY_KEPT = bool(libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(MMAP_THRESHOLD))
                                  and libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(TRIM_THRESHOLD)))
    except (OSError, AttributeError):
        pass
    return _FREED_MEMORY_KEPT


_FREED_MEMORY_KEPT = False


def _keep_freed_memory_wanted() -> bool:
    """False with VOLRESTORE_KEEP_FREED_MEMORY=0 in the environment (memory-tight workers): both allocator settings,
    keep_freed_memory's and heap_environ's, are then left at glibc's defaults."""
    return os.environ.get("VOLRESTORE_KEEP_FREED_MEMORY", "1") != "0"


def heap_environ() -> dict:
    """Environment for worker processes started here, read by glibc at their start: one malloc arena. Dask runs
    tasks in threads, and a thread other than the main one allocates from an arena of 64 MB heaps, which hands every
    bigger block (a network's activations) to mmap whatever keep_freed_memory set: with one arena they come from the
    main heap that it keeps. Measured (`volrestore benchmark --preset tiny-2.5d -K 2 --steps 2`, one quiet box):
    22.9 k voxels/s by default, 37.3 k with keep_freed_memory, 63.6 k with both (kernel time 23.0 → 8.6 → 2.2 s).
    Empty when the user set MALLOC_ARENA_MAX or VOLRESTORE_KEEP_FREED_MEMORY=0."""
    if "MALLOC_ARENA_MAX" in os.environ or not _keep_freed_memory_wanted():
        return {}
    return {"MALLOC_ARENA_MAX": "1"}


def freed_memory_kept() -> bool:
    """Whether keep_freed_memory took effect in this process (model.memory then leaves room for the kept heap)."""
    return _FREED_MEMORY_KEPT


def deterministic_cuda() -> None:
    """Fixed GPU kernels: cuDNN's autotuner off (it may pick another convolution algorithm per run, and so other
    float sums) and deterministic algorithms where torch has them (warn-only: an op without one still runs).
    cuBLAS needs its workspace fixed before its first call for reproducible matrix products."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
