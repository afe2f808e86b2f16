#!/usr/bin/env bash
# One lease of a GPU host (issue 24), planned and checked here first: on a bare host with one
# H100/H200 and 16 cores, record the action-aware default's counterfactual data in parallel,
# train preset gpu-actions-conv for the time the budget leaves, export, evaluate, and run the GPU
# benchmark rows; everything that comes back is written under OUT.
#
#   OUT=$OUT bash train/recipes/gpu.sh                  # on the lent host (repo root)
#   WHEELS=.whl OUT=$OUT bash train/recipes/gpu.sh      # a host with torch + timm only
#   bash train/recipes/gpu.sh --dry-run                 # this CPU: the same script, toy sizes
#   STAGES="eval bench" WORK=/tmp/iwm-gpu OUT=$OUT bash train/recipes/gpu.sh  # again, same host
#
# --dry-run runs every stage with the same imports, commands and data path on the CPU (device
# cpu, Pong + ViZDoom basic at 40 frames, 2 training steps, a tiny eval and bench), so a
# missing module, a wrong flag or a wrong path shows here, not on the lease (2-4 minutes on
# this busy 2-core machine; tests/training/test_gpu_recipe.py runs it). Its timeouts are ten
# times the lease's.
#
# Stages, in order; the time each may take on the lent host (a timeout; BUDGET below):
#   preflight  30 s  every module the plan imports (python -m train.preflight) and the GPU,
#                    then one 6-frame ALE session with counterfactuals and one ViZDoom one:
#                    a missing module or a broken game is one line and exit 2 in seconds
#   data      100 s  the actions.sh data: 36 ALE games x 2000 frames with counterfactuals
#                    every 2nd frame, 5 ViZDoom scenarios, held-out seeds of the mix; JOBS
#                    processes (2 cores here: 6 min; 16 cores: about a minute expected)
#   train    rest    load (90 s) + preset gpu-actions-conv (PRESET) from the shipped default
#                    (INIT), --minutes fitted to what the budget leaves, a checkpoint
#                    every 250 steps
#   export    15 s   the EMA target as an inference checkpoint (again after eval, with it)
#   eval      75 s   held-out sessions; seen and unseen games' cloned states (on the GPU)
#   bench     60 s   bench/train_bench.py --device cuda: aten ops, GPU kernels, syncs,
#                    steps/s and transitions/s of the preset, batch + counterfactual
#                    states 256 + 256 and 1024 + 256 (BENCH_ROWS)
#   sidecar  120 s   bench/recovery.py + bench/e2e.py on CUDA: warm-standby recovery and
#                    frame -> surprise latency (the dry run checks their imports only)
#
# BUDGET (default 540 s: a device command runs at most 600 s, and a 15-minute lease holds its
# start and one such command) always holds preflight, data, the training's load, export and at
# least TRAIN_MIN_S (150 s) of training; the optional stages join in the order bench, eval,
# sidecar while that minimum still fits, and the training gets the rest (at 540 s: bench and
# eval join, sidecar not; 3-4 minutes of training). With less time they go in the reverse
# order: first the sidecar rows (measured on the last lease), then eval (it runs on any
# machine from the returned export: STEPS=eval in train/recipes/actions.sh), then the bench
# rows (the run's metrics.csv still times its steps); the training shrinks last, and data and
# export are never dropped. Every stage's timeout ends within BUDGET; an optional stage with
# under 15 s of it left is skipped. STAGES overrides the plan.
#
# OUT receives: stages.tsv (stage, seconds, status), plan.txt, preflight.txt, logs/*.log,
# metrics.csv + config.json of the run, eval.json + eval.png, bench_train.md, bench_sidecar.txt,
# model.pt.partNN (the export in 15 MB parts: cat model.pt.part* > model.pt).
#
# Knobs (environment):
#   OUT        results (default WORK/out);  WORK  data + run (default /tmp/iwm-gpu)
#   BUDGET     seconds the whole plan may take (default 540); STAGES  which stages (default:
#              planned from BUDGET); JOBS  processes recording and loading (default: cores)
#   GAMES, DOOM, FRAMES, HELDOUT_GAMES, HELDOUT_FRAMES, SEEN_EVAL, UNSEEN, CF_STATES
#              the data and eval, as in train/recipes/actions.sh
#   PRESET     the training preset (default gpu-actions-conv: the shipped default's conv model,
#              going on from it; gpu-actions: the ViT-Ti, from scratch)
#   INIT       weights the training starts from: auto (default: the shipped default where its
#              encoder is the preset's, with its predictor where the preset takes it
#              (init_predictor), else from scratch), a checkpoint, or none
#   NAME       of the export (default iwm-actions-gpu)
#   BENCH_ROWS BATCH:CF_STATES rows of the bench (default "256:256 1024:256")
#   TRAIN_ARGS, EVAL_ARGS, BENCH_ARGS  extra flags;  PYTHON, WHEELS (train/recipes/wheels.sh)
#   EXTRA_MODULES  more modules the preflight requires
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        *) echo "gpu.sh: unknown argument $arg (only --dry-run)" >&2; exit 2 ;;
    esac
