#!/usr/bin/env bash
# The action-aware default world model (issue 23): record counterfactual data from 36 ALE games
# and 5 ViZDoom scenarios, train the counterfactual / temporal / inverse-dynamics terms from
# scratch, widen: go on from that run's step 1800 with 22 more ALE games, evaluate on held-out
# seeds and on ALE games never trained on, export (iwm-default-v3).
#
#   bash train/recipes/actions.sh                     # everything (~2.5 h on this 2-core CPU)
#   STEPS=data bash train/recipes/actions.sh          # only the data step (~10 min)
#   STEPS="train eval" TRAIN_STEPS=3000 bash train/recipes/actions.sh
#   STEPS=data GAMES=ALE/Pong-v5 FRAMES=100 DATA=/tmp/toy bash train/recipes/actions.sh
#
# Knobs (environment):
#   STEPS        which of "data train widen eval" (default: all four; without widen the
#                eval and export take the first run, as iwm-default-v2 was)
#   DATA         data folder (default <repo>/data/actions; data/ is git-ignored)
#   PYTHON       interpreter (default <repo>/.venv/bin/python, else python3)
#   GAMES        ALE games of the training mix, comma-separated (default: the 36 below)
#   MORE_GAMES   ALE games the widen step adds (default: the 22 below; data in DATA/more)
#   DOOM         ViZDoom scenarios beside them, factual play only (default: train.record's doom)
#   FRAMES       frames a training session (default 2000; a counterfactual state every 2nd)
#   HELDOUT_GAMES, HELDOUT_FRAMES  held-out sessions (default: the mix, 1000 frames, seed 1000)
#   UNSEEN       ALE games kept out of training and scored as their own split
#   CF_STATES    cloned states a game in the eval (default 30; other seeds than training)
#   PRESET       cpu-actions-conv (default: the small conv encoder, trained from scratch) or
#                cpu-actions (the ViT-Ti of iwm-default-v1 with the action terms)
#   INIT         the weights training starts from (default: none, a fresh model, for the conv
#                preset; iwm-default-v1 read from git history for cpu-actions:
#                train/recipes/default.sh rebuilds it)
#   TRAIN_STEPS  optimiser steps (default 2200: what iwm-default-v2 ran, ~55 min here); the
#                cosine schedule spans them (a --minutes budget would fit them to the time,
#                but fits from the first 50 steps' speed: a busy machine then cuts it short)
#   WIDEN_INIT   the checkpoint the widen step starts from, weights and predictor (default
#                RUN/step_0001800.pt: iwm-default-v2)
#   WIDEN_STEPS  its optimiser steps (default 2400, peak lr 5e-4, warmup 50; ~70 min here)
#   RUN, SHIP    run folder (default <repo>/runs/actions; the widen step's: RUN-wide), export
#                (iwm_bus/weights/default.pt)
#   TRAIN_ARGS, EVAL_ARGS  extra iwm-train / iwm-eval flags
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DATA="${DATA:-$ROOT/data/actions}"
# shellcheck source=train/recipes/common.sh
source "$ROOT/train/recipes/common.sh"  # PYTHON, want
STEPS="${STEPS:-data train widen eval}"
GAMES="${GAMES:-ALE/Pong-v5,ALE/Breakout-v5,ALE/MsPacman-v5,ALE/Seaquest-v5,ALE/SpaceInvaders-v5,ALE/Alien-v5,ALE/Amidar-v5,ALE/Asterix-v5,ALE/BankHeist-v5,ALE/BeamRider-v5,ALE/Centipede-v5,ALE/ChopperCommand-v5,ALE/DemonAttack-v5,ALE/Frostbite-v5,ALE/Gopher-v5,ALE/Hero-v5,ALE/Kangaroo-v5,ALE/Qbert-v5,ALE/Riverraid-v5,ALE/RoadRunner-v5,ALE/TimePilot-v5,ALE/Venture-v5,ALE/Tennis-v5,ALE/Enduro-v5,ALE/Asteroids-v5,ALE/Atlantis-v5,ALE/Berzerk-v5,ALE/CrazyClimber-v5,ALE/Jamesbond-v5,ALE/KungFuMaster-v5,ALE/NameThisGame-v5,ALE/Phoenix-v5,ALE/StarGunner-v5,ALE/UpNDown-v5,ALE/WizardOfWor-v5,ALE/Zaxxon-v5}"
MORE_GAMES="${MORE_GAMES:-ALE/Assault-v5,ALE/BattleZone-v5,ALE/Bowling-v5,ALE/Carnival-v5,ALE/Defender-v5,ALE/DoubleDunk-v5,ALE/ElevatorAction-v5,ALE/FishingDerby-v5,ALE/Gravitar-v5,ALE/IceHockey-v5,ALE/JourneyEscape-v5,ALE/MontezumaRevenge-v5,ALE/Pitfall-v5,ALE/Pooyan-v5,ALE/PrivateEye-v5,ALE/Robotank-v5,ALE/Solaris-v5,ALE/Tutankham-v5,ALE/VideoPinball-v5,ALE/YarsRevenge-v5,ALE/AirRaid-v5,ALE/Adventure-v5}"
DOOM="${DOOM:-doom}"
FRAMES="${FRAMES:-2000}"
HELDOUT_GAMES="${HELDOUT_GAMES:-mix}"
HELDOUT_FRAMES="${HELDOUT_FRAMES:-1000}"
UNSEEN="${UNSEEN:-ALE/Boxing-v5,ALE/Freeway-v5,ALE/Frogger-v5,ALE/Krull-v5,ALE/Galaxian-v5,ALE/DonkeyKong-v5,ALE/MarioBros-v5,ALE/KeystoneKapers-v5,ALE/Pacman-v5,ALE/MrDo-v5,ALE/Kaboom-v5,ALE/Turmoil-v5}"
SEEN_EVAL="${SEEN_EVAL:-ALE/Pong-v5,ALE/Breakout-v5,ALE/MsPacman-v5,ALE/Seaquest-v5,ALE/SpaceInvaders-v5}"
CF_STATES="${CF_STATES:-30}"
TRAIN_STEPS="${TRAIN_STEPS:-2200}"
PRESET="${PRESET:-cpu-actions-conv}"
RUN="${RUN:-$ROOT/runs/actions}"
WIDEN_INIT="${WIDEN_INIT:-$RUN/step_0001800.pt}"
WIDEN_STEPS="${WIDEN_STEPS:-2400}"
SHIP="${SHIP:-$ROOT/iwm_bus/weights/default.pt}"
TRAIN_ARGS="${TRAIN_ARGS:-}"
EVAL_ARGS="${EVAL_ARGS:-}"
V1_COMMIT=7594693  # the commit that shipped iwm-default-v1
DATA="$(mkdir -p "$DATA" && cd "$DATA" && pwd)"

