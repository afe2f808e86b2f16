"""The synthetic source: deterministic moving shapes and a square that the action moves."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from workers.sources.base import SourceBase, SourceFrame


class SyntheticSource(SourceBase):
    """Deterministic moving shapes plus a white square that the action moves.

    Frames are an exact function of (seed, size, action history): the background (a
    periodic colour field scrolling 1 px/frame and a few wrapping rectangles) depends only
    on the seed and the frame index, the square only on the actions. The square (pure white,
    ``square`` px) starts centred and moves ``speed`` px per unit of action, clamped to the
    frame: a vector moves it by ``vector[:2]`` (clipped to [-1, 1]) * speed in (x, y); an
    ``action_id`` in ``ACTION_IDS`` (0 none, 1 up, 2 down, 3 left, 4 right) by one step.
    When both are given the vector is used. The default policy draws ``action_id`` from
    ``default_rng([seed, frame index])``.
    """

    knows_actions = True
    ACTION_IDS: dict[int, tuple[int, int]] = {0: (0, 0), 1: (0, -1), 2: (0, 1), 3: (-1, 0),
                                              4: (1, 0)}
    action_space = {"type": "discrete+box", "n": 5, "shape": [2], "low": -1.0, "high": 1.0}

    def __init__(self, width: int = 64, height: int = 64, *, seed: int = 0,
                 speed: float | None = None, shapes: int = 3, spec: str | None = None) -> None:
        super().__init__(spec or f"synthetic:{width}x{height}")
        if not (8 <= width <= 8192 and 8 <= height <= 8192):
            raise ValueError(f"{self.spec}: size {width}x{height} must be within 8..8192")
        if speed is not None and not (isinstance(speed, (int, float)) and 0 < speed <= 1000):
            raise ValueError(f"{self.spec}: speed must be a number in (0, 1000], got {speed!r}")
        if not isinstance(shapes, int) or not 0 <= shapes <= 16:
            raise ValueError(f"{self.spec}: shapes must be an int in 0..16, got {shapes!r}")
        self.width, self.height, self.seed = width, height, seed
        # side of the controllable square and its step, in pixels
        self.square = max(2, min(width, height) // 8)
        self.speed = float(speed) if speed is not None else max(1.0, min(width, height) / 16)
        rng = np.random.default_rng(seed)
        self._background = self._make_background(rng)  # (H, 2W, 3), periodic in x
        self._shapes = [self._make_shape(rng) for _ in range(shapes)]
        self._k = 0
        self._pos = self._centre()

    @property
    def frame_index(self) -> int:
        """Frames since reset (0 for the reset frame)."""
        return self._k

    @property
    def square_xy(self) -> tuple[float, float]:
        """Top-left corner (x, y) of the square, in pixels (rendered rounded)."""
        return float(self._pos[0]), float(self._pos[1])

    def reset(self) -> SourceFrame:
        self._k = 0
        self._pos = self._centre()
        return SourceFrame(self._render())

    def step(self, action: dict[str, Any] | None) -> SourceFrame:
        move, applied = self._resolve(action)
        self._k += 1
        limit = np.array([self.width - self.square, self.height - self.square], np.float64)
        self._pos = np.clip(self._pos + move * self.speed, 0.0, limit)
        return SourceFrame(self._render(), applied)

    def _centre(self) -> np.ndarray:
        return np.array([(self.width - self.square) // 2, (self.height - self.square) // 2],
                        np.float64)

    def _resolve(self, action: Any) -> tuple[np.ndarray, dict[str, Any]]:
        """(unit move (dx, dy), action map applied); the default policy when needed."""
        if action is not None:
            try:
                return self._parse_action(action)
            except (TypeError, ValueError) as e:
                self._bad_action(action, str(e))
        action_id = int(np.random.default_rng([self.seed, self._k]).integers(0, 5))
        return np.array(self.ACTION_IDS[action_id], np.float64), {"action_id": action_id}

    def _parse_action(self, action: Any) -> tuple[np.ndarray, dict[str, Any]]:
        if not isinstance(action, Mapping):
            raise TypeError(f"an action must be a map, got {type(action).__name__}")
        vector, action_id = action.get("vector"), action.get("action_id")
        if vector is not None:
            vec = np.asarray(vector, dtype=np.float64).ravel()
            if vec.size < 2:
                raise ValueError(f"vector has {vec.size} components; needs (dx, dy)")
            if not np.all(np.isfinite(vec[:2])):
                raise ValueError("vector holds NaN or infinity")
            move = np.clip(vec[:2], -1.0, 1.0)
            return move, {"vector": move.astype(np.float32)}
        if action_id is not None:
            if isinstance(action_id, bool) or not isinstance(action_id, (int, np.integer)):
                raise TypeError(f"action_id must be an int, got {type(action_id).__name__}")
            if int(action_id) not in self.ACTION_IDS:
                raise ValueError(f"action_id {action_id} is not in 0..4")
            return np.array(self.ACTION_IDS[int(action_id)], np.float64), {
                "action_id": int(action_id)}
        raise ValueError("the action has neither vector nor action_id")

    def _make_background(self, rng: np.random.Generator) -> np.ndarray:
        h, w = self.height, self.width
        phase = rng.uniform(0, 2 * np.pi, 3)
        x = 2 * np.pi * np.arange(w)[None, :] / w  # (1, W)
        y = 2 * np.pi * np.arange(h)[:, None] / h  # (H, 1)
        red = np.broadcast_to(60 + 50 * np.sin(x + phase[0]), (h, w))
        green = np.broadcast_to(60 + 50 * np.sin(y + phase[1]), (h, w))
        blue = 60 + 50 * np.sin(x + y + phase[2])
        field = np.stack([red, green, blue], axis=-1).round().astype(np.uint8)  # (H, W, 3)
        return np.concatenate([field, field], axis=1)  # (H, 2W, 3): scroll = slice

    def _make_shape(self, rng: np.random.Generator) -> tuple[Any, ...]:
        h, w = self.height, self.width
        sw, sh = (int(rng.integers(max(2, n // 10), max(3, n // 4))) for n in (w, h))
        x0, y0 = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        vx, vy = (float(rng.uniform(0.5, 2.0) * rng.choice([-1, 1])) for _ in range(2))
        colour = rng.integers(120, 230, 3).astype(np.uint8)  # never the square's white
        return sw, sh, x0, y0, vx, vy, colour

    def _render(self) -> np.ndarray:
        h, w, k = self.height, self.width, self._k
        offset = k % w
        frame = self._background[:, offset:offset + w].copy()  # (H, W, 3) C-contiguous
        for sw, sh, x0, y0, vx, vy, colour in self._shapes:
            x = int(math.floor((x0 + vx * k) % (w + sw))) - sw  # wraps around the frame
            y = int(math.floor((y0 + vy * k) % (h + sh))) - sh
            frame[max(0, y):max(0, y + sh), max(0, x):max(0, x + sw)] = colour
        px, py = (int(math.floor(v + 0.5)) for v in self._pos)
        frame[py:py + self.square, px:px + self.square] = 255
        return frame
