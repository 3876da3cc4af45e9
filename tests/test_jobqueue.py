"""HPC cluster YAML: validation errors and the job scripts dask-jobqueue would submit (offline)."""

import textwrap
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
    # one pinned dask-cuda worker per GPU: GPU resource, a quarter of the threads and memory each (last flag wins)
    assert worker.split("--resources GPU=1 --nthreads 4 --memory-limit ")[1].startswith("29.80GiB")
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
