#!/usr/bin/env bash
# The GPU rows of the benchmarks, in one run on a GPU host (what a lent H200 measured is in
# docs/results.md): worker recovery after SIGKILL (bench/recovery.py) and frame ->
# surprise latency through the real sidecar (bench/e2e.py), shipped model, CUDA graphs.
#
#   bash bench/gpu.sh                    # python3 with torch, timm and the project's deps
#   WHEELS=.whl bash bench/gpu.sh        # a host with torch + timm only: unpack these wheels
#
# Knobs: PYTHON (python3), KILLS (3), SECONDS_E2E (10), WHEELS (see train/recipes/wheels.sh)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
cd "$ROOT"
# shellcheck source=../train/recipes/wheels.sh
source train/recipes/wheels.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true

timeout -k 5 140 "$PYTHON" bench/recovery.py --device cuda --kills "${KILLS:-3}" --settle 10 \
    || echo "bench/recovery.py did not finish" >&2
timeout -k 5 110 "$PYTHON" bench/e2e.py --device cuda --models default \
    --sizes 210x160 480x640 --modes realtime --seconds "${SECONDS_E2E:-10}" \
    || echo "bench/e2e.py did not finish" >&2
