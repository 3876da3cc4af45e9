"""Turn --cluster (local, tcp://host:port; cuda and jobqueue YAML hook in here) into a distributed.Client."""

from __future__ import annotations

import os
from contextlib import contextmanager

import dask

from .errors import UserError

CONNECT_TIMEOUT_S = 10
# A task that kills its worker this many times is declared bad (default 3): bounded retries, never endless respawn.
ALLOWED_FAILURES = 3


def machine_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def make_client(spec="local", workers: int | None = None, threads_per_worker: int = 1):
    """A connected Client for the spec; the caller closes it (and `client.volrestore_cluster`, if set).

    local        : a LocalCluster of worker processes sized to the machine, `threads_per_worker` each, with
                   OMP/MKL/OpenBLAS threads set to match before the workers spawn (so torch uses them too).
    tcp://h:port : an existing scheduler; UserError when it cannot be reached within CONNECT_TIMEOUT_S.
    """
    from distributed import Client

    if not isinstance(spec, str):
        raise UserError(f"--cluster must be local or tcp://host:port, got {spec!r}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if spec == "local":
        from distributed import LocalCluster

        n = workers or max(1, machine_cores() // threads_per_worker)
        threads = str(threads_per_worker)
        env = {k: threads for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        config = {
            "distributed.nanny.pre-spawn-environ": {**dask.config.get("distributed.nanny.pre-spawn-environ"), **env},
            "distributed.scheduler.allowed-failures": ALLOWED_FAILURES,
        }
        with dask.config.set(config):  # read by the scheduler and nannies as they start
            cluster = LocalCluster(
                n_workers=n, threads_per_worker=threads_per_worker, processes=True, dashboard_address=":0"
            )
        client = Client(cluster)
        client.volrestore_cluster = cluster
        return client
    if spec.startswith("tcp://"):
        try:
            return Client(spec, timeout=CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            raise UserError(
                f"cannot reach the Dask scheduler at {spec} within {CONNECT_TIMEOUT_S}s ({type(exc).__name__}); "
                "check the address and that the scheduler is running"
            ) from None
    # Hook: "cuda" (dask-cuda LocalCUDACluster) and jobqueue YAML files are wired in by their own issue.
    raise UserError(f"unknown --cluster {spec!r}; use local or tcp://host:port")


@contextmanager
def connect(spec="local", workers: int | None = None, echo=print):
    """Yield a Client for `spec` (or `spec` itself when it already is a Client) and close what was started here."""
    from distributed import Client

    if isinstance(spec, Client):
        yield spec
        return
    client = make_client(spec, workers)
    try:
        services = client.scheduler_info().get("services", {})
        link = client.dashboard_link if "dashboard" in services else "not available (install bokeh for it)"
        echo(f"Dask dashboard: {link}")
        yield client
    finally:
        cluster = getattr(client, "volrestore_cluster", None)
        client.close()
        if cluster is not None:
            cluster.close()
