# Sourced by the recipes after they set ROOT (the repo): the interpreter and the step filter.
#   PYTHON  interpreter (default: <repo>/.venv/bin/python, else python3)
#   want S  whether step S is among "$STEPS"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
want() { [[ " $STEPS " == *" $1 "* ]]; }
