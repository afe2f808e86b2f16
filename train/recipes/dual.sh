#!/usr/bin/env bash
# The dual-stream pair (issue 11): an invariant and an equivariant world model, each started
# from the shipped default's encoder and trained on the default's data, then evaluated on the
# held-out sessions and exported beside the default.
#
#   bash train/recipes/dual.sh                  # both streams: train, evaluate, export
#   STREAMS=invariant bash train/recipes/dual.sh
#   STEPS=eval bash train/recipes/dual.sh       # evaluate + export what runs/ holds
#
# Knobs (environment): DATA, PYTHON, CF_GAMES, CF_STATES as in default.sh, and
#   STREAMS     which of "invariant equivariant" (default: both)
#   STEPS       which of "train eval" (default: both; record the data with default.sh first)
#   INIT        the encoder both start from (default: iwm_bus/weights/default.pt)
#   RUNS        run folders go to $RUNS/<stream> (default: <repo>/runs)
#   TRAIN_ARGS, EVAL_ARGS  extra iwm-train / iwm-eval flags
#   THREADS     torch threads per run; the two runs go in parallel (default 1: 2 cores here)
#   RECIPE      the recipe named in the exports' provenance (default this one; the eval of a
#               GPU run, whose exports $RUNS/<stream>.pt it re-stamps: train/recipes/dual_gpu.sh)
#
# Presets cpu-invariant / cpu-equivariant (train/presets.py): Phase 3 on actions plus a views
# loss on the same frames (views_weight 1), 600 steps of batch 32. The invariant predictor
# (4 layers) is not told the augmentation; the equivariant one (16 layers of width 96) is,
# with strong + destructive augmentations, as next-frame calls (views_residual). Wall time
# on this 2-core machine, both runs in parallel at 1 thread each: ~4 s a step for the
# invariant, ~5 s for the equivariant: about 50 minutes; each eval ~12 minutes and ~12 GB
# of RAM (run the evals one after the other, as below).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DATA="${DATA:-$ROOT/data/default}"
# shellcheck source=train/recipes/common.sh
source "$ROOT/train/recipes/common.sh"  # PYTHON, want
STREAMS="${STREAMS:-invariant equivariant}"
STEPS="${STEPS:-train eval}"
INIT="${INIT:-$ROOT/iwm_bus/weights/default.pt}"
RUNS="${RUNS:-$ROOT/runs}"
TRAIN_ARGS="${TRAIN_ARGS:-}"
EVAL_ARGS="${EVAL_ARGS:-}"
THREADS="${THREADS:-1}"
RECIPE="${RECIPE:-train/recipes/dual.sh}"
CF_GAMES="${CF_GAMES:-ALE/Pong-v5,ALE/Breakout-v5,ALE/MsPacman-v5,ALE/Seaquest-v5,ALE/SpaceInvaders-v5}"
CF_STATES="${CF_STATES:-40}"

if want train; then
    pids=()
    for s in $STREAMS; do
        # shellcheck disable=SC2086
        OMP_NUM_THREADS="$THREADS" "$PYTHON" -m train --preset "cpu-$s" \
            --sessions "$DATA/train" --init_from "$INIT" --out_dir "$RUNS/$s" \
            --resume auto --no_progress $TRAIN_ARGS &
        pids+=($!)
    done
    trap 'kill "${pids[@]}" 2>/dev/null' EXIT  # a failed run does not orphan the other
    for p in "${pids[@]}"; do wait "$p"; done
    trap - EXIT
fi

if want eval; then
    for s in $STREAMS; do
        src="$RUNS/$s/last.pt"  # a training run here, or the export of one made elsewhere
        [[ -f "$src" ]] || src="$RUNS/$s.pt"
        # shellcheck disable=SC2086
        "$PYTHON" -m train.eval_cli --model "$src" --sessions "$DATA/heldout" \
            --games "$CF_GAMES" --cf_states "$CF_STATES" --out "$RUNS/$s/eval" $EVAL_ARGS
        "$PYTHON" -m train.export --from "$src" --eval "$RUNS/$s/eval/eval.json" \
            --name "iwm-$s-v1" --recipe "$RECIPE" --out "$ROOT/iwm_bus/weights/$s.pt"
    done
fi
