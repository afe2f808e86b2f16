#!/usr/bin/env bash
# The default world model from nothing: record the data, train, evaluate (issue 10).
#
#   bash train/recipes/default.sh                       # everything, default sizes
#   STEPS=data bash train/recipes/default.sh            # only the data step
#   STEPS=data GAMES=pong,basic FRAMES=20 TRAIN_SEEDS=0 HELDOUT_SEEDS=1000 \
#       DATA=/tmp/toy bash train/recipes/default.sh     # toy size: seconds
#
# Knobs (environment):
#   STEPS          which steps run, of "data train eval" (default: all three)
#   DATA           data folder (default: <repo>/data/default; data/ is git-ignored)
#   PYTHON         interpreter (default: <repo>/.venv/bin/python, else python3)
#   GAMES          games for train.record (default: mix = pong, breakout, mspacman, seaquest,
#                  spaceinvaders + ViZDoom basic, defend_the_line, health_gathering,
#                  my_way_home, deadly_corridor; `python -m train.record --list`)
#   FRAMES         frames a session (default 2000)
#   TRAIN_SEEDS    seeds of the training sessions (default 0-3)
#   HELDOUT_SEEDS  seeds of the held-out sessions, disjoint from the training ones
#                  (default 1000-1001); every number that matters is measured on these
#   JOBS           parallel recording processes (default 2, the cores of this machine)
#   TRAIN_ARGS     extra iwm-train flags (default none; e.g. "--steps 2 --batch_size 8" for a toy run)
#   EVAL_ARGS      extra iwm-eval flags (default none)
#   CF_GAMES       ALE games for action discrimination (default: the five of the mix)
#   CF_STATES      cloned states per game (default 40)
#   SHIP           where the exported model goes (default: iwm_bus/weights/default.pt)
#   RUN            the training run folder (default: <repo>/runs/default)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DATA="${DATA:-$ROOT/data/default}"
# shellcheck source=train/recipes/common.sh
source "$ROOT/train/recipes/common.sh"  # PYTHON, want
STEPS="${STEPS:-data train eval}"
GAMES="${GAMES:-mix}"
FRAMES="${FRAMES:-2000}"
TRAIN_SEEDS="${TRAIN_SEEDS:-0-3}"
HELDOUT_SEEDS="${HELDOUT_SEEDS:-1000-1001}"
JOBS="${JOBS:-2}"
TRAIN_ARGS="${TRAIN_ARGS:-}"
EVAL_ARGS="${EVAL_ARGS:-}"
CF_GAMES="${CF_GAMES:-ALE/Pong-v5,ALE/Breakout-v5,ALE/MsPacman-v5,ALE/Seaquest-v5,ALE/SpaceInvaders-v5}"
CF_STATES="${CF_STATES:-40}"
SHIP="${SHIP:-$ROOT/iwm_bus/weights/default.pt}"
RUN="${RUN:-$ROOT/runs/default}"
DATA="$(mkdir -p "$DATA" && cd "$DATA" && pwd)"  # absolute: the data step runs inside it

# ------------------------------------------------------------------------------ DATA STEP
# One session per game and seed, recorded in-process by the exploration policy (uniform
# random ids of the shared 18-action vocabulary, docs/actions.md, each held 1..8 steps):
#   $DATA/train/<game>-s<seed>.mcap     seeds $TRAIN_SEEDS
#   $DATA/heldout/<game>-s<seed>.mcap   seeds $HELDOUT_SEEDS
# Wall time at the default sizes (10 games x 6 seeds x 2000 frames = 120,000 frames,
# 1.8 GB: ViZDoom ~33 KB a frame, ALE ~1 KB), 2 jobs on this 2-core machine: 38 s measured
# (80,000 training + 40,000 held-out frames). One job on an idle core records ~2,200 ALE
# frames/s and ~1,100 ViZDoom frames/s. Complete sessions are kept on a rerun (deterministic per
# seed); delete $DATA to record them again.
if want data; then
    (
        cd "$DATA"  # ViZDoom writes _vizdoom.ini and _vizdoom/ into the working directory
        "$PYTHON" -m train.record --out "$DATA/train" --games "$GAMES" --frames "$FRAMES" \
            --seeds "$TRAIN_SEEDS" --jobs "$JOBS" --skip-existing
        "$PYTHON" -m train.record --out "$DATA/heldout" --games "$GAMES" --frames "$FRAMES" \
            --seeds "$HELDOUT_SEEDS" --jobs "$JOBS" --skip-existing
    )
fi

# ------------------------------------------------------------------------------ TRAIN STEP
# Phase 3 on the training sessions with the cpu-default preset (train/presets.py): ViT-Ti
# (6 blocks, patch 8) at 64 px, 3-layer predictor, 18 action ids, K=2, change-weighted
# targets, VICReg variance/covariance terms, 2400 steps of batch 32 (cosine LR over 2400).
# Resumes when RUN holds a checkpoint (a killed run loses at most 200 steps). Wall time on
# this 2-core machine: ~1.5 s a step alone, about an hour. The shipped iwm-default-v1 is
# its last step, 2400 (trained over two sessions: stopped at 1600, resumed with
# --resume auto; resume is exact, so one run gives the same weights on the same CPU).
if want train; then
    # shellcheck disable=SC2086  # TRAIN_ARGS is a list of flags
    "$PYTHON" -m train --preset cpu-default --sessions "$DATA/train" --out_dir "$RUN" \
        --resume auto --no_progress $TRAIN_ARGS
fi

# ------------------------------------------------------------------------------ EVAL STEP
# iwm-eval on the held-out sessions (other seeds than training) and on counterfactual next
# frames of the ALE games, then export the inference checkpoint with its provenance (data,
# run config, eval summary, action vocabulary) into the package. About 10 minutes here.
if want eval; then
    # shellcheck disable=SC2086
    "$PYTHON" -m train.eval_cli --model "$RUN/last.pt" --sessions "$DATA/heldout" \
        --games "$CF_GAMES" --cf_states "$CF_STATES" --out "$RUN/eval" $EVAL_ARGS
    "$PYTHON" -m train.export --from "$RUN/last.pt" --eval "$RUN/eval/eval.json" \
        --name "iwm-default-v1" --out "$SHIP"
fi
