"""benchmarks/plan_scale.py (issue 14, P7) on a lazily created 35 TB volume: it plans as restore does, keeps the
progress records under 10⁵ by grouping blocks, drives the runner, and reports what the client process pays per task."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import plan_scale  # noqa: E402


def test_plan_scale_groups_blocks_and_reports_the_client_cost_per_task(session_cluster):
    shape = (4096, 65536, 65536)
    r = plan_scale.main(["--shape", *map(str, shape), "--tasks", "40", "--no-records", "--json",
                         "--cluster", session_cluster.scheduler.address])
    assert r["voxels"] == shape[0] * shape[1] * shape[2] and r["tasks_run"] == 40
    assert r["write_blocks"] > 100_000 and r["progress_group"] >= 2 and r["progress_records"] <= 100_000
    assert r["progress_records"] == -(-r["write_blocks"] // r["progress_group"])
    assert r["client_cpu_ms_per_task"] > 0
    assert abs(r["client_capacity_tasks_per_s"] - 1e3 / r["client_cpu_ms_per_task"]) <= 1