done
# shellcheck source=train/recipes/common.sh
source "$ROOT/train/recipes/common.sh"  # PYTHON
want() { [[ " $STAGES " == *" $1 "* ]]; }  # whether stage $1 is planned
# shellcheck source=train/recipes/wheels.sh
source "$ROOT/train/recipes/wheels.sh"
cd "$ROOT"
export PYGAME_HIDE_SUPPORT_PROMPT=1

if (( DRY )); then  # the same stages at toy size on the CPU
    WORK="${WORK:-$(mktemp -d /tmp/iwm-gpu-dry.XXXXXX)}"
    GAMES="${GAMES:-ALE/Pong-v5}" DOOM="${DOOM:-basic}" FRAMES="${FRAMES:-40}"
    HELDOUT_GAMES="${HELDOUT_GAMES:-pong}" HELDOUT_FRAMES="${HELDOUT_FRAMES:-120}"
    SEEN_EVAL="${SEEN_EVAL:-ALE/Pong-v5}" UNSEEN="${UNSEEN:-ALE/Boxing-v5}"
    CF_STATES="${CF_STATES:-2}" JOBS="${JOBS:-2}" STAGES="${STAGES:-preflight data train export eval bench sidecar}"
    DEVICE=cpu CUDA_FLAG=()
    DRY_TRAIN=(--device cpu --steps 2 --batch_size 4 --cf_states 2 --load_workers 1)
    DRY_EVAL=(--bank 16 --aug_images 1 --cut_gap 10 --max_transitions 32)
    BENCH_ROWS="${BENCH_ROWS:-4:2}"
    DRY_BENCH=(--steps 1 --warmup 1)
else
    WORK="${WORK:-/tmp/iwm-gpu}"
    GAMES="${GAMES:-ALE/Pong-v5,ALE/Breakout-v5,ALE/MsPacman-v5,ALE/Seaquest-v5,ALE/SpaceInvaders-v5,ALE/Alien-v5,ALE/Amidar-v5,ALE/Asterix-v5,ALE/BankHeist-v5,ALE/BeamRider-v5,ALE/Centipede-v5,ALE/ChopperCommand-v5,ALE/DemonAttack-v5,ALE/Frostbite-v5,ALE/Gopher-v5,ALE/Hero-v5,ALE/Kangaroo-v5,ALE/Qbert-v5,ALE/Riverraid-v5,ALE/RoadRunner-v5,ALE/TimePilot-v5,ALE/Venture-v5,ALE/Tennis-v5,ALE/Enduro-v5,ALE/Asteroids-v5,ALE/Atlantis-v5,ALE/Berzerk-v5,ALE/CrazyClimber-v5,ALE/Jamesbond-v5,ALE/KungFuMaster-v5,ALE/NameThisGame-v5,ALE/Phoenix-v5,ALE/StarGunner-v5,ALE/UpNDown-v5,ALE/WizardOfWor-v5,ALE/Zaxxon-v5}"
    DOOM="${DOOM:-doom}" FRAMES="${FRAMES:-2000}"
    HELDOUT_GAMES="${HELDOUT_GAMES:-mix}" HELDOUT_FRAMES="${HELDOUT_FRAMES:-1000}"
    SEEN_EVAL="${SEEN_EVAL:-ALE/Pong-v5,ALE/Breakout-v5,ALE/MsPacman-v5,ALE/Seaquest-v5,ALE/SpaceInvaders-v5}"
    UNSEEN="${UNSEEN:-ALE/Boxing-v5,ALE/Freeway-v5,ALE/Frogger-v5,ALE/Krull-v5}"
    CF_STATES="${CF_STATES:-30}" JOBS="${JOBS:-$(nproc)}"
    DEVICE=cuda CUDA_FLAG=(--cuda)
    DRY_TRAIN=() DRY_EVAL=() DRY_BENCH=() BENCH_ROWS="${BENCH_ROWS:-256:256 1024:256}"