# ------------------------------------------------------------------------------ DATA STEP
# Seed 0 of every game, 2000 frames played by the exploration policy; every 2nd state also the
# next frame under all 18 actions (train.record --counterfactual 2: a .cf.npz beside the
# session; ~1,000 states a game, about 70 % of them with two or more distinct outcomes).
# ViZDoom cannot clone its state here: its sessions feed the temporal and inverse terms only.
# Held-out sessions (seed 1000) of the project's mix for next-latent MRR and surprise AUROC.
# Measured: 6 minutes with 2 jobs on this 2-core machine; 82k frames, 0.25 GB.
if want data; then
    (
        cd "$DATA"  # ViZDoom writes _vizdoom.ini into the working directory
        "$PYTHON" -m train.record --out "$DATA/train" --games "$GAMES" --frames "$FRAMES" \
            --seeds 0 --jobs 2 --counterfactual 2 --skip-existing
        "$PYTHON" -m train.record --out "$DATA/train" --games "$DOOM" --frames "$FRAMES" \
            --seeds 0 --jobs 2 --skip-existing
        if want widen; then
            "$PYTHON" -m train.record --out "$DATA/more" --games "$MORE_GAMES" \
                --frames "$FRAMES" --seeds 0 --jobs 2 --counterfactual 2 --skip-existing
        fi
        "$PYTHON" -m train.record --out "$DATA/heldout" --games "$HELDOUT_GAMES" \
            --frames "$HELDOUT_FRAMES" --seeds 1000 --jobs 2 --skip-existing
    )
