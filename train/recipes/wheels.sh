# Sourced by the GPU recipes: with WHEELS set (a folder of wheels: the games, pyzmq, mcap,
# loguru, ...), unpack them into a private site folder for a host that has torch and timm but
# not these, and put it and the repo on PYTHONPATH. Needs ROOT and PYTHON.
if [[ -n "${WHEELS:-}" ]]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/iwm-site "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/iwm-site${PYTHONPATH:+:$PYTHONPATH}"
    # ViZDoom's gymnasium wrapper imports pygame for human rendering; rgb_array rendering
    # only makes a pygame.time.Clock it never ticks, and close() calls pygame.quit()
    rm -rf /tmp/iwm-site/pygame
    "$PYTHON" -c "import pygame" 2>/dev/null || { mkdir -p /tmp/iwm-site/pygame
        printf '%s\n' '"""Stand-in for rgb_array rendering."""' 'import types' \
            'time = types.SimpleNamespace(Clock=lambda: None)' 'def quit(): pass' \
            >/tmp/iwm-site/pygame/__init__.py; }
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