fi
OUT="${OUT:-$WORK/out}"
BUDGET="${BUDGET:-540}"
TRAIN_MIN_S="${TRAIN_MIN_S:-150}"
PRESET="${PRESET:-gpu-actions-conv}"
INIT="${INIT:-auto}"
NAME="${NAME:-iwm-actions-gpu}"
TRAIN_ARGS="${TRAIN_ARGS:-}" EVAL_ARGS="${EVAL_ARGS:-}" BENCH_ARGS="${BENCH_ARGS:-}"
DATA="$WORK/data" RUN="$WORK/run" LOGS="$OUT/logs"
# each stage's budget in seconds (train: its data load; the training gets what is left)
declare -A BUDGET_S=([preflight]=30 [data]=100 [train]=90 [export]=15 [eval]=75 [bench]=60
                     [sidecar]=120)
if (( DRY )); then  # a 2-core CPU, busy perhaps: the timeouts are the lease's business
    for s in "${!BUDGET_S[@]}"; do BUDGET_S[$s]=$(( BUDGET_S[$s] * 10 )); done
    BUDGET=$(( BUDGET * 10 ))
fi
mkdir -p "$DATA" "$RUN" "$LOGS"
WORK="$(cd "$WORK" && pwd)" OUT="$(cd "$OUT" && pwd)"
DATA="$WORK/data" RUN="$WORK/run" LOGS="$OUT/logs"

# -- the plan: required stages, then optional ones while TRAIN_MIN_S of training still fits
if [[ -z "${STAGES:-}" ]]; then
    STAGES="preflight data train export"
    used=$(( BUDGET_S[preflight] + BUDGET_S[data] + BUDGET_S[train] + BUDGET_S[export] ))
    for s in bench eval sidecar; do  # in order of value; dropped in the reverse order
        if (( used + BUDGET_S[$s] + TRAIN_MIN_S <= BUDGET )); then
            STAGES+=" $s" used=$(( used + BUDGET_S[$s] ))
        fi
    done
fi
reserve() {  # seconds the stages after training need
    local r=0 s
    for s in export eval bench sidecar; do if want "$s"; then r=$(( r + BUDGET_S[$s] )); fi; done
    echo "$r"
}
{
    echo "gpu.sh plan ($( ((DRY)) && echo dry run || echo lease), $(date -u +%FT%TZ)): BUDGET ${BUDGET} s"
    echo "stages: $STAGES"
    for s in preflight data train export eval bench sidecar; do
        if ! want "$s"; then echo "  $s: dropped"
        elif [[ $s == train ]]; then echo "  train: ${BUDGET_S[$s]} s load + what is left"
        else echo "  $s: ${BUDGET_S[$s]} s"; fi
    done
} | tee "$OUT/plan.txt"

# -- stage bookkeeping: stages.tsv, one log per stage, copy what comes back on any exit
printf 'stage\tseconds\tstatus\n' >"$OUT/stages.tsv"
t_stage=0 stage_name=""
begin() {  # begin STAGE: false for an optional stage when the plan's time is up
    stage_name=$1 t_stage=$SECONDS
    if [[ $1 =~ ^(eval|bench|sidecar)$ ]] && (( BUDGET - SECONDS < 15 )); then
        end "skipped: BUDGET spent"
        return 1
    fi
    echo "== $1 (${BUDGET_S[$1]} s)"
}
end() {  # end STATUS
    printf '%s\t%d\t%s\n' "$stage_name" $(( SECONDS - t_stage )) "$1" >>"$OUT/stages.tsv"
    echo "== $stage_name: $1 in $(( SECONDS - t_stage )) s (total ${SECONDS} s)"
}
left() {  # seconds the running stage may still take: its budget, within the plan's
    local s=$(( BUDGET_S[$stage_name] - (SECONDS - t_stage) )) g=$(( BUDGET - SECONDS ))
    (( g < s )) && s=$g
    echo $(( s > 5 ? s : 5 ))
}
log() { echo "$LOGS/$stage_name.log"; }
fail() {  # fail MESSAGE [EXIT]: a required stage failed
    end failed
    echo "gpu.sh: $stage_name: $1 (last lines of $(log)):" >&2
    tail -n 25 "$(log)" >&2 || true
    exit "${2:-1}"
}
collect() {
    local f
    for f in config.json metrics.csv; do [[ -f "$RUN/actions/$f" ]] && cp "$RUN/actions/$f" "$OUT/"; done
    for f in eval.json eval.png; do [[ -f "$RUN/eval/$f" ]] && cp "$RUN/eval/$f" "$OUT/"; done
    if [[ -f "$RUN/$NAME.pt" ]]; then  # the device returns files of at most 16 MiB
        rm -f "$OUT"/model.pt.part*
        split -b 15M -d "$RUN/$NAME.pt" "$OUT/model.pt.part"
    fi
    return 0
}
trap collect EXIT

