#!/usr/bin/env bash
# GPU check for issues 6 and 7, in ONE device-tool call on an H100/H200 (torch preinstalled there, no network):
#   here, once:   bash ../shared/device/fetch-wheels.sh .device-wheels     (the dask/zarr/monai wheels it lacks)
#   device tool:  run(command="bash benchmarks/gpu_check.sh", carry=[".device-wheels"], timeout_s=560)
# Installs the wheels, then runs benchmarks/gpu_check.py: `volrestore benchmark` on a --cluster cuda cluster for
# tiny-3d and paper-2d at K=1 and K=8, 20 steps, without and with torch.compile. Each run restores a generated volume
# end to end and reports GPUs used, bare vs end-to-end voxels/s, TFLOP/s and share of the bf16 peak, and peak GPU
# memory. Prints one JSON summary; $OUT/gpu_check.json holds it (rewritten after every run) and $OUT/install.log.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
if ! bash .device-wheels/install.sh >"$OUT/install.log" 2>&1; then
  tail -40 "$OUT/install.log"
  echo "wheel install failed (see above); no benchmark run" >&2
  exit 1
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export DASK_DISTRIBUTED__WORKER__DAEMON=False  # torch.compile starts compile worker processes inside Dask workers
export DASK_LOGGING__DISTRIBUTED=warning        # keep the output tail for the results
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/gpu_check.py --out "$OUT" --budget "${BUDGET_S:-420}"
