"""Entry point for GPU worker jobs on HPC: `python -m volrestore.cluster.gpu_worker SCHEDULER ...` runs `dask cuda worker`."""

import sys


def main(argv=None):
    """Run `dask cuda worker` with these arguments: one worker per visible GPU, pinned to it."""
    try:
        from dask_cuda.cli import cuda
    except ImportError:
        sys.exit("error: GPU workers need dask-cuda; install it with: pip install 'volrestore[gpu]'")
    # dask-cuda starts one worker process per visible GPU and pins each with CUDA_VISIBLE_DEVICES.
    cuda(["worker", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
