"""HPC cluster YAML: validation errors, the job scripts dask-jobqueue would submit, packaged YAMLs, and real
submissions through fake `sbatch`/`scancel` scripts on PATH: a failing or missing sbatch and workers that never
arrive are one-line errors within worker_timeout; a GPU job of N GPUs is N workers that scale/adapt count as one job
(a fake dask_cuda starts them, named as dask-cuda names them)."""

import filecmp
import os
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from volrestore.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_slurm_gpu_job_script_has_the_expected_directives():
    result = run("cluster", "job-script", CONFIGS / "slurm-gpu.yaml")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for directive in [
        "#SBATCH -J volrestore",
        "#SBATCH -p gpu",
        "#SBATCH -A my-project",
        "#SBATCH --cpus-per-task=16",
        "#SBATCH -t 08:00:00",
        "#SBATCH --gres=gpu:4",
        "#SBATCH --constraint=a100",
    ]:
        assert directive in lines
    assert "module load cuda/12.4" in lines
    worker = next(line for line in lines if "volrestore.cluster.gpu_worker" in line)
    # one pinned dask-cuda worker per GPU: GPU resource, a quarter of the threads and memory each
    assert "--nthreads 4 --memory-limit 29.80GiB" in worker and "--resources GPU=1" in worker
    assert worker.startswith("python3 -m volrestore.cluster.gpu_worker ")  # the YAML's python, not sys.executable
    assert lines.index("module load cuda/12.4") < lines.index(worker)


def test_pbs_gpu_job_script_requests_gpus_in_the_select_statement():
    result = run("cluster", "job-script", CONFIGS / "pbs-gpu.yaml")
    assert result.exit_code == 0, result.output
    assert "#PBS -l select=1:ncpus=32:ngpus=4:mem=256GB" in result.output.splitlines()
    assert "#PBS -l walltime=12:00:00" in result.output.splitlines()
    assert "#PBS -q gpu" in result.output.splitlines()


def test_lsf_and_cpu_only_jobs(tmp_path):
    lsf = write(tmp_path, """
        scheduler: lsf
        cores: 8
        memory: 32GB
        walltime: "01:30"
        gpus: 2
        queue: gpu
    """)
    result = run("cluster", "job-script", lsf)
    assert result.exit_code == 0, result.output
    assert '#BSUB -gpu "num=2:mode=exclusive_process"' in result.output
    assert "#BSUB -q gpu" in result.output
    cpu = run("cluster", "job-script", CONFIGS / "slurm-cpu.yaml")
    assert cpu.exit_code == 0, cpu.output
    assert "--nworkers 32" in cpu.output and "--nthreads 1" in cpu.output
    assert "--gres" not in cpu.output


