"""Dask clusters: local, dask-cuda, existing schedulers, dask-jobqueue (SLURM/PBS/LSF), GPU worker entry point."""
