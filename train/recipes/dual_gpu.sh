#!/usr/bin/env bash
# The dual-stream pair (issue 11) trained on one GPU machine: the same two models, objectives
# and data as train/recipes/dual.sh, with the gpu-dual-* presets (batch 256, the schedule fitted
# to MINUTES of training). Run from the repo root on the GPU host:
#
#   MINUTES=7 bash train/recipes/dual_gpu.sh
#   WHEELS=.whl MINUTES=7 OUT=$OUT bash train/recipes/dual_gpu.sh   # a host without the games
#
# Steps: record the default's training sessions again (train.record is deterministic per seed;
# a fingerprint of two sessions' 64 px frames is printed to compare with the CPU machine's),
# train both streams in parallel on the one GPU from the shipped default's encoder, export
# each beside the run, then time the pair in the worker's own code (bench/dual.py). Evaluate
# on the held-out sessions afterwards, on any machine, and stamp the exports with that eval:
#   STEPS=eval RUNS=runs/gpu RECIPE=train/recipes/dual_gpu.sh bash train/recipes/dual.sh
#
# Measured on a lent H200 (16 cores; 2026-11-30, MINUTES=6): recording the 20 ViZDoom sessions
# 9 s (4,300 frames/s over 16 jobs), loading 80k frames ~50 s, then 0.41 s a step for each stream with both on
# the one GPU (t_forward 0.13 s, t_backward 0.16 s; t_data ~0, made ahead on a thread):
# 879 / 864 steps of batch 256. The step is bound by kernel launches (a CPU profile counts
# ~40k aten calls per step: a 16-layer predictor, K=2 rollouts, views, 4 heads), not by the
# GPU's arithmetic, so a larger batch should cost little more per step (not measured yet).
# The data side then grows with the batch: since this run the views are made for the whole
# batch at once (train/augment.py; on a 2-core CPU, batch 256 / 1024: blur 28 -> 7 ms /
# 84 -> 43 ms, crop 15 -> 17 ms / 66 -> 79 ms, i.e. the crop is no faster on a CPU).
#
# Knobs (environment):
#   MINUTES   training budget per stream, both running at once (default 7)
#   RUNS      run folders $RUNS/<stream> and exports $RUNS/<stream>.pt (default <repo>/runs/gpu)
#   OUT       if set, the exports, logs and bench table are copied here (the device's $OUT)
#   DATA      where the sessions are recorded (default /tmp/iwm-data)
#   JOBS      recording and loading processes (default: the host's cores)
#   WHEELS    a folder of wheels (ale-py, gymnasium, vizdoom, mcap, ...) unpacked into a
#             private site folder first, for a host that has torch and timm but not these
#   PYTHON    interpreter (default python3)
#   GAMES, SEEDS, FRAMES  the recorded data (default mix, 0-3, 2000: the default's training
#             sessions); GAMES=pong,basic SEEDS=0 FRAMES=40 TRAIN_ARGS="--device cpu --steps 2
#             --batch_size 8" is a toy run of the whole recipe in a minute on a CPU
#   TRAIN_ARGS  extra iwm-train flags
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
MINUTES="${MINUTES:-7}"
RUNS="${RUNS:-$ROOT/runs/gpu}"
DATA="${DATA:-/tmp/iwm-data}"
JOBS="${JOBS:-$(nproc)}"
INIT="$ROOT/iwm_bus/weights/default.pt"
TRAIN_ARGS="${TRAIN_ARGS:-}"
GAMES="${GAMES:-mix}"
SEEDS="${SEEDS:-0-3}"
FRAMES="${FRAMES:-2000}"
cd "$ROOT"

# shellcheck source=wheels.sh
source train/recipes/wheels.sh
mkdir -p "$RUNS" "$DATA"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"

# -- data: the default's 40 training sessions (10 games x seeds 0-3, 2000 frames each).
# A ViZDoom start can hang now and then: each try is bounded and complete sessions are kept.
(
    cd "$DATA"  # ViZDoom writes _vizdoom.ini here
    for try in 1 2 3; do
        if timeout -k 5 240 "$PYTHON" -m train.record --out "$DATA/train" --games "$GAMES" \
            --frames "$FRAMES" --seeds "$SEEDS" --jobs "$JOBS" --skip-existing; then exit 0; fi
        echo "record: try $try did not finish" >&2
        pkill -f 'vizdoom/vizdoom' || true
    done
    exit 1
)
"$PYTHON" - "$DATA/train" <<'EOF'
import hashlib, sys
from train.data import FrameStore
for name in ("pong-s0", "basic-s0"):  # the same digests on the CPU machine = the same data
    s = FrameStore.from_sessions([f"{sys.argv[1]}/{name}.mcap"], 64, 16)
    print(f"fingerprint {name}: {len(s)} frames, sha256 {hashlib.sha256(s.frames.numpy().tobytes()).hexdigest()[:16]}")
EOF

# -- train both streams at once on the one GPU
pids=()
for s in invariant equivariant; do
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=$(( (JOBS + 1) / 2 )) "$PYTHON" -m train --preset "gpu-dual-$s" \
        --sessions "$DATA/train" --init_from "$INIT" --out_dir "$RUNS/$s" \
        --load_workers $(( (JOBS + 1) / 2 )) --minutes "$MINUTES" --no_progress $TRAIN_ARGS \
        >"$RUNS/$s.log" 2>&1 &
    pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null' EXIT
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
trap - EXIT
for s in invariant equivariant; do tail -n "$([[ $status == 0 ]] && echo 4 || echo 40)" "$RUNS/$s.log"; done
[[ $status == 0 ]] || { echo "a training run failed (logs above)" >&2; exit 1; }

for s in invariant equivariant; do
    "$PYTHON" -m train.export --from "$RUNS/$s/last.pt" --name "iwm-$s-v1" \
        --recipe train/recipes/dual_gpu.sh --out "$RUNS/$s.pt"
done

if [[ -n "${OUT:-}" ]]; then  # the device returns files of at most 16 MiB: exports in parts
    mkdir -p "$OUT"
    for s in invariant equivariant; do split -b 15M -d "$RUNS/$s.pt" "$OUT/$s.pt.part"; done
fi

# -- what the pair costs per frame on this GPU, in the worker's own code (CUDA graphs)
timeout -k 5 120 "$PYTHON" bench/dual.py --device cuda --frames 200 \
    --semantic "$RUNS/invariant.pt" --equivariant "$RUNS/equivariant.pt" \
    | tee "$RUNS/bench_dual_cuda.txt" || echo "bench/dual.py did not finish" >&2

if [[ -n "${OUT:-}" ]]; then
    for s in invariant equivariant; do cp "$RUNS/$s/metrics.csv" "$RUNS/$s-metrics.csv"; done
    tar -C "$RUNS" -czf "$OUT/logs.tgz" invariant.log equivariant.log invariant-metrics.csv \
        equivariant-metrics.csv $(cd "$RUNS" && ls bench_dual_cuda.txt 2>/dev/null)
fi