fi

# ------------------------------------------------------------------------------ TRAIN STEP
# Preset cpu-actions-conv (train/presets.py): a conv encoder to a 64 x 8 x 8 map at 64 px
# (iwm_bus/model/conv_encoder.py) and a 3-block predictor with the action in every block, a
# 3x3 action-conditioned convolution over the token grid before each block, and an
# inverse-dynamics head; each step 24 factual samples (frames t-1..t+2) and 24 counterfactual
# states (up to 6 outcomes each), bf16 autocast on the CPU (~1.5 s a step here; the
# counterfactual accuracy leaves chance after ~700 steps). cpu-actions: the same terms on
# iwm-default-v1's ViT-Ti (~2.7 s a step; still at chance after 300). Resumes from RUN/last.pt.
if want train; then
    if [[ "$PRESET" == cpu-actions ]]; then INIT="${INIT:-$RUN/iwm-default-v1.pt}"; fi
    INIT="${INIT:-none}"
    init=()
    if [[ "$INIT" != none ]]; then
        if [[ ! -f "$INIT" ]]; then
            mkdir -p "$(dirname "$INIT")"
            if ! git -C "$ROOT" show "$V1_COMMIT:iwm_bus/weights/default.pt" > "$INIT" 2>/dev/null
            then  # no history (a shallow clone or an sdist): continue from the shipped default
                echo "actions.sh: iwm-default-v1 not in git history; starting from the shipped default" >&2
                cp "$ROOT/iwm_bus/weights/default.pt" "$INIT"
            fi
        fi
        init=(--init_from "$INIT")
    fi
    # shellcheck disable=SC2086
    "$PYTHON" -m train --preset "$PRESET" --sessions "$DATA/train" "${init[@]}" \
        --steps "$TRAIN_STEPS" --out_dir "$RUN" --resume auto --no_progress $TRAIN_ARGS
fi

# ------------------------------------------------------------------------------ WIDEN STEP
# iwm-default-v3: the first run's step 1800 (iwm-default-v2: its weights, predictor and heads)
# trained on 58 ALE games instead of 36 (MORE_GAMES beside GAMES), a new cosine schedule
# (peak 5e-4, 50 warmup steps) over WIDEN_STEPS. More games, for games never trained on.
FINAL="$RUN"
if want widen; then
    FINAL="$RUN-wide"
    # shellcheck disable=SC2086
    "$PYTHON" -m train --preset "$PRESET" --sessions "$DATA/train" "$DATA/more" \
        --init_from "$WIDEN_INIT" --set train.init_predictor=true --set train.warmup_steps=50 \
        --lr 5e-4 --steps "$WIDEN_STEPS" --out_dir "$FINAL" --resume auto --no_progress \
        $TRAIN_ARGS
fi

# ------------------------------------------------------------------------------ EVAL STEP
# Held-out: sessions of seed 1000, counterfactual states of seeds 1000+ (the seen games) and
# of games never trained on (UNSEEN); every baseline in the same run. ~10 minutes here.
if want eval; then
    # shellcheck disable=SC2086
    "$PYTHON" -m train.eval_cli --model "$FINAL/last.pt" --sessions "$DATA/heldout" \
        --games "$SEEN_EVAL" --unseen_games "$UNSEEN" --cf_states "$CF_STATES" \
        --out "$FINAL/eval" $EVAL_ARGS
    if want widen; then NAME=iwm-default-v3; else NAME=iwm-default-v2; fi
    "$PYTHON" -m train.export --from "$FINAL/last.pt" --eval "$FINAL/eval/eval.json" \
        --name "$NAME" --recipe train/recipes/actions.sh --out "$SHIP"
fi
