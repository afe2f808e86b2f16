"""A tiny action-driven world for training tests: a bright square moved by 5 actions.

Frames are 32x32 RGB on a fixed textured background; action 0 = stay, 1 = up, 2 = down,
3 = left, 4 = right (4 px, clamped). Every ``episode`` frames the square jumps to a random
place and the frame has no action (an episode start). ``write_toy_session`` records it with
the project's own :class:`~iwm_bus.session.SessionWriter`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from iwm_bus.bus.wire import make_action
from iwm_bus.session import SessionWriter

SIZE, SQ, STEP = 32, 8, 4
MOVES = {0: (0, 0), 1: (-STEP, 0), 2: (STEP, 0), 3: (0, -STEP), 4: (0, STEP)}
T0, DT = 1_700_000_000_000_000_000, 33_333_333


def background() -> np.ndarray:
    rng = np.random.default_rng(123)
    return (rng.integers(0, 80, (SIZE, SIZE, 3))).astype(np.uint8)


def render(pos: tuple[int, int], bg: np.ndarray) -> np.ndarray:
    img = bg.copy()
    y, x = pos
    img[y:y + SQ, x:x + SQ] = (250, 220, 40)
    return img


def step(pos: tuple[int, int], action: int) -> tuple[int, int]:
    dy, dx = MOVES[action]
    return (int(np.clip(pos[0] + dy, 0, SIZE - SQ)), int(np.clip(pos[1] + dx, 0, SIZE - SQ)))


def write_toy_session(path: Path, n: int = 200, seed: int = 0, episode: int = 50) -> Path:
    rng = np.random.default_rng(seed)
    bg = background()
    pos = (int(rng.integers(0, SIZE - SQ)), int(rng.integers(0, SIZE - SQ)))
    with SessionWriter(path, metadata={"source": "toy"}) as w:
        for i in range(n):
            action = None
            if i and i % episode:
                a = int(rng.integers(0, 5))
                pos = step(pos, a)
                action = make_action(action_id=a)
            elif i:
                pos = (int(rng.integers(0, SIZE - SQ)), int(rng.integers(0, SIZE - SQ)))
            w.write_frame(i, T0 + i * DT, render(pos, bg), action=action)
    return path