@pytest.mark.parametrize(
    "text, message",
    [
        ("scheduler: sge\ncores: 4\nmemory: 8GB\nwalltime: '01:00:00'\n", "unknown scheduler type 'sge'"),
        ("scheduler: slurm\ncores: 4\nwalltime: '01:00:00'\n", "missing required key(s) memory"),
        ("scheduler: slurm\ncores: 4\nmemory: 8GB\nwalltime: '01:00:00'\ngpu: 2\n", "unknown key(s) gpu"),
        ("scheduler: slurm\ncores: 4\nmemory: lots\nwalltime: '01:00:00'\n", "memory must look like"),
        ("scheduler: slurm\ncores: 4\nmemory: 8GB\nwalltime: 1h\n", "walltime must look like"),
        ("scheduler: slurm\ncores: [4\n", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping"),
    ],
)
def test_bad_cluster_files_give_one_line_and_exit_2(tmp_path, text, message):
    result = run("cluster", "job-script", write(tmp_path, text))
    assert result.exit_code == 2
    assert message in result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1


def test_missing_cluster_file(tmp_path):
    result = run("cluster", "job-script", tmp_path / "nope.yaml")
    assert result.exit_code == 2 and "does not exist" in result.output
    assert "slurm-gpu.yaml" in result.output  # the packaged names are offered


# ---- python / prologue, packaged YAMLs, the Python floor ----------------------------------------------------------

def test_job_script_uses_the_yaml_python_and_prologues_never_the_client_python(tmp_path):
    base = "scheduler: slurm\ncores: 4\nmemory: 8GB\nwalltime: '01:00:00'\n"
    default = run("cluster", "job-script", write(tmp_path, base, "a.yaml"))
    assert default.exit_code == 0, default.output
    assert sys.executable not in default.output
    assert "\npython3 -m distributed.cli.dask_worker " in default.output
    own = write(tmp_path, base + "python: /opt/envs/vr/bin/python\nprologue: [module load x]\n"
                "job_script_prologue: [conda activate vr]\n", "b.yaml")
    lines = run("cluster", "job-script", own).output.splitlines()
    worker = next(i for i, line in enumerate(lines) if "dask_worker" in line)
    assert lines[worker].startswith("/opt/envs/vr/bin/python -m distributed.cli.dask_worker ")
    assert lines.index("module load x") < lines.index("conda activate vr") < worker


@pytest.mark.parametrize("text, message", [
    ("python: ''\n", "python must be"),
    ("worker_timeout: 0\n", "worker_timeout must be"),
    ("gpus: 8\n", "cores (4) must be at least gpus (8)"),
    ("adapt: {minimum_jobs: 3, maximum_jobs: 2}\n", "0 ≤ minimum_jobs ≤ maximum_jobs"),
])
def test_bad_new_keys(tmp_path, text, message):
    path = write(tmp_path, "scheduler: slurm\ncores: 4\nmemory: 8GB\nwalltime: '01:00:00'\n" + text)
    result = run("cluster", "job-script", path)
    assert result.exit_code == 2 and message in result.output and result.output.count("\n") == 1, result.output


def test_cluster_yamls_are_packaged_and_found_by_name(tmp_path, monkeypatch):
    from volrestore.cluster.jobqueue import find_config, packaged_configs

    shipped = packaged_configs()
    assert shipped == sorted(p.name for p in CONFIGS.glob("*.yaml"))
    for name in shipped:  # the package's copies are the repository's files
        assert filecmp.cmp(find_config(name), CONFIGS / name, shallow=False), name
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: the packaged file is used
    for name in ("slurm-gpu.yaml", "slurm-gpu"):
        result = run("cluster", "job-script", name)
        assert result.exit_code == 0 and "#SBATCH --gres=gpu:4" in result.output, result.output
    listed = run("cluster", "configs")
    assert listed.exit_code == 0 and [line.split("\t")[0] for line in listed.output.splitlines()] == shipped
    pyproject = tomllib.loads((CONFIGS.parent / "pyproject.toml").read_text())
    assert "configs/*.yaml" in pyproject["tool"]["setuptools"]["package-data"]["volrestore"]


def test_python_floor_is_the_gpu_extras():
    """dask-cuda (the gpu extra) needs Python 3.11: the package must not promise 3.10."""
    pyproject = tomllib.loads((CONFIGS.parent / "pyproject.toml").read_text())
    assert pyproject["project"]["requires-python"].replace(" ", "") == ">=3.11"


# ---- real submissions through fake scheduler commands --------------------------------------------------------------

FAILING_SBATCH = """#!/bin/sh
echo "sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified" >&2
exit 1
"""
SILENT_SBATCH = """#!/bin/sh
echo "Submitted batch job 4242"
"""
# Runs the job script in the background, in its own process group (the job id), as a scheduler would.
RUNNING_SBATCH = """#!/bin/sh
cp "$1" "{jobs}/job-$$.sh"
setsid sh "{jobs}/job-$$.sh" > "{jobs}/job-$$.log" 2>&1 &
echo "Submitted batch job $!"
"""
SCANCEL = """#!/bin/sh
[ "$1" = 4242 ] || kill -TERM -- "-$1" 2>/dev/null
exit 0
"""
# dask-cuda's worker CLI as far as names go: one worker per visible GPU, named NAME-0 ... NAME-(n-1).
FAKE_DASK_CUDA = '''
import os
import sys


def cuda(argv):
    from distributed.cli.dask_worker import main

    gpus = len(os.environ["CUDA_VISIBLE_DEVICES"].split(","))
    sys.argv = ["dask-worker", *argv[1:], "--nworkers", str(gpus)]
    main()
'''


def fake_commands(tmp_path, monkeypatch, sbatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (tmp_path / "jobs").mkdir(exist_ok=True)
    for name, text in (("sbatch", sbatch), ("scancel", SCANCEL)):
        (bin_dir / name).write_text(text.replace("{jobs}", str(tmp_path / "jobs")))
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


@pytest.fixture
def image(tmp_path):
    import numpy as np

    from volrestore import write_image

    path = tmp_path / "in.ome.zarr"
    write_image(path, np.ones((4, 16, 16), np.float32), axes="zyx", chunks=(4, 16, 16))
    return path


CPU_YAML = "scheduler: slurm\ncores: 1\nmemory: 1GB\nwalltime: '00:10:00'\nworker_timeout: {timeout}\n"


def restore_on(image, tmp_path, config):
    t0 = time.monotonic()
    result = CliRunner().invoke(main, ["restore", str(image), str(tmp_path / "out.ome.zarr"), "--model", "identity",
                                       "--cluster", str(config)])
    return result, time.monotonic() - t0


def assert_one_line_error(result, contains):
    assert result.exit_code == 2, (result.output, result.exception)
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and contains in line, result.stderr
    assert [x for x in result.stderr.splitlines() if x.startswith("error")] == [line]
    assert "Traceback" not in result.output


def test_failing_sbatch_is_one_line_at_once_not_a_hang(image, tmp_path, monkeypatch):
    fake_commands(tmp_path, monkeypatch, FAILING_SBATCH)
    config = write(tmp_path, CPU_YAML.format(timeout=120))
    result, seconds = restore_on(image, tmp_path, config)
    assert_one_line_error(result, "slurm job submission exited with code 1: sbatch: error: Batch job submission "
                                  "failed: Invalid account")
    assert seconds < 60  # the failure is seen when it happens, long before worker_timeout


def test_missing_sbatch_names_the_command(image, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result, _ = restore_on(image, tmp_path, write(tmp_path, CPU_YAML.format(timeout=120)))
    assert_one_line_error(result, "sbatch is not on PATH")


def test_workers_that_never_arrive_time_out_with_advice(image, tmp_path, monkeypatch):
    fake_commands(tmp_path, monkeypatch, SILENT_SBATCH)
    result, seconds = restore_on(image, tmp_path, write(tmp_path, CPU_YAML.format(timeout=3)))
    assert_one_line_error(result, "no worker joined within 3s (worker_timeout)")
    assert seconds < 60


def test_a_gpu_job_runs_one_worker_per_gpu_and_scale_counts_them(tmp_path, monkeypatch):
    """gpus: 2 -> one job, two dask-cuda workers NAME-0, NAME-1: the names dask-jobqueue plans are the names that
    join, so adapt() and scale() count 2 workers per job (processes=1 planned 1 and saw 2: scale-up asked twice the
    jobs, scale-down could not map the workers to their job)."""
    from volrestore.cluster.jobqueue import make_cluster

    fake_commands(tmp_path, monkeypatch, RUNNING_SBATCH)
    (tmp_path / "fake" / "dask_cuda").mkdir(parents=True)
    (tmp_path / "fake" / "dask_cuda" / "__init__.py").write_text("")
    (tmp_path / "fake" / "dask_cuda" / "cli.py").write_text(FAKE_DASK_CUDA)
    config = write(tmp_path, f"""
        scheduler: slurm
        cores: 2
        memory: 2GB
        walltime: "00:10:00"
        gpus: 2
        python: {sys.executable}
        worker_timeout: 120
        job_script_prologue:
          - export PYTHONPATH={tmp_path / "fake"}:{CONFIGS.parent / "src"}
          - export CUDA_VISIBLE_DEVICES=0,1
        jobs: 1
    """)
    cluster = make_cluster(config, echo=lambda *_: None)
    try:
        deadline = time.monotonic() + 60
        while len(cluster.scheduler_info["workers"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = cluster.scheduler_info["workers"].values()
        (job,) = cluster.worker_spec
        assert sorted(w["name"] for w in workers) == [f"{job}-0", f"{job}-1"]
        assert all(w["resources"] == {"GPU": 1} and w["nthreads"] == 1 for w in workers)
        assert cluster.observed == cluster.plan  # what joined is what was planned: nothing unaccounted for
        cluster.scale(2)  # two workers: the job already running, no second submission
        time.sleep(1)
        assert len(cluster.worker_spec) == 1 and len(list((tmp_path / "jobs").glob("*.sh"))) == 1
        adaptive = cluster.adapt(minimum_jobs=1, maximum_jobs=3)  # as make_cluster does for `adapt:`
        assert (adaptive.minimum, adaptive.maximum) == (2, 6)  # 1..3 jobs of 2 GPU workers, not 1..3 workers
    finally:
        cluster.close()
