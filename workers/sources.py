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

import csv
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from loguru import logger

from iwm_bus.errors import IWMError, WireError
from iwm_bus.wire import make_action

__all__ = [
    "SPEC_FORMS", "FolderSource", "GymSource", "ScreenSource", "Source", "SourceError",
    "SourceFrame", "SyntheticSource", "VideoSource", "check_spec", "open_source",
]

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
    "gym": frozenset({"loop", "max_episode_steps", "env_kwargs"}),
    "screen": frozenset({"loop"}),
    "video": frozenset({"loop"}),
    "folder": frozenset({"loop"}),
    "replay": None,
}
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
ACTIONS_CSV = "actions.csv"
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
_VIDEO_HINT = ("video: reads what Pillow reads (animated GIF, WebP, PNG/APNG, TIFF); for MP4 "
               "and other codecs extract frames first (ffmpeg -i in.mp4 DIR/%06d.png) and use "
               "folder:DIR")


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
    ``bad_actions`` are optional; the sources in this module have them)."""

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
        return GymSource(arg, seed=seed, spec=spec, **opts)
    if scheme == "screen":
        return ScreenSource(arg, spec=spec)
    if scheme == "video":
        return VideoSource(arg, loop=loop, spec=spec)
    if scheme == "folder":
        return FolderSource(arg, loop=loop, spec=spec)
    return _open_replay(arg, spec, options)


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


# ---------------------------------------------------------------- gymnasium


def _import_gym(env_id: str, spec: str) -> Any:
    hint = "install the games extra: pip install 'iwm-bus[games]'"
    try:
        import gymnasium as gym
    except ImportError as e:
        raise SourceError(f"{spec}: gymnasium is not installed ({e}); {hint}") from e
    try:
        if env_id.startswith("ALE/"):
            import ale_py

            gym.register_envs(ale_py)
        elif env_id.startswith("Vizdoom"):
            import vizdoom.gymnasium_wrapper  # noqa: F401  (registers the Vizdoom* ids)
    except ImportError as e:
        raise SourceError(f"{spec}: the game package is not installed ({e}); {hint}") from e
    return gym


class GymSource(_SourceBase):
    """A gymnasium environment made with ``render_mode="rgb_array"``, stepped once per frame.

    Discrete spaces take ``action_id``; Box spaces a ``vector`` of exactly the space's size
    (clipped to its bounds); MultiBinary a ``vector`` of n components (> 0.5 = pressed).
    Anything else, or no action, → the default policy: ``action_space.sample()`` seeded with
    ``seed``. At an episode's end the next ``step`` resets the env and returns the new
    episode's first frame with ``action=None`` (no action produced it); ``episodes`` counts
    finished episodes. Frames come from ``render()``, or from the observation when it is an
    RGB image (or a dict holding one under screen/rgb/pixels/image).
    """

    knows_actions = True

    def __init__(self, env_id: str, *, seed: int = 0, max_episode_steps: int | None = None,
                 env_kwargs: Mapping[str, Any] | None = None, spec: str | None = None) -> None:
        super().__init__(spec or f"gym:{env_id}")
        gym = _import_gym(env_id, self.spec)
        kwargs = dict(env_kwargs or {})
        if max_episode_steps is not None:
            kwargs["max_episode_steps"] = int(max_episode_steps)
        try:
            self.env = gym.make(env_id, render_mode="rgb_array", **kwargs)
        except gym.error.Error as e:
            raise _bad_spec(self.spec, f"gymnasium cannot make {env_id!r}: {e}") from e
        except Exception as e:  # an engine failing to start (missing ROM, no GL, ...)
            raise SourceError(f"{self.spec}: cannot create the environment: "
                              f"{type(e).__name__}: {e}") from e
        self._seed = seed
        self._needs_reset = False
        try:
            self._kind, self.action_space = _describe_space(self.env.action_space, self.spec)
        except ValueError:
            self.env.close()
            raise
        self.env.action_space.seed(seed)

    def reset(self) -> SourceFrame:
        self._needs_reset = False
        return SourceFrame(self._frame(self._call("reset", seed=self._seed)[0]))

    def step(self, action: dict[str, Any] | None) -> SourceFrame:
        if self._needs_reset:
            self._needs_reset = False
            return SourceFrame(self._frame(self._call("reset")[0]))
        env_action, applied = self._to_env(action)
        obs, _reward, terminated, truncated, _info = self._call("step", env_action)
        if terminated or truncated:
            self.episodes += 1
            self._needs_reset = True
        return SourceFrame(self._frame(obs), applied)

    def close(self) -> None:
        env, self.env = getattr(self, "env", None), None
        if env is not None:
            env.close()

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.env is None:
            raise SourceError(f"{self.spec}: the source is closed")
        try:
            return getattr(self.env, method)(*args, **kwargs)
        except Exception as e:  # the engine's own exception types vary by game
            raise SourceError(f"{self.spec}: env.{method} failed: {type(e).__name__}: {e}") from e

    def _to_env(self, action: Any) -> tuple[Any, dict[str, Any]]:
        """(action for env.step, wire action map of what was applied)."""
        if action is not None:
            try:
                return self._convert(action)
            except (TypeError, ValueError) as e:
                self._bad_action(action, str(e))
        sample = self.env.action_space.sample()
        if self._kind == "discrete":
            return sample, {"action_id": int(sample)}
        return sample, {"vector": np.asarray(sample, np.float32).ravel()}

    def _convert(self, action: Any) -> tuple[Any, dict[str, Any]]:
        if not isinstance(action, Mapping):
            raise TypeError(f"an action must be a map, got {type(action).__name__}")
        space = self.env.action_space
        if self._kind == "discrete":
            action_id = action.get("action_id")
            first, n = int(space.start), int(space.n)
            if action_id is None or isinstance(action_id, bool) or not isinstance(
                    action_id, (int, np.integer)):
                raise ValueError(f"a discrete space needs an int action_id in "
                                 f"{first}..{first + n - 1}, got {action_id!r}")
            if not first <= int(action_id) < first + n:
                raise ValueError(f"action_id {action_id} is outside {first}..{first + n - 1}")
            return np.int64(action_id), {"action_id": int(action_id)}
        vector = action.get("vector")
        size = int(np.prod(space.shape))
        if vector is None:
            raise ValueError(f"a {self._kind} space needs a vector of {size} components")
        vec = np.asarray(vector, dtype=np.float64).ravel()
        if vec.size != size:
            raise ValueError(f"vector has {vec.size} components; the space needs {size}")
        if not np.all(np.isfinite(vec)):
            raise ValueError("vector holds NaN or infinity")
        if self._kind == "box":
            env_action = np.clip(vec.reshape(space.shape), space.low, space.high)
        else:  # multibinary
            env_action = (vec > 0.5).reshape(space.shape)
        env_action = env_action.astype(space.dtype)
        return env_action, {"vector": env_action.astype(np.float32).ravel()}

    def _frame(self, obs: Any) -> np.ndarray:
        image = self._call("render")
        if not _is_image(image):
            image = _image_in(obs)
        if image is None:
            raise SourceError(f"{self.spec}: the env gives no RGB frame (render() returned "
                              f"{type(image).__name__}, the observation is "
                              f"{type(obs).__name__})")
        return as_rgb_frame(image, self.spec)


def _describe_space(space: Any, spec: str) -> tuple[str, dict[str, Any]]:
    from gymnasium import spaces

    if isinstance(space, spaces.Discrete):
        return "discrete", {"type": "discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, spaces.Box):
        return "box", {"type": "box", "shape": list(space.shape),
                       "low": float(np.min(space.low)), "high": float(np.max(space.high))}
    if isinstance(space, spaces.MultiBinary):
        return "multibinary", {"type": "multibinary", "n": int(np.prod(space.shape))}
    raise _bad_spec(spec, f"action space {space} is not supported (Discrete, Box, MultiBinary)")


def _is_image(value: Any) -> bool:
    return (isinstance(value, np.ndarray) and value.dtype == np.uint8 and (
        value.ndim == 2 or (value.ndim == 3 and value.shape[2] in (1, 3, 4))))


def _image_in(obs: Any) -> np.ndarray | None:
    if _is_image(obs):
        return obs
    if isinstance(obs, Mapping):
        for key in ("screen", "rgb", "pixels", "image"):
            if _is_image(obs.get(key)):
                return obs[key]
    return None


# ---------------------------------------------------------------- screen


class ScreenSource(_SourceBase):
    """Desktop capture with mss: one grab per frame of ``monitor`` (0 = all monitors).

    Needs a display; without one the constructor raises SourceError saying "no display".
    Actions are ignored (the agent acts on the game itself).
    """

    def __init__(self, monitor: int = 1, *, spec: str | None = None) -> None:
        super().__init__(spec or f"screen:{monitor}")
        try:
            import mss
            from mss.exception import ScreenShotError
        except ImportError as e:
            raise SourceError(f"{self.spec}: mss is not installed ({e}); "
                              "pip install 'iwm-bus[screen]'") from e
        factory = getattr(mss, "MSS", None) or mss.mss
        try:
            self._sct = factory()
            monitors = self._sct.monitors
        except (ScreenShotError, OSError) as e:
            raise SourceError(
                f"{self.spec}: no display: {e}. Screen capture needs a desktop session "
                "(DISPLAY or WAYLAND_DISPLAY); on a headless machine use gym:, video: or "
                "folder:") from e
        if not 0 <= monitor < len(monitors):
            self._sct.close()
            raise _bad_spec(self.spec, f"monitor {monitor} does not exist; this display has "
                                       f"{len(monitors) - 1} (0 = all of them)")
        self._error_type = ScreenShotError
        self._monitor = monitors[monitor]

    def reset(self) -> SourceFrame:
        return SourceFrame(self._grab())

    def step(self, action: dict[str, Any] | None) -> SourceFrame:
        return SourceFrame(self._grab())

    def close(self) -> None:
        sct, self._sct = getattr(self, "_sct", None), None
        if sct is not None:
            sct.close()

    def _grab(self) -> np.ndarray:
        if self._sct is None:
            raise SourceError(f"{self.spec}: the source is closed")
        try:
            shot = self._sct.grab(self._monitor)
        except (self._error_type, OSError) as e:
            raise SourceError(f"{self.spec}: screen grab failed: {e}") from e
        bgra = np.frombuffer(shot.bgra, np.uint8).reshape(shot.height, shot.width, 4)
        return np.ascontiguousarray(bgra[:, :, 2::-1])  # BGRA -> RGB


# ---------------------------------------------------------------- recorded footage


class VideoSource(_SourceBase):
    """Frames of an animated image read with Pillow (GIF, WebP, PNG/APNG, TIFF).

    ``t_recorded_ns`` follows the per-frame durations stored in the file (None when it
    stores none), so ``--rate`` paces the footage; with ``loop`` the clock keeps running
    across passes. Actions are ignored.
    """

    def __init__(self, path: str | Path, *, loop: bool = False, spec: str | None = None) -> None:
        super().__init__(spec or f"video:{path}")
        from PIL import Image, UnidentifiedImageError

        self.path, self.loop = Path(path), loop
        try:
            self._im = Image.open(self.path)
        except UnidentifiedImageError as e:
            raise _bad_spec(self.spec, f"Pillow cannot read {str(self.path)!r} as an image "
                                       f"({e}). {_VIDEO_HINT}") from e
        except OSError as e:
            raise SourceError(f"{self.spec}: cannot open {self.path}: {e}") from e
        # frames in the file
        self.n_frames = int(getattr(self._im, "n_frames", 1))
        self._i = 0
        self._clock_ms: float | None = 0.0

    def reset(self) -> SourceFrame:
        self._i, self._clock_ms = 0, 0.0
        return self._read()

    def step(self, action: dict[str, Any] | None) -> SourceFrame | None:
        duration = self._im.info.get("duration")
        if self._clock_ms is not None and isinstance(duration, (int, float)) and duration > 0:
            self._clock_ms += float(duration)
        else:
            self._clock_ms = None  # the file stores no timing
        self._i += 1
        if self._i >= self.n_frames:
            if not self.loop:
                return None
            self.episodes += 1
            self._i = 0
        return self._read()

    def close(self) -> None:
        self._im.close()

    def _read(self) -> SourceFrame:
        try:
            self._im.seek(self._i)
            pixels = np.asarray(self._im.convert("RGB"))
        except (OSError, EOFError, ValueError) as e:
            raise SourceError(f"{self.spec}: cannot decode frame {self._i} of {self.path}: "
                              f"{e}") from e
        t_ns = None if self._clock_ms is None else int(round(self._clock_ms * 1e6))
        return SourceFrame(as_rgb_frame(pixels, self.spec), None, t_ns)


def _natural_key(path: Path) -> list[Any]:
    """frame2.png before frame10.png (digits compare as numbers)."""
    return [int(part) if i % 2 else part.lower()
            for i, part in enumerate(re.split(r"(\d+)", path.name))]


class FolderSource(_SourceBase):
    """An image sequence: the PNG/JPG files of a folder in natural order (all one size).

    An optional ``actions.csv`` beside them makes the source know its actions: a header row,
    then one row per frame that has an action. Columns: ``frame`` (0-based index in the
    sorted list; the row is the action that PRODUCED that frame), ``action_id`` and/or
    vector components ``v0, v1, ...``. Actions from the agent are ignored.
    """

    def __init__(self, path: str | Path, *, loop: bool = False, spec: str | None = None) -> None:
        super().__init__(spec or f"folder:{path}")
        from PIL import Image

        self._image = Image
        self.path, self.loop = Path(path), loop
        self.files = sorted((p for p in self.path.iterdir()
                             if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                            key=_natural_key)
        if not self.files:
            raise _bad_spec(self.spec, f"no PNG/JPG images in {str(self.path)!r}")
        self.size = self._check_sizes()
        csv_path = self.path / ACTIONS_CSV
        self.actions = read_actions_csv(csv_path, len(self.files)) if csv_path.exists() else {}
        self.knows_actions = csv_path.exists()
        self._i = 0

    def reset(self) -> SourceFrame:
        self._i = 0
        return self._read()

    def step(self, action: dict[str, Any] | None) -> SourceFrame | None:
        self._i += 1
        if self._i >= len(self.files):
            if not self.loop:
                return None
            self.episodes += 1
            self._i = 0
        return self._read()

    def _check_sizes(self) -> tuple[int, int]:
        """(width, height) shared by every image (reads headers only)."""
        sizes: dict[tuple[int, int], Path] = {}
        for file in self.files:
            try:
                with self._image.open(file) as im:
                    sizes.setdefault(im.size, file)
            except OSError as e:
                raise SourceError(f"{self.spec}: cannot read {file}: {e}") from e
            if len(sizes) > 1:
                (s0, f0), (s1, f1) = sizes.items()
                raise _bad_spec(self.spec, f"images differ in size: {f0.name} is "
                                           f"{s0[0]}x{s0[1]}, {f1.name} is {s1[0]}x{s1[1]}")
        return next(iter(sizes))

    def _read(self) -> SourceFrame:
        file = self.files[self._i]
        try:
            with self._image.open(file) as im:
                pixels = np.asarray(im.convert("RGB"))
        except OSError as e:
            raise SourceError(f"{self.spec}: cannot read {file}: {e}") from e
        if (pixels.shape[1], pixels.shape[0]) != self.size:
            raise SourceError(f"{self.spec}: {file.name} changed size while running")
        return SourceFrame(as_rgb_frame(pixels, self.spec), self.actions.get(self._i))


def read_actions_csv(path: Path, n_frames: int) -> dict[int, dict[str, Any]]:
    """{frame index: wire action map} from an actions.csv (see FolderSource)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = columns
        vcols = sorted((c for c in columns if re.fullmatch(r"v\d+", c)), key=lambda c: int(c[1:]))
        unknown = set(columns) - {"frame", "action_id"} - set(vcols)
        if "frame" not in columns or unknown or not ("action_id" in columns or vcols):
            raise ValueError(f"{path}: header {columns} must be 'frame' plus 'action_id' and/or "
                             "vector columns v0, v1, ...")
        if vcols != [f"v{i}" for i in range(len(vcols))]:
            raise ValueError(f"{path}: vector columns must be v0..v{len(vcols) - 1}, got {vcols}")
        out: dict[int, dict[str, Any]] = {}
        for line, row in enumerate(reader, start=2):
            try:
                frame, action = _parse_action_row(row, vcols)
            except (ValueError, WireError) as e:
                raise ValueError(f"{path}:{line}: {e}") from None
            if not 0 <= frame < n_frames:
                raise ValueError(f"{path}:{line}: frame {frame} is outside 0..{n_frames - 1}")
            if frame in out:
                raise ValueError(f"{path}:{line}: frame {frame} has a second row")
            if action is not None:
                out[frame] = action
    return out


def _parse_action_row(row: dict[str, str | None], vcols: list[str]) -> tuple[int, Any]:
    frame = int((row.get("frame") or "").strip())
    text_id = (row.get("action_id") or "").strip()
    values = [(row.get(c) or "").strip() for c in vcols]
    if any(values) and not all(values):
        raise ValueError("vector columns must be all filled or all empty")
    vector = [float(v) for v in values] if vcols and all(values) else None
    if vector is not None and not all(math.isfinite(v) for v in vector):
        raise ValueError("vector holds NaN or infinity")
    return frame, make_action(vector, int(text_id) if text_id else None)
