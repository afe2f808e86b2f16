# Sourced by the GPU recipes: with WHEELS set (a folder of wheels: the games, pyzmq, mcap,
# loguru, ...), unpack them into a private site folder for a host that has torch and timm but
# not these, and put it and the repo on PYTHONPATH. Needs ROOT and PYTHON.
if [[ -n "${WHEELS:-}" ]]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/iwm-site "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/iwm-site${PYTHONPATH:+:$PYTHONPATH}"
    rm -rf /tmp/iwm-site/pygame
fi
# ViZDoom's gymnasium wrapper imports pygame for human rendering; rgb_array rendering only
# makes a pygame.time.Clock it never ticks, and close() calls pygame.quit(): where pygame is
# missing (with or without WHEELS), a stand-in
if ! "$PYTHON" -c "import pygame" >/dev/null 2>&1; then
    mkdir -p /tmp/iwm-stub/pygame
    printf '%s\n' '"""Stand-in for rgb_array rendering."""' 'import types' \
        'time = types.SimpleNamespace(Clock=lambda: None)' 'def quit(): pass' \
        >/tmp/iwm-stub/pygame/__init__.py
    export PYTHONPATH="/tmp/iwm-stub${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
