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
#   FRAMES         frames a session (default 4000)
#   TRAIN_SEEDS    seeds of the training sessions (default 0-3)
#   HELDOUT_SEEDS  seeds of the held-out sessions, disjoint from the training ones
#                  (default 1000-1001); every number that matters is measured on these
#   JOBS           parallel recording processes (default 2, the cores of this machine)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DATA="${DATA:-$ROOT/data/default}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
STEPS="${STEPS:-data train eval}"
GAMES="${GAMES:-mix}"
FRAMES="${FRAMES:-4000}"
TRAIN_SEEDS="${TRAIN_SEEDS:-0-3}"
HELDOUT_SEEDS="${HELDOUT_SEEDS:-1000-1001}"
JOBS="${JOBS:-2}"
DATA="$(mkdir -p "$DATA" && cd "$DATA" && pwd)"  # absolute: the data step runs inside it

want() { [[ " $STEPS " == *" $1 "* ]]; }

# ------------------------------------------------------------------------------ DATA STEP
# One session per game and seed, recorded in-process by the exploration policy (uniform
# random ids of the shared 18-action vocabulary, docs/actions.md, each held 1..8 steps):
#   $DATA/train/<game>-s<seed>.mcap     seeds $TRAIN_SEEDS
#   $DATA/heldout/<game>-s<seed>.mcap   seeds $HELDOUT_SEEDS
# Wall time at the default sizes (10 games x 6 seeds x 4000 frames = 240,000 frames,
# ~3.4 GB: ViZDoom ~33 KB a frame, ALE ~1 KB), 2 jobs on this 2-core machine: about 2.5 min,
# extrapolated from a measured run at FRAMES=1000 (60,000 frames, 844 MB): 37 s, with other
# work loading the machine (load ~3-5). One job on an idle core records ~2,200 ALE frames/s
# and ~1,100 ViZDoom frames/s. Complete sessions are kept on a rerun (deterministic per
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
# TRAIN STEP
if want train; then
    : # placeholder: iwm-train on "$DATA/train" (sessions), checkpoint into the package
fi

# ------------------------------------------------------------------------------ EVAL STEP
# EVAL STEP
if want eval; then
    : # placeholder: iwm-eval on "$DATA/heldout" (+ train.counterfactual for the ALE games)
fi