# ------------------------------------------------------------------------------ PREFLIGHT
if want preflight; then
    begin preflight
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
        >"$(log)" 2>&1 || true
    if ! timeout -k 5 "$(left)" "$PYTHON" -m train.preflight "${CUDA_FLAG[@]}" \
            ${EXTRA_MODULES:+--also $EXTRA_MODULES} >"$OUT/preflight.txt" 2>>"$(log)"; then
        fail "a module or the GPU is missing" 2
    fi
    cat "$OUT/preflight.txt"
    for s in $(sed -n 's/^drop: //p' "$OUT/preflight.txt"); do
        STAGES="${STAGES//$s/}"; echo "preflight: stage $s dropped"
    done
    # the games themselves: one ALE session with counterfactuals, one ViZDoom session
    if ! (cd "$WORK" && timeout -k 5 "$(left)" "$PYTHON" -m train.record --out "$WORK/preflight" \
            --games pong --frames 6 --counterfactual 2 --overwrite \
            && timeout -k 5 "$(left)" "$PYTHON" -m train.record --out "$WORK/preflight" \
            --games basic --frames 6 --overwrite) >>"$(log)" 2>&1; then
        fail "recording 6 frames of pong / basic failed" 2
    fi
    end ok
fi

# ------------------------------------------------------------------------------ DATA
if want data; then
    begin data
    status=ok
    (
        cd "$DATA"  # ViZDoom writes _vizdoom.ini into the working directory
        ale_s=$(left); (( ale_s > 40 )) && ale_s=$(( ale_s - 20 ))  # 20 s kept for the rest
        timeout -k 5 "$ale_s" "$PYTHON" -m train.record --out "$DATA/train/ale" \
            --games "$GAMES" --frames "$FRAMES" --seeds 0 --jobs "$JOBS" --counterfactual 2 \
            --skip-existing
    ) >>"$(log)" 2>&1 || status=partial
    # a session cut by the timeout has no sidecar yet: drop it (its game is then left out)
    for f in "$DATA"/train/ale/*.mcap; do
        [[ -e "$f" && ! -e "${f%.mcap}.cf.npz" ]] && rm -f "$f" && echo "data: dropped partial $f" >>"$(log)"
    done
    (
        cd "$DATA"
        timeout -k 5 "$(left)" "$PYTHON" -m train.record --out "$DATA/train/doom" --games "$DOOM" \
            --frames "$FRAMES" --seeds 0 --jobs "$JOBS" --skip-existing || echo "doom: not all recorded"
        timeout -k 5 "$(left)" "$PYTHON" -m train.record --out "$DATA/heldout" \
            --games "$HELDOUT_GAMES" --frames "$HELDOUT_FRAMES" --seeds 1000 --jobs "$JOBS" \
            --skip-existing
    ) >>"$(log)" 2>&1 || status=partial
    n=$(find "$DATA/train" -name '*.cf.npz' 2>/dev/null | wc -l)
    echo "data: $n sessions with counterfactuals, $(find "$DATA/train" -name '*.mcap' | wc -l) in all, $(du -sh "$DATA" | cut -f1)"
    (( n > 0 )) || fail "no counterfactual session recorded"
    end "$status"
fi

# ------------------------------------------------------------------------------ TRAIN
if want train; then
    begin train
    # the loop's minutes: what the budget leaves after the load and the later stages
    train_s=$(( BUDGET - SECONDS - BUDGET_S[train] - $(reserve) ))
    (( train_s >= 60 )) || train_s=60
    minutes=$(awk -v s="$train_s" 'BEGIN { printf "%.2f", s / 60 }')
    if (( DRY )); then budget=(); else budget=(--minutes "$minutes" --load_workers "$JOBS"); fi
    if [[ $INIT == auto ]]; then  # the shipped default's encoder where it is the preset's
        INIT=$("$PYTHON" - "$PRESET" "$ROOT/iwm_bus/weights/default.pt" 2>>"$(log)" <<'EOF'
import sys
from iwm_bus.model import IWMConfig, load_checkpoint
from train.presets import preset
from train.trainer import ENCODER_FIELDS
want = IWMConfig.from_dict(preset(sys.argv[1]).get("model", {}))
have = IWMConfig.from_dict(load_checkpoint(sys.argv[2])["config"])
print(sys.argv[2] if all(getattr(want, k) == getattr(have, k) for k in ENCODER_FIELDS)
      else "none")
EOF
        ) || fail "reading $PRESET and the shipped default failed"
    fi
    init=()
    [[ $INIT == none ]] || init=(--init_from "$INIT")
    echo "train: $PRESET from ${INIT/#none/scratch}, $( ((DRY)) && echo 2 steps || echo "$minutes min") on $DEVICE"
    # shellcheck disable=SC2086
    timeout -k 10 $(( BUDGET_S[train] + train_s + 30 )) "$PYTHON" -m train --preset "$PRESET" \
        --sessions "$DATA/train" "${init[@]}" --out_dir "$RUN/actions" --resume auto \
        --no_progress --ckpt_every 250 "${budget[@]}" "${DRY_TRAIN[@]}" $TRAIN_ARGS \
        >>"$(log)" 2>&1 || { [[ -f "$RUN/actions/last.pt" ]] || fail "training failed"; }
    [[ -f "$RUN/actions/last.pt" ]] || fail "no checkpoint written"
    tail -n 3 "$RUN/actions/metrics.csv" | cut -c1-300
    end ok
fi

export_model() {  # export_model [EVAL_JSON]
    "$PYTHON" -m train.export --from "$RUN/actions/last.pt" --name "$NAME" \
        --recipe train/recipes/gpu.sh --out "$RUN/$NAME.pt" ${1:+--eval "$1"}
}

# ------------------------------------------------------------------------------ EXPORT
if want export; then
    begin export
    export_model >>"$(log)" 2>&1 || fail "export failed"
    end ok
fi

# ------------------------------------------------------------------------------ EVAL
if want eval && begin eval; then
    # shellcheck disable=SC2086
    if (cd "$DATA" && timeout -k 5 "$(left)" "$PYTHON" -m train.eval_cli \
            --model "$RUN/actions/last.pt" --sessions "$DATA/heldout" --games "$SEEN_EVAL" \
            --unseen_games "$UNSEEN" --cf_states "$CF_STATES" --device "$DEVICE" \
            --out "$RUN/eval" "${DRY_EVAL[@]}" $EVAL_ARGS) >>"$(log)" 2>&1 \
            && export_model "$RUN/eval/eval.json" >>"$(log)" 2>&1; then
        grep -E "MRR|accuracy|AUROC" "$(log)" | head -n 12 || true
        end ok
    else
        end "failed (optional; last lines of $(log) below)"
        tail -n 15 "$(log)" >&2
    fi
fi

# ------------------------------------------------------------------------------ BENCH
if want bench && begin bench; then
    status=ok
    for row in $BENCH_ROWS; do  # BATCH:CF_STATES
        # shellcheck disable=SC2086
        timeout -k 5 "$(left)" "$PYTHON" bench/train_bench.py --device "$DEVICE" \
            --presets "$PRESET" --batch "${row%:*}" --cf_states "${row#*:}" \
            "${DRY_BENCH[@]}" $BENCH_ARGS >>"$OUT/bench_train.md" 2>>"$(log)" \
            || status="failed at $row (optional)"
    done
    cat "$OUT/bench_train.md"
    end "$status"
fi

# ------------------------------------------------------------------------------ SIDECAR
if want sidecar && begin sidecar; then
    status=ok
    if (( DRY )); then  # they start the sidecar for 30 s and more: here their imports only
        for b in recovery e2e; do
            "$PYTHON" "bench/$b.py" --help >>"$(log)" 2>&1 || status="failed: bench/$b.py"
        done
    else
        timeout -k 5 "$(( $(left) * 7 / 12 ))" "$PYTHON" bench/recovery.py --device cuda --kills 2 --settle 10 \
            >>"$OUT/bench_sidecar.txt" 2>>"$(log)" || status="recovery failed (optional)"
        timeout -k 5 "$(left)" "$PYTHON" bench/e2e.py --device cuda --models default \
            --sizes 210x160 --modes realtime --seconds 5 \
            >>"$OUT/bench_sidecar.txt" 2>>"$(log)" || status="e2e failed (optional)"
        cat "$OUT/bench_sidecar.txt"
    fi
    end "$status"
fi
echo "gpu.sh: done in ${SECONDS} s; results in $OUT"
