"""The gymnasium source: Atari (ALE) and ViZDoom games, or any env that renders RGB.

Opened through ``workers.sources.open_source("gym:<env id>")``; gymnasium and the game
packages (``pip install 'iwm-bus[games]'``) are imported only when a source is made::

    src = open_source("gym:ALE/Pong-v5", seed=0)
    frame = src.step({"action_id": 2})    # SourceFrame with the action that produced it
    open_source("gym:VizdoomBasic-v1").action_space   # {"type": "discrete", "n": 18, ...}
    open_source("gym:ALE/Pong-v5", actions="native")  # the env's own (minimal) action set

Games of the mix take the shared action vocabulary (``iwm_bus.actions``, docs/actions.md)
by default (``actions="shared"``): ALE envs are made with the full 18-action set, ViZDoom
envs with every button combination and the 18 ids mapped onto their buttons. ALE envs are
always made without sticky actions (``repeat_action_probability=0.0``), so the action a
frame records is the action that produced it; ``env_kwargs`` can override that.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from iwm_bus.actions import ALE_ENV_KWARGS, NUM_ACTIONS, doom_button_table, shared_action_space
from workers.sources.base import SourceBase, SourceError, SourceFrame, as_rgb_frame, bad_spec

__all__ = ["ACTION_MODES", "GymSource", "game_kwargs"]

#: ``actions`` option of a gym source: the shared 18-id vocabulary, or the env's own space
ACTION_MODES = ("shared", "native")
#: gymnasium.make kwargs a ViZDoom env needs to take every button combination
_DOOM_SHARED_KWARGS: dict[str, Any] = {"max_buttons_pressed": 0,
                                       "use_multi_binary_action_space": True}


def _is_ale(env_id: str) -> bool:
    return env_id.startswith("ALE/")


def _is_vizdoom(env_id: str) -> bool:
    return env_id.startswith("Vizdoom")


def game_kwargs(env_id: str, actions: str, env_kwargs: Mapping[str, Any] | None,
                spec: str) -> dict[str, Any]:
    """The gymnasium.make kwargs for ``env_id``: the game defaults, then ``env_kwargs``.

    ALE: no sticky actions, and the full action set when ``actions="shared"``; ViZDoom with
    ``actions="shared"``: every button combination (a MultiBinary space the ids map onto).
    A user kwarg that contradicts ``actions="shared"`` is a ValueError.
    """
    if actions not in ACTION_MODES:
        raise bad_spec(spec, f"actions must be one of {ACTION_MODES}, got {actions!r}")
    user = dict(env_kwargs or {})
    needed: dict[str, Any] = {}
    if _is_ale(env_id):
        defaults = {"repeat_action_probability": ALE_ENV_KWARGS["repeat_action_probability"]}
        if actions == "shared":
            needed = {"full_action_space": ALE_ENV_KWARGS["full_action_space"]}
    elif _is_vizdoom(env_id):
        defaults = {}
        if actions == "shared":
            needed = dict(_DOOM_SHARED_KWARGS)
    else:
        defaults = {}
    for key, value in needed.items():
        if key in user and user[key] != value:
            raise bad_spec(spec, f"env_kwargs {key}={user[key]!r} contradicts actions='shared' "
                                  f"(which needs {key}={value!r}); pass actions='native'")
    return {**defaults, **needed, **user}


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


class GymSource(SourceBase):
    """A gymnasium environment made with ``render_mode="rgb_array"``, stepped once per frame.

    Discrete spaces take ``action_id``; Box spaces a ``vector`` of exactly the space's size
    (clipped to its bounds); MultiBinary a ``vector`` of n components (> 0.5 = pressed).
    With ``actions="shared"`` (the default) ALE and ViZDoom envs take the shared ids 0..17
    (``iwm_bus.actions``; ``action_space["vocab"]`` names it), and ViZDoom ids are pressed
    as the buttons the vocabulary maps them to. Anything else, or no action, → the default
    policy: ``action_space.sample()`` (a uniform shared id for ViZDoom) seeded with
    ``seed``. At an episode's end the next ``step`` resets the env and returns the new
    episode's first frame with ``action=None`` (no action produced it); ``episodes`` counts
    finished episodes. Frames come from ``render()``, or from the observation when it is an
    RGB image (or a dict holding one under screen/rgb/pixels/image).
    """

    knows_actions = True

    def __init__(self, env_id: str, *, seed: int = 0, max_episode_steps: int | None = None,
                 env_kwargs: Mapping[str, Any] | None = None, actions: str = "shared",
                 spec: str | None = None) -> None:
        super().__init__(spec or f"gym:{env_id}")
        kwargs = game_kwargs(env_id, actions, env_kwargs, self.spec)
        gym = _import_gym(env_id, self.spec)
        if max_episode_steps is not None:
            kwargs["max_episode_steps"] = int(max_episode_steps)
        try:
            self.env = gym.make(env_id, render_mode="rgb_array", **kwargs)
        except gym.error.Error as e:
            raise bad_spec(self.spec, f"gymnasium cannot make {env_id!r}: {e}") from e
        except Exception as e:  # an engine failing to start (missing ROM, no GL, ...)
            raise SourceError(f"{self.spec}: cannot create the environment: "
                              f"{type(e).__name__}: {e}") from e
        self.env_id, self.env_kwargs, self.actions = env_id, kwargs, actions
        self._seed = seed
        self._needs_reset = False
        # shared ids -> ViZDoom button vectors, (18, buttons); None when ids go to env.step
        self._id_table: np.ndarray | None = None
        # the default policy's draws over the shared ids (ViZDoom)
        self._rng = np.random.default_rng(seed)
        try:
            self._kind, self.action_space = _describe_space(self.env.action_space, self.spec)
            if actions == "shared" and _is_vizdoom(env_id):
                self._id_table = self._doom_table()
                self._kind, self.action_space = "discrete", shared_action_space()
            elif actions == "shared" and _is_ale(env_id):
                n = getattr(self.env.action_space, "n", None)
                if n != NUM_ACTIONS:  # a few games (Skiing: 9) list no more, even full
                    raise bad_spec(self.spec, f"{env_id} has {n} actions even with "
                                              f"full_action_space=True, not the shared "
                                              f"{NUM_ACTIONS}; pass actions='native'")
                self.action_space = shared_action_space()
        except (ValueError, SourceError):
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

    def _doom_table(self) -> np.ndarray:
        """(18, buttons) 0/1 rows: the buttons each shared id presses (iwm_bus.actions)."""
        from gymnasium import spaces

        space = self.env.action_space
        if not isinstance(space, spaces.MultiBinary):
            raise SourceError(f"{self.spec}: actions='shared' needs binary buttons only; this "
                              f"scenario's action space is {space}; pass actions='native'")
        try:
            names = [b.name for b in self.env.unwrapped.game.get_available_buttons()]
        except AttributeError as e:
            raise SourceError(f"{self.spec}: cannot list the ViZDoom buttons: {e}") from e
        return np.array(doom_button_table(names), dtype=space.dtype)

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
        if self._id_table is not None:
            action_id = int(self._rng.integers(len(self._id_table)))
            return self._id_table[action_id], {"action_id": action_id}
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
            first, n = self.action_space["start"], self.action_space["n"]
            if action_id is None or isinstance(action_id, bool) or not isinstance(
                    action_id, (int, np.integer)):
                raise ValueError(f"a discrete space needs an int action_id in "
                                 f"{first}..{first + n - 1}, got {action_id!r}")
            if not first <= int(action_id) < first + n:
                raise ValueError(f"action_id {action_id} is outside {first}..{first + n - 1}")
            if self._id_table is not None:
                return self._id_table[int(action_id)], {"action_id": int(action_id)}
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
    raise bad_spec(spec, f"action space {space} is not supported (Discrete, Box, MultiBinary)")


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
