"""HPC clusters from a YAML file: validate it, build the dask-jobqueue cluster (SLURM, PBS, LSF) and its job script."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
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
    "extra_directives": [],  # extra #SBATCH / #PBS / #BSUB lines, without the prefix
    "jobs": None,  # fixed number of jobs ...
    "adapt": None,  # ... or {minimum_jobs, maximum_jobs}: grow and shrink with the work
    "interface": None,  # network interface the workers listen on (e.g. ib0)
    "local_directory": None,  # node-local scratch for spilling
    "log_directory": None,
    "python": None,  # python executable on the compute nodes (default: the one running volrestore)
    "job_name": "volrestore",
}
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
    python: str | None = None
    job_name: str = "volrestore"


def is_jobqueue_spec(spec: str) -> bool:
    """Whether a --cluster value names a jobqueue YAML file."""
    return str(spec).lower().endswith((".yaml", ".yml"))


def load_spec(path) -> JobqueueSpec:
    """Read and validate a jobqueue YAML; every problem is a one-line UserError naming the key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"cluster file {path} does not exist; give a jobqueue YAML such as configs/slurm-gpu.yaml")
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
    values = {**OPTIONAL, **raw, "scheduler": scheduler}
    for key in ("cores", "gpus", "processes", "jobs"):
        value = values[key]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise UserError(f"cluster file {path}: {key} must be a whole number ≥ 0, got {value!r}")
    if values["cores"] < 1:
        raise UserError(f"cluster file {path}: cores must be at least 1")
    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*[KMGT]i?B\s*", str(values["memory"]), re.IGNORECASE):
        raise UserError(f"cluster file {path}: memory must look like 64GB or 500GiB, got {values['memory']!r}")
    if not re.fullmatch(r"(\d+-)?\d{1,3}(:\d{2}){1,2}", str(values["walltime"])):
        raise UserError(f"cluster file {path}: walltime must look like HH:MM:SS, got {values['walltime']!r}")
    for key in ("prologue", "extra_directives"):
        if not isinstance(values[key], list) or not all(isinstance(x, str) for x in values[key]):
            raise UserError(f"cluster file {path}: {key} must be a list of strings")
    adapt = values["adapt"]
    if adapt is not None:
        if not isinstance(adapt, dict) or set(adapt) - {"minimum_jobs", "maximum_jobs"} or "maximum_jobs" not in adapt:
            raise UserError(f"cluster file {path}: adapt must be {{minimum_jobs: N, maximum_jobs: M}}")
        if values["jobs"] is not None:
            raise UserError(f"cluster file {path}: give either jobs or adapt, not both")
    if values["gpus"] and values["processes"] not in (None, values["gpus"]):
        raise UserError(f"cluster file {path}: with gpus set, each job runs one worker per GPU; remove processes")
    return JobqueueSpec(path=path, **{k: values[k] for k in (*REQUIRED, *OPTIONAL)})


def _memory_bytes(text: str) -> int:
    from dask.utils import parse_bytes

    return parse_bytes(text.replace(" ", ""))


def _job_kwargs(spec: JobqueueSpec) -> dict:
    """Keyword arguments shared by the jobqueue Job and Cluster classes."""
    import sys

    from dask.utils import format_bytes

    directives = list(spec.extra_directives)
    kwargs: dict = {
        "cores": spec.cores,
        "memory": spec.memory,
        "walltime": spec.walltime,
        "job_name": spec.job_name,
        "python": spec.python or sys.executable,
        # Workers inherit the config below: one BLAS/torch thread per worker process unless the user sets more.
        "job_script_prologue": ["export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}", *spec.prologue],
    }
    if spec.queue:
        kwargs["queue"] = spec.queue
    if spec.account:
        kwargs["account"] = spec.account
    if spec.interface:
        kwargs["interface"] = spec.interface
    if spec.local_directory:
        kwargs["local_directory"] = spec.local_directory
    if spec.log_directory:
        kwargs["log_directory"] = spec.log_directory
    if spec.gpus:
        # One dask-cuda nanny per GPU of the job, each pinned with CUDA_VISIBLE_DEVICES; model tasks need GPU=1.
        per_gpu = format_bytes(_memory_bytes(spec.memory) // spec.gpus).replace(" ", "")
        kwargs["processes"] = 1
        kwargs["worker_command"] = "volrestore.cluster.gpu_worker"
        # Later flags win: split the job's threads and memory between its GPU workers.
        threads = max(1, spec.cores // spec.gpus)
        kwargs["worker_extra_args"] = ["--resources", "GPU=1", "--nthreads", threads, "--memory-limit", per_gpu]
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


def make_cluster(path):
    """Start the jobqueue cluster described by the YAML file and size it (fixed jobs or adaptive)."""
    spec = load_spec(path)
    cluster_class, _ = _classes(spec.scheduler)
    cluster = cluster_class(**_job_kwargs(spec))
    if spec.adapt:
        cluster.adapt(minimum_jobs=spec.adapt.get("minimum_jobs", 0), maximum_jobs=spec.adapt["maximum_jobs"])
    else:
        cluster.scale(jobs=spec.jobs or 1)
    return cluster
