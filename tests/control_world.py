"""A synthetic controllable world for action-learning tests: a sprite the action moves, on a
textured background that scrolls by itself.

Frames are 32x32 RGB. The background (a fixed random texture) scrolls one pixel a step to the
right whatever the agent does, so copy-last is wrong every step and most of each frame's
change is not the agent's. The sprite (8x8, one colour) moves 4 px under actions
1 = up, 2 = down, 3 = left, 4 = right and stays under 0 (clamped at the edges, where some
actions become synonyms). ``write_control_session`` records play with random actions through
the project's :class:`~iwm_bus.session.SessionWriter`, and, every other frame, the next frame
under every action into the counterfactual sidecar that ``train.record --counterfactual``
writes (:class:`train.counterfactual.CounterfactualWriter`); ``control_sets`` gives held-out
states as the evaluation takes them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from iwm_bus.actions import ACTION_NAMES, components
from iwm_bus.bus.wire import make_action
from iwm_bus.session import SessionWriter
from train.counterfactual import CounterfactualSet, CounterfactualWriter, sidecar_path

SIZE, SPRITE, STEP = 32, 8, 4
NUM_ACTIONS = 5
MOVES = {0: (0, 0), 1: (-STEP, 0), 2: (STEP, 0), 3: (0, -STEP), 4: (0, STEP)}
T0, DT = 1_700_000_000_000_000_000, 33_333_333


def _shared_move(action_id: int) -> tuple[int, int]:
    parts = components(action_id)
    return (STEP * (("DOWN" in parts) - ("UP" in parts)),
            STEP * (("RIGHT" in parts) - ("LEFT" in parts)))


#: the same world on the shared 18-id vocabulary (iwm_bus.actions): an id moves the sprite by
#: its direction components (UPLEFT: up and left), FIRE does nothing
SHARED_MOVES = {a: _shared_move(a) for a in range(len(ACTION_NAMES))}


def texture() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 120, (SIZE, SIZE, 3)).astype(np.uint8)


def render(pos: tuple[int, int], t: int, tex: np.ndarray) -> np.ndarray:
    img = np.roll(tex, t, axis=1)  # the scene's own motion
    y, x = pos
    img[y:y + SPRITE, x:x + SPRITE] = (250, 220, 40)
    return img


def move(pos: tuple[int, int], action: int, moves: dict[int, tuple[int, int]] = MOVES
         ) -> tuple[int, int]:
    dy, dx = moves[action]
    hi = SIZE - SPRITE
    return int(np.clip(pos[0] + dy, 0, hi)), int(np.clip(pos[1] + dx, 0, hi))


def _branch(pos: tuple[int, int], t: int, tex: np.ndarray,
            moves: dict[int, tuple[int, int]] = MOVES) -> CounterfactualSet:
    nxt = np.stack([render(move(pos, a, moves), t + 1, tex) for a in range(len(moves))])
    return CounterfactualSet(render(pos, t, tex), nxt)


def write_control_session(path: Path, n: int = 400, seed: int = 0, episode: int = 40,
                          moves: dict[int, tuple[int, int]] = MOVES) -> Path:
    """Random play (each action held 1-3 steps) with a counterfactual sidecar; ``moves``:
    what each action id does (``SHARED_MOVES`` for the shared vocabulary's ids)."""
    rng = np.random.default_rng(seed)
    tex = texture()
    cf = CounterfactualWriter("control", seed)
    pos = (int(rng.integers(0, SIZE - SPRITE)), int(rng.integers(0, SIZE - SPRITE)))
    action, hold = 0, 0
    with SessionWriter(path, metadata={"source": "control"}) as w:
        for i in range(n):
            if i and i % episode:
                if hold == 0:
                    action, hold = int(rng.integers(len(moves))), int(rng.integers(1, 4))
                hold -= 1
                pos = move(pos, action, moves)
                w.write_frame(i, T0 + i * DT, render(pos, i, tex),
                              action=make_action(action_id=action))
            else:  # an episode start: the sprite somewhere new, no action
                pos = (int(rng.integers(0, SIZE - SPRITE)), int(rng.integers(0, SIZE - SPRITE)))
                w.write_frame(i, T0 + i * DT, render(pos, i, tex))
            if (i + 1) % episode and i % 2 == 0:
                cf.add(i, _branch(pos, i, tex, moves))
    cf.write(sidecar_path(path))
    return path


def control_sets(n: int, seed: int) -> list[CounterfactualSet]:
    """``n`` held-out states (random sprite place and time) with every action's next frame."""
    rng = np.random.default_rng(seed)
    tex = texture()
    return [_branch((int(rng.integers(0, SIZE - SPRITE)), int(rng.integers(0, SIZE - SPRITE))),
                    int(rng.integers(0, 1000)), tex) for _ in range(n)]
