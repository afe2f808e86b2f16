"""Capture sources behind one protocol: synthetic shapes, gymnasium games, the screen,
animated images, image folders and recorded sessions.

A source is chosen by a spec string (``SPEC_FORMS``; docs/sources.md has examples)::

    src = open_source("synthetic:64x64", seed=0)
    frame = src.reset()                   # SourceFrame: pixels (H, W, 3) uint8, action, t_recorded_ns
    frame = src.step({"action_id": 4})    # the square moves right; step() -> None = end of source
    src.close()

``step`` takes the agent's latest action as a wire action map (``{"vector": f32 array,
"action_id": int}``, see ``iwm_bus.wire.make_action``) or None when no agent is connected,
in which case the source's default policy acts (seeded, so runs repeat). A malformed action
is logged (rate-limited), counted in ``bad_actions`` and replaced by the default policy; it
never stops the source. Sources that know which action produced a frame (synthetic, gym,
folder with actions.csv, replay) report it in ``SourceFrame.action``.

Errors: a bad spec or option is a ``ValueError`` that lists the valid forms; a good spec
that cannot be opened or read here (no display, missing game package, a game that crashed)
is a :class:`SourceError`.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from loguru import logger

from iwm_bus.errors import IWMError

if TYPE_CHECKING:  # re-exported lazily by __getattr__ below
    from workers.file_sources import ACTIONS_CSV as ACTIONS_CSV
    from workers.file_sources import IMAGE_SUFFIXES as IMAGE_SUFFIXES
    from workers.file_sources import FolderSource, ScreenSource, VideoSource
    from workers.file_sources import read_actions_csv as read_actions_csv
    from workers.game_sources import GymSource

__all__ = [
    "SPEC_FORMS", "FolderSource", "GymSource", "ScreenSource", "Source", "SourceError",
    "SourceFrame", "SyntheticSource", "VideoSource", "check_spec", "open_source",
]

#: names that live in workers.game_sources / workers.file_sources, importable from here too;
#: those modules are loaded on first use so ``import workers.sources`` stays light.
_MOVED = {
    "GymSource": "workers.game_sources",
    "ScreenSource": "workers.file_sources",
    "VideoSource": "workers.file_sources",
    "FolderSource": "workers.file_sources",
    "read_actions_csv": "workers.file_sources",
    "IMAGE_SUFFIXES": "workers.file_sources",
    "ACTIONS_CSV": "workers.file_sources",
}

SPEC_FORMS = (
    "synthetic[:WxH]   deterministic moving shapes and an action-driven square (default 64x64)",
    "gym:<env id>      a gymnasium env rendering RGB, e.g. gym:ALE/Pong-v5, gym:VizdoomBasic-v1",
    "screen[:monitor]  desktop capture with mss (1 = first monitor, the default; 0 = all)",
    "video:PATH        animated GIF / WebP / PNG (APNG) or multi-page TIFF, read with Pillow",
    "folder:PATH       sorted PNG/JPG images, with an optional actions.csv beside them",
    "replay:PATH       a recorded session (workers.replay.ReplaySource)",
)
SCHEMES = ("synthetic", "gym", "screen", "video", "folder", "replay")
#: options each scheme accepts besides ``seed`` (None: passed through unchecked).
#: ``loop`` is accepted everywhere; sources that never end ignore it.
OPTIONS: dict[str, frozenset[str] | None] = {
    "synthetic": frozenset({"loop", "speed", "shapes"}),
    "gym": frozenset({"loop", "max_episode_steps", "env_kwargs", "actions"}),
    "screen": frozenset({"loop"}),
    "video": frozenset({"loop"}),
    "folder": frozenset({"loop"}),
    "replay": None,
}
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")


class SourceError(IWMError, RuntimeError):
    """A valid source spec that cannot be opened or read here (no display, missing package,
    unreadable file, a game engine that failed)."""


@dataclass
class SourceFrame:
    """One frame from a source."""

    # (H, W, 3) uint8, C-contiguous
    pixels: np.ndarray
    # wire action map {"vector"?, "action_id"?} that PRODUCED this frame, when the source knows
    action: dict[str, Any] | None = None
    # replay/video: the frame's recorded time (ns, for --rate pacing); else None
    t_recorded_ns: int | None = None


@runtime_checkable
class Source(Protocol):
    """What the capture process needs from a source (counters ``episodes`` and
    ``bad_actions`` are optional; the sources in workers/*sources.py have them)."""

    spec: str
    knows_actions: bool
    republish_actions: bool
    action_space: dict[str, Any]

    def reset(self) -> SourceFrame: ...

    def step(self, action: dict[str, Any] | None) -> SourceFrame | None: ...

    def close(self) -> None: ...


class _SourceBase:
    """Shared counters, the rate-limited bad-action log and the context manager."""

    knows_actions = False
    republish_actions = False
    action_space: dict[str, Any] = {"type": "none"}

    def __init__(self, spec: str) -> None:
        self.spec = spec
        # completed episodes (gym) or passes through the footage (loop)
        self.episodes = 0
        # actions rejected as malformed (the default policy acted instead)
        self.bad_actions = 0

    def _bad_action(self, action: Any, why: str) -> None:
        self.bad_actions += 1
        if self.bad_actions <= 10 or self.bad_actions % 1000 == 0:
            logger.warning("{}: bad action #{} ({}): {}; the default policy acts instead",
                           self.spec, self.bad_actions, _short(action), why)

    def close(self) -> None:
        """Release what the source holds (idempotent)."""

    def __enter__(self) -> _SourceBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def as_rgb_frame(image: Any, where: str) -> np.ndarray:
    """``image`` as a fresh C-contiguous (H, W, 3) uint8 array (gray is repeated, alpha dropped)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise SourceError(f"{where}: frame dtype is {arr.dtype}, expected uint8")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or 0 in arr.shape:
        raise SourceError(f"{where}: frame shape {arr.shape} is not (H, W, 1|3|4)")
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    return np.array(arr[:, :, :3], dtype=np.uint8, order="C", copy=True)


# ---------------------------------------------------------------- spec parsing


def _bad_spec(spec: Any, why: str) -> ValueError:
    forms = "\n  ".join(SPEC_FORMS)
    return ValueError(f"source spec {spec!r}: {why}. Valid forms:\n  {forms}")


def _parse(spec: Any) -> tuple[str, Any]:
    """(scheme, argument) with the argument parsed; ValueError for anything malformed."""
    if not isinstance(spec, str) or not spec.strip():
        raise _bad_spec(spec, "must be a non-empty string")
    scheme, sep, arg = spec.partition(":")
    if scheme not in SCHEMES:
        raise _bad_spec(spec, f"unknown source {scheme!r}")
    if scheme == "synthetic":
        return scheme, _parse_size(spec, arg if sep else "64x64")
    if scheme == "screen":
        if not sep:
            return scheme, 1
        if not arg.isdigit():
            raise _bad_spec(spec, f"monitor must be a number >= 0, got {arg!r}")
        return scheme, int(arg)
    if not arg.strip():
        raise _bad_spec(spec, f"{scheme}: needs {'an env id' if scheme == 'gym' else 'a path'}")
    if scheme == "gym":
        if any(ch.isspace() for ch in arg):
            raise _bad_spec(spec, f"gym env id {arg!r} must not contain spaces")
        return scheme, arg
    return scheme, _existing_path(spec, scheme, Path(arg).expanduser())


def _parse_size(spec: str, text: str) -> tuple[int, int]:
    match = _SIZE_RE.match(text)
    if not match:
        raise _bad_spec(spec, f"synthetic size must be WxH (e.g. 64x64), got {text!r}")
    width, height = int(match[1]), int(match[2])
    if not (8 <= width <= 8192 and 8 <= height <= 8192):
        raise _bad_spec(spec, f"synthetic size {width}x{height} must be within 8..8192 each way")
    return width, height


def _existing_path(spec: str, scheme: str, path: Path) -> Path:
    if scheme == "folder" and not path.is_dir():
        raise _bad_spec(spec, f"folder {str(path)!r} does not exist or is not a directory")
    if scheme == "video" and not path.is_file():
        raise _bad_spec(spec, f"video file {str(path)!r} does not exist")
    if scheme == "replay" and not path.exists():
        raise _bad_spec(spec, f"session {str(path)!r} does not exist")
    return path


def check_spec(spec: str) -> None:
    """Validate ``spec`` without opening anything (scheme, size, monitor, path exists)."""
    _parse(spec)


def open_source(spec: str, *, seed: int = 0, **options: Any) -> Source:
    """Open the source ``spec`` names (``SPEC_FORMS``); ``options`` per scheme (``OPTIONS``).

    Raises ValueError for a bad spec or option, SourceError when it cannot be opened here.
    """
    scheme, arg = _parse(spec)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise _bad_spec(spec, f"seed must be an int >= 0, got {seed!r}")
    allowed = OPTIONS[scheme]
    if allowed is not None and set(options) - allowed:
        raise _bad_spec(spec, f"unknown options {sorted(set(options) - allowed)} "
                              f"({scheme} takes {sorted(allowed)})")
    opts = {k: v for k, v in options.items() if k != "loop"}
    loop = bool(options.get("loop", False))
    if scheme == "synthetic":
        return SyntheticSource(*arg, seed=seed, spec=spec, **opts)
    if scheme == "gym":
        from workers.game_sources import GymSource

        return GymSource(arg, seed=seed, spec=spec, **opts)
    if scheme in ("screen", "video", "folder"):
        from workers import file_sources

        if scheme == "screen":
            return file_sources.ScreenSource(arg, spec=spec)
        if scheme == "video":
            return file_sources.VideoSource(arg, loop=loop, spec=spec)
        return file_sources.FolderSource(arg, loop=loop, spec=spec)
    return _open_replay(arg, spec, options)


def __getattr__(name: str) -> Any:
    """The sources moved to workers.game_sources / workers.file_sources, loaded on first use."""
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def _open_replay(path: Path, spec: str, options: dict[str, Any]) -> Source:
    try:
        from workers.replay import ReplaySource
    except ImportError as e:
        raise SourceError(f"{spec}: the replay source (workers.replay.ReplaySource) cannot be "
                          f"imported: {e}") from e
    return ReplaySource(path, spec=spec, **options)


# ---------------------------------------------------------------- synthetic


class SyntheticSource(_SourceBase):
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
