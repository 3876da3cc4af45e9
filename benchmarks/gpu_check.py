"""GPU check for issues 6 and 7: `volrestore benchmark` on one cuda cluster for tiny-3d and paper-2d, K=1 and K=8,
20 steps, without and with torch.compile; prints one JSON summary (and writes it under --out after every run, so a
run cut short still leaves what it measured).

    python benchmarks/gpu_check.py --out DIR [--budget 420]     # on the GPU machine (see gpu_check.sh)
    python benchmarks/gpu_check.py --device cpu --quick          # CPU smoke test of this driver (tiny sizes)
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

from volrestore.evaluation import benchmark
from volrestore.cluster.client import connect

# Sizes keep each run at seconds on an H100: tiny-3d 128³ = 27 tiles of 64³; paper-2d 2 x 512² = 18 tiles of 256²
# (paper-2d costs 363 GFLOP per evaluation at 256², so K=8 x 20 steps is ~1 PFLOP per pass).
PRESETS = {"tiny-3d": (128, 128, 128), "paper-2d": (2, 512, 512)}
# Most informative first (a run cut by the budget drops the last): eager K=1/K=8, then compiled, K=8 before K=1.
CONFIGS = ([dict(preset=p, samples=k, compile=False) for p in PRESETS for k in (1, 8)]
           + [dict(preset=p, samples=k, compile=True) for k in (8, 1) for p in ("paper-2d", "tiny-3d")])


def environment(device):
    env = {"python": platform.python_version(), "host_cpus": os.cpu_count()}
    try:
        import torch

        env.update(torch=torch.__version__, cuda=torch.version.cuda,
                   gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
    except Exception as exc:  # reported, not fatal: the runs then say what failed
        env["torch_error"] = repr(exc)
    if device == "cuda":
        try:
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
        except (OSError, subprocess.SubprocessError) as exc:
            env["nvidia_smi"] = repr(exc)
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu-check"), help="folder for gpu_check.json")
    ap.add_argument("--budget", type=float, default=420, help="seconds; no new run starts after this")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="tiny sizes and 1 step (a smoke test of this script)")
    ap.add_argument("--dry-run", action="store_true", help="print the planned runs and exit")
    args = ap.parse_args(argv)
    plan = [dict(c, steps=args.steps, size=PRESETS[c["preset"]]) for c in CONFIGS if not (args.quick and c["compile"])]
    if args.quick:  # tiny volumes and tiles, 1 step: a CPU gets through in about a minute
        for c in plan:
            three_d = c["preset"] == "tiny-3d"
            c.update(steps=1, size=(16, 16, 16) if three_d else (1, 16, 16), tile=[16] * 3 if three_d else [1, 16, 16], overlap=4)
    if args.dry_run:
        print(json.dumps(plan, indent=1))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summary = {"environment": environment(args.device), "runs": [], "skipped": []}

    def save():
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        (out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=float))

    # One cluster for every run: dask-cuda start-up is paid once; the workers cache one restorer per configuration.
    with connect("cuda" if args.device == "cuda" else "local", workers=None if args.device == "cuda" else 1, echo=lambda *_: None) as client:
        for cfg in plan:
            if time.perf_counter() - t0 > args.budget:
                summary["skipped"].append(cfg)
                continue
            t_run = time.perf_counter()
            try:
                r = benchmark.run(cfg["preset"], samples=cfg["samples"], steps=cfg["steps"], device=args.device,
                                  size=cfg["size"], tile=cfg.get("tile"), overlap=cfg.get("overlap"),
                                  compile=cfg["compile"], cluster=client, batch=4)
                summary["runs"].append(r)
                print(benchmark.report(r), flush=True)
            except Exception as exc:
                summary["runs"].append({**cfg, "error": f"{type(exc).__name__}: {exc}",
                                        "traceback": traceback.format_exc()[-3000:]})
                print(f"FAILED {cfg}: {type(exc).__name__}: {exc}", flush=True)
            summary["runs"][-1]["run_s"] = round(time.perf_counter() - t_run, 1)
            save()
    save()
    print(json.dumps(summary, default=float))
    return 1 if any("error" in r for r in summary["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
