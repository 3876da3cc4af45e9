"""HPC clusters from a YAML file: validate it, build the dask-jobqueue cluster (SLURM, PBS, LSF) and its job script,
and wait for its first worker (a failed submission or workers that never arrive are one-line UserErrors)."""

from __future__ import annotations

import re
import shlex
import shutil
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from volrestore.errors import UserError

SCHEDULERS = ("slurm", "pbs", "lsf")
REQUIRED = ("scheduler", "cores", "memory", "walltime")
OPTIONAL = {
    "gpus": 0,  # GPUs per job; with gpus > 0 each job runs one dask-cuda worker process per GPU
    "processes": None,  # CPU-only jobs: worker processes per job (default: one per core, 1 thread each)
    "queue": None,  # SLURM partition / PBS queue / LSF queue
    "account": None,
    "prologue": [],  # shell lines run before the worker starts (module load, conda activate, ...)
    "job_script_prologue": [],  # the same, under dask-jobqueue's name (both may be given: prologue first)
    "extra_directives": [],  # extra #SBATCH / #PBS / #BSUB lines, without the prefix
    "jobs": None,  # fixed number of jobs ...
    "adapt": None,  # ... or {minimum_jobs, maximum_jobs}: grow and shrink with the work
    "interface": None,  # network interface the workers listen on (e.g. ib0)
    "local_directory": None,  # node-local scratch for spilling
    "log_directory": None,
    "python": "python3",  # python on the compute nodes, after the prologue (never the client's own path)
    "job_name": "volrestore",
    "worker_timeout": 1800,  # seconds to wait for the first worker (queued jobs included) before giving up
}
# YAML files shipped inside the package (volrestore/configs): `--cluster slurm-gpu.yaml` finds them by name.
PACKAGED = "configs"
# Placeholder shown in job scripts printed before a scheduler exists; the real address is filled in at submission.
SCHEDULER_PLACEHOLDER = "tcp://SCHEDULER-ADDRESS:8786"


@dataclass
class JobqueueSpec:
    """A validated jobqueue YAML file."""

    path: Path
    scheduler: str
    cores: int
    memory: str
    walltime: str
    gpus: int = 0
    processes: int | None = None
    queue: str | None = None
    account: str | None = None
    prologue: list[str] = field(default_factory=list)
    extra_directives: list[str] = field(default_factory=list)
    jobs: int | None = None
    adapt: dict | None = None
    interface: str | None = None
    local_directory: str | None = None
    log_directory: str | None = None
    python: str = "python3"
    job_name: str = "volrestore"
    worker_timeout: float = 1800
    job_script_prologue: list[str] = field(default_factory=list)


def is_jobqueue_spec(spec: str) -> bool:
    """Whether a --cluster value names a jobqueue YAML file."""
    return str(spec).lower().endswith((".yaml", ".yml"))


def packaged_configs() -> list[str]:
    """Names of the cluster YAMLs shipped in the package (volrestore/configs), e.g. slurm-gpu.yaml."""
    folder = resources.files("volrestore").joinpath(PACKAGED)
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".yaml", ".yml"))) if folder.is_dir() else []


def find_config(path) -> Path:
    """The cluster YAML `path` names: the file itself, else (for a bare name such as slurm-gpu or slurm-gpu.yaml)
    the packaged one; a one-line UserError listing the packaged names when neither exists."""
    path = Path(path)
    if path.is_file():
        return path
    name = path.name if path.name.endswith((".yaml", ".yml")) else f"{path.name}.yaml"
    if len(path.parts) == 1 and name in packaged_configs():
        return Path(str(resources.files("volrestore").joinpath(PACKAGED, name)))
    shipped = ", ".join(packaged_configs()) or "none"
    raise UserError(f"cluster file {path} does not exist; give a jobqueue YAML or a packaged one by name ({shipped})")


