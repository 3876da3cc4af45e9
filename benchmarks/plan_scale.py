"""P7: plan a petabyte restore on this machine's client, no data written, and report what the client pays.

A lazily created OME-Zarr (metadata only: every chunk is missing, so reads return the fill value) of
55000 x 100000 x 100000 uint16 voxels (1.1 PB) with 64 x 256 x 256 chunks is planned exactly as `volrestore restore`
plans it (validation, input fingerprint, tile grid, write-blocks, progress groups), then

- the runner is started on a real local Dask cluster with a no-op task per progress group, and stopped after
  `--tasks` tasks: time to the first task, tasks in flight, submission rate, and the CPU this process (client and
  scheduler) spends per task, whose inverse is the rate it sustains on a core of its own (on a real cluster the
  workers run elsewhere; here they share the machine's cores with it);
- progress records are written for every group (one line each) and the resume scan reads them back;

and the client's peak RSS over all of it is printed. Goals (issue 14): RSS <= 1 GB, first task <= 60 s, <= 1e5
progress records, >= 500 tasks/s.

    python benchmarks/plan_scale.py [--shape Z Y X] [--tasks 3000] [--cluster tcp://HOST:PORT] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from volrestore.blockwise import blocks
from volrestore.blockwise.plan import plan as make_plan
from volrestore.blockwise.runner import default_window, run_blockwise
from volrestore.cluster.client import connect
from volrestore.io import ngff


def noop(plan, first):
    """The task: nothing, so the figures are the client's and the scheduler's own costs."""
    return first


class Stop(Exception):
    """Raised from on_result to end the run after enough tasks."""


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs=3, type=int, default=[55000, 100000, 100000], metavar=("Z", "Y", "X"))
    parser.add_argument("--chunks", nargs=3, type=int, default=[64, 256, 256], metavar=("Z", "Y", "X"))
    parser.add_argument("--tasks", type=int, default=3000, help="tasks to run before stopping the runner")
    parser.add_argument("--workers", type=int, default=2, help="workers of the local cluster")
    parser.add_argument("--cluster", default="local",
                        help="local (scheduler in this process) or tcp://HOST:PORT of a running scheduler")
    parser.add_argument("--window", type=int, default=None, help="tasks in flight (default: the runner's)")
    parser.add_argument("--no-records", action="store_true", help="skip writing and scanning progress records")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="volrestore-plan-scale-"))
    image = work / "petabyte.ome.zarr"
    ngff.create_image(image, shape=args.shape, dtype="uint16", axes="zyx", scale=[1, 1, 1], chunks=args.chunks)
    voxels = args.shape[0] * args.shape[1] * args.shape[2]

    t0 = time.perf_counter()
    plan, spec = make_plan(str(image), model="gaussian")
    plan = type(plan)(**{**plan.__dict__, "progress": str(work / "progress")})
    t_plan = time.perf_counter() - t0
    n_blocks, n_groups = blocks.n_blocks(plan), blocks.n_groups(plan)

    result = {"voxels": voxels, "bytes": voxels * 2, "write_blocks": n_blocks, "progress_group": plan.progress_group,
              "progress_records": n_groups, "plan_s": round(t_plan, 2)}
    with connect(args.cluster, args.workers, echo=lambda *_: None) as client:
        first, done, t_start, cpu_start = [], [0], time.perf_counter(), time.process_time()

        def on_result(_, __):
            if not first:
                first.append(time.perf_counter() - t0)
            done[0] += 1
            if done[0] >= args.tasks:
                raise Stop

        try:
            run_blockwise(client, noop, blocks.iter_groups(plan), args=(plan,), on_result=on_result, progress=False,
                          what="planning", key_prefix="plan-scale", window=args.window)
        except Stop:
            pass
        seconds = time.perf_counter() - t_start
        # CPU of this process (client and, with `local`, the scheduler; every thread): what one task costs the
        # submitting side, apart from the workers, which on a real cluster run on other machines but here share the
        # same 2 cores. Its inverse is the rate this side sustains on one core of its own.
        cpu_per_task = (time.process_time() - cpu_start) / max(done[0], 1)
        window = args.window or default_window(sum(client.nthreads().values()))
    result.update({"first_task_s": round(first[0], 2), "tasks_run": done[0], "tasks_per_s": round(done[0] / seconds),
                   "tasks_in_flight": window, "client_cpu_ms_per_task": round(1e3 * cpu_per_task, 3),
                   "client_capacity_tasks_per_s": round(1 / cpu_per_task)})

    if args.no_records:
        result["client_peak_rss_mb"] = round(peak_rss_mb())
        print(json.dumps(result) if args.json else result)
        return result
    t1 = time.perf_counter()
    for group in range(n_groups):
        blocks.mark_done(plan, blocks.group_indices(plan, group)[0]) if plan.progress_group == 1 else \
            _record(plan, group)
    result["write_records_s"] = round(time.perf_counter() - t1, 1)
    t2 = time.perf_counter()
    done_blocks = blocks.count_done(plan)
    result["resume_scan_s"] = round(time.perf_counter() - t2, 1)
    result["resume_found_done"] = done_blocks
    result["client_peak_rss_mb"] = round(peak_rss_mb())
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>22}: {value}")
    return result


def _record(plan, group):
    """A progress record holding the group's first block (the record count, not its length, drives the scan)."""
    path = Path(blocks.marker_path(plan, group))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("_".join(map(str, blocks.group_indices(plan, group)[0])) + "\n")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
