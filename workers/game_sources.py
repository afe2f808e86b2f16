"""The gymnasium source: Atari (ALE) and ViZDoom games, or any env that renders RGB.

Opened through ``workers.sources.open_source("gym:<env id>")``; gymnasium and the game
packages (``pip install 'iwm-bus[games]'``) are imported only when a source is made::

    src = open_source("gym:ALE/Pong-v5", seed=0)
    frame = src.step({"action_id": 2})    # SourceFrame with the action that produced it
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from workers.sources import SourceError, SourceFrame, _bad_spec, _SourceBase, as_rgb_frame

__all__ = ["GymSource"]


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