def load_spec(path) -> JobqueueSpec:
    """Read and validate a jobqueue YAML (a file, or a packaged one by name); every problem is a one-line UserError
    naming the key."""
    path = find_config(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise UserError(f"cluster file {path} is not valid YAML{where}; fix the syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"cluster file {path} must be a mapping of keys (scheduler, cores, memory, walltime, ...)")
    unknown = sorted(set(raw) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        allowed = ", ".join([*REQUIRED, *OPTIONAL])
        raise UserError(f"cluster file {path}: unknown key(s) {', '.join(unknown)}; allowed keys: {allowed}")
    missing = [k for k in REQUIRED if raw.get(k) in (None, "")]
    if missing:
        raise UserError(f"cluster file {path}: missing required key(s) {', '.join(missing)}; add them to the file")
    scheduler = str(raw["scheduler"]).lower()
    if scheduler not in SCHEDULERS:
        raise UserError(
            f"cluster file {path}: unknown scheduler type {raw['scheduler']!r}; use one of {', '.join(SCHEDULERS)}"
        )
    values = {**OPTIONAL, **{k: v for k, v in raw.items() if v is not None or k not in OPTIONAL}, "scheduler": scheduler}
    _check_values(path, values)
    return JobqueueSpec(path=path, **{k: values[k] for k in (*REQUIRED, *OPTIONAL)})


def _check_values(path: Path, values: dict) -> None:
    """One-line UserErrors for values of the right keys but the wrong kind."""
    for key in ("cores", "gpus", "processes", "jobs"):
        value = values[key]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise UserError(f"cluster file {path}: {key} must be a whole number ≥ 0, got {value!r}")
    if values["cores"] < 1:
        raise UserError(f"cluster file {path}: cores must be at least 1")
    if values["gpus"] and values["cores"] < values["gpus"]:
        raise UserError(f"cluster file {path}: cores ({values['cores']}) must be at least gpus ({values['gpus']}): "
                        "each GPU worker needs a core")
    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*[KMGT]i?B\s*", str(values["memory"]), re.IGNORECASE):
        raise UserError(f"cluster file {path}: memory must look like 64GB or 500GiB, got {values['memory']!r}")
    if not re.fullmatch(r"(\d+-)?\d{1,3}(:\d{2}){1,2}", str(values["walltime"])):
        raise UserError(f"cluster file {path}: walltime must look like HH:MM:SS, got {values['walltime']!r}")
    for key in ("prologue", "job_script_prologue", "extra_directives"):
        if not isinstance(values[key], list) or not all(isinstance(x, str) for x in values[key]):
            raise UserError(f"cluster file {path}: {key} must be a list of strings")
    if not isinstance(values["python"], str) or not values["python"].strip():
        raise UserError(f"cluster file {path}: python must be the python command of the compute nodes, e.g. "
                        "python3 or /path/to/env/bin/python")
    timeout = values["worker_timeout"]
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise UserError(f"cluster file {path}: worker_timeout must be a number of seconds > 0, got {timeout!r}")
    adapt = values["adapt"]
    if adapt is not None:
        if not isinstance(adapt, dict) or set(adapt) - {"minimum_jobs", "maximum_jobs"} or "maximum_jobs" not in adapt:
            raise UserError(f"cluster file {path}: adapt must be {{minimum_jobs: N, maximum_jobs: M}}")
        low, high = adapt.get("minimum_jobs", 0), adapt["maximum_jobs"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)) or not 0 <= low <= high \
                or high < 1:
            raise UserError(f"cluster file {path}: adapt needs whole numbers 0 ≤ minimum_jobs ≤ maximum_jobs, "
                            f"maximum_jobs ≥ 1; got {adapt}")
        if values["jobs"] is not None:
            raise UserError(f"cluster file {path}: give either jobs or adapt, not both")
    if values["gpus"] and values["processes"] not in (None, values["gpus"]):
        raise UserError(f"cluster file {path}: with gpus set, each job runs one worker per GPU; remove processes")


def _memory_bytes(text: str) -> int:
    from dask.utils import parse_bytes

    return parse_bytes(text.replace(" ", ""))


def _job_kwargs(spec: JobqueueSpec) -> dict:
    """Keyword arguments shared by the jobqueue Job and Cluster classes.

    `processes` is the number of Dask workers one job runs, the unit dask-jobqueue's scale(n) and adapt() count in:
    a GPU job runs one dask-cuda worker per GPU (named NAME-0 … NAME-<gpus-1>, as dask-cuda names them), so
    processes = gpus, and each worker gets cores/gpus threads and memory/gpus (dask-jobqueue divides by processes).
    """
    directives = list(spec.extra_directives)
    kwargs: dict = {
        "cores": spec.cores,
        "memory": spec.memory,
        "walltime": spec.walltime,
        "job_name": spec.job_name,
        # The compute nodes' python, found after the prologue ran (module load / conda activate): the client's own
        # sys.executable is a path on the login node that compute nodes may not have.
        "python": spec.python,
        # Workers inherit the config below: one BLAS/torch thread per worker process unless the user sets more.
        # One malloc arena, so the big blocks a worker frees are reused (cluster.client.heap_environ).
        "job_script_prologue": ["export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}",
                                "export MALLOC_ARENA_MAX=${MALLOC_ARENA_MAX:-1}", *spec.prologue,
                                *spec.job_script_prologue],
    }
    for key in ("queue", "account", "interface", "local_directory", "log_directory"):
        if getattr(spec, key):
            kwargs[key] = getattr(spec, key)
    if spec.gpus:
        kwargs["processes"] = spec.gpus
        kwargs["worker_command"] = "volrestore.cluster.gpu_worker"
        kwargs["worker_extra_args"] = ["--resources", "GPU=1"]
        if spec.scheduler == "slurm":
            directives.append(f"--gres=gpu:{spec.gpus}")
        elif spec.scheduler == "pbs":
            mem = spec.memory.replace(" ", "")
            kwargs["resource_spec"] = f"select=1:ncpus={spec.cores}:ngpus={spec.gpus}:mem={mem}"
        else:  # lsf
            directives.append(f'-gpu "num={spec.gpus}:mode=exclusive_process"')
    else:
        # CPU jobs: one single-threaded worker process per core, as on a laptop.
        kwargs["processes"] = spec.processes or spec.cores
    kwargs["job_extra_directives"] = directives
    return kwargs


def workers_per_job(spec: JobqueueSpec) -> int:
    """Dask workers one job of `spec` runs (one per GPU for GPU jobs): the unit of scale(n) and adapt()."""
    return _job_kwargs(spec)["processes"]


def _classes(scheduler: str):
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        raise UserError("HPC clusters need dask-jobqueue; install it with: pip install 'volrestore[hpc]'") from None
    from dask_jobqueue import LSFCluster, PBSCluster, SLURMCluster
    from dask_jobqueue.lsf import LSFJob
    from dask_jobqueue.pbs import PBSJob
    from dask_jobqueue.slurm import SLURMJob

    return {
        "slurm": (SLURMCluster, SLURMJob),
        "pbs": (PBSCluster, PBSJob),
        "lsf": (LSFCluster, LSFJob),
    }[scheduler]


def job_script(path) -> str:
    """The batch script dask-jobqueue would submit for one worker job, without starting a scheduler."""
    spec = load_spec(path)
    _, job_class = _classes(spec.scheduler)
    job = job_class(scheduler=SCHEDULER_PLACEHOLDER, name="volrestore-worker", **_job_kwargs(spec))
    return job.job_script()


def _recording(job_class, failures: list):
    """A subclass of `job_class` whose failed submissions are appended to `failures` (dask-jobqueue only logs
    them, in its event loop, so the client would wait forever for workers that will never come)."""

    from distributed.core import Status

    class Recorded(job_class):
        async def start(self):
            """Submit the job as dask-jobqueue does, recording a failure before re-raising it."""
            try:
                await super().start()
            except Exception as exc:
                failures.append(exc)
                self.status = Status.failed  # else closing the cluster asserts on a job still "created"
                raise

    Recorded.__name__ = job_class.__name__
    return Recorded


def _check_submit_command(spec: JobqueueSpec, job_class) -> None:
    """UserError when the scheduler's submit command (sbatch, qsub, bsub) is not on PATH."""
    command = shlex.split(job_class.submit_command)[0]
    if shutil.which(command) is None:
        raise UserError(f"cannot submit {spec.scheduler} jobs: {command} is not on PATH; run volrestore on a login "
                        f"node of the cluster (or load the scheduler's module) to use --cluster {spec.path}")


def submission_error(spec: JobqueueSpec, exc: Exception) -> str:
    """One line for a failed job submission: the command's exit code and the first line of what it said."""
    text = str(exc)
    code = re.search(r"Exit code: (-?\d+)", text)
    said = re.search(r"stderr:\n(.*)", text, re.DOTALL)
    said = said.group(1) if said and said.group(1).strip() else re.sub(r"(?s).*stdout:\n", "", text)
    first = next((line.strip() for line in said.splitlines() if line.strip()), type(exc).__name__)
    how = f"exited with code {code.group(1)}" if code else f"failed ({type(exc).__name__})"
    return (f"{spec.scheduler} job submission {how}: {first}; check the queue, account and resources in "
            f"{spec.path} (volrestore cluster job-script {spec.path} prints the script)")


def wait_for_workers(cluster, spec: JobqueueSpec, failures: list, echo=print, poll_s: float = 0.25) -> None:
    """Block until the cluster's first worker has joined; UserError at once when a submission failed, or after
    spec.worker_timeout seconds when none joined."""
    deadline = time.monotonic() + spec.worker_timeout
    echo(f"waiting up to {spec.worker_timeout:g}s for the first {spec.scheduler} job's workers "
         f"(worker_timeout in {spec.path})")
    while True:
        if failures:
            raise UserError(submission_error(spec, failures[0]))
        if cluster.scheduler_info.get("workers"):
            return
        if time.monotonic() > deadline:
            logs = f"the worker logs in {spec.log_directory}" if spec.log_directory else "the job's output file"
            raise UserError(f"no worker joined within {spec.worker_timeout:g}s (worker_timeout): the jobs may still "
                            f"be queued, or failed to start; check the queue and {logs}, that `{spec.python}` on "
                            "the compute nodes has volrestore after the prologue, and raise worker_timeout if the "
                            "queue is slow")
        time.sleep(poll_s)


def make_cluster(path, echo=print):
    """Start the jobqueue cluster described by the YAML file, wait for its first worker (see `wait_for_workers`),
    then size it: a fixed number of jobs, or adaptive between minimum_jobs and maximum_jobs (counted in jobs;
    dask-jobqueue turns them into workers with `workers_per_job`)."""
    spec = load_spec(path)
    cluster_class, job_class = _classes(spec.scheduler)
    _check_submit_command(spec, job_class)
    failures: list = []
    cluster = cluster_class(job_cls=_recording(job_class, failures), **_job_kwargs(spec))
    try:
        first = max(1, spec.adapt.get("minimum_jobs", 0)) if spec.adapt else (spec.jobs or 1)
        cluster.scale(jobs=first)
        wait_for_workers(cluster, spec, failures, echo)
        if spec.adapt:
            cluster.adapt(minimum_jobs=spec.adapt.get("minimum_jobs", 0), maximum_jobs=spec.adapt["maximum_jobs"])
    except BaseException:
        cluster.close()
        raise
    return cluster
