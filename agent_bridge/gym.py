"""Gymnasium wrappers that run every frame of an env through a world-model sidecar.

::

    import gymnasium as gym
    from agent_bridge.gym import IWMVectorWrapper, IWMWrapper

    env = IWMWrapper(gym.make("ALE/Breakout-v5", render_mode="rgb_array"),
                     intrinsic_reward=0.01)          # curiosity: reward += 0.01 * surprise
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    info["iwm"]   # {"seq", "surprise", "surprise_z", "rr", "mrr", "intrinsic_reward"}

    envs = IWMVectorWrapper(gym.make_vec("ALE/Breakout-v5", num_envs=8,
                                         vectorization_mode="sync", render_mode="rgb_array"),
                            intrinsic_reward=0.01)   # one batched worker for all 8 games
    obs, infos = envs.reset(seed=0)
    obs, rewards, terminated, truncated, infos = envs.step(envs.action_space.sample())
    infos["iwm"]["surprise"]   # (8,) float64, NaN where there is none

The wrapper is the sidecar's capture: it owns a shared-memory FrameRing per env, writes each
rendered frame (``env.render()``, any RGB-rendering env) into it with the action that
produced it, announces it on ``iwm.frame`` and waits for that frame's ``iwm.surprise`` and
``iwm.mrr`` from an encoder worker process it starts (lossless: every frame, in order).
The worker runs the shipped model (or ``model=PATH``) in its own process, so this process
imports no torch. Discrete actions travel as ``action_id`` (an ALE game's minimal action set
is mapped to its full 18-action ids, the vocabulary the shipped model was trained on, see
docs/actions.md), Box actions as the action ``vector`` (flattened). Surprise is nil for the first frame of an episode (its prediction
came from the last episode's end); the intrinsic reward is then 0. Curiosity as prediction error: ICM (Pathak et al.
2017), RND (Burda et al. 2018).

Vector envs: :class:`IWMVectorWrapper` around any gymnasium ``VectorEnv`` (Sync or Async)
starts **one** worker for all n sub-envs (``WorkerConfig.envs``): each vector step is one
batched round trip (n frames encoded and predicted as one batch), each sub-env keeps its own
state in the worker, and autoreset is followed per sub-env (the first frame of a new episode
has no surprise and no bonus). :class:`IWMWrapper` is the n = 1 case of the same sidecar.
``close()`` stops the worker and removes the rings.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from iwm_bus.extras import require

# the wrapper starts a capture and a worker (the model) beside the game: the sidecar's extra
require("sidecar", "agent_bridge.gym")

import gymnasium
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv, VectorWrapper

from iwm_bus.bus import topics
from iwm_bus.bus.ring import FrameRing, env_ring_names
from iwm_bus.bus.transport import Endpoints, Publisher, Subscriber
from iwm_bus.bus.wire import make_action
from iwm_bus.config import WorkerConfig

__all__ = ["IWMVectorWrapper", "IWMWrapper"]

#: seconds to wait for the worker to be ready, and for one frame's result
START_TIMEOUT_S = 120.0
FRAME_TIMEOUT_S = 30.0
#: the numbers of one frame in ``info["iwm"]``
FIELDS = ("surprise", "surprise_z", "rr", "mrr")


def _worker_config(n: int, model: str | os.PathLike[str] | None, device: str, threads: int,
                   worker: WorkerConfig | None) -> WorkerConfig:
    """The wrapper's worker: lossless, n envs; ``worker`` (e.g. an untrained tiny model for
    tests) replaces the model, device and threads arguments."""
    if worker is not None:
        return WorkerConfig(**{**vars(worker), "mode": "lossless", "envs": n,
                               "stats_interval_s": 0.25})
    return WorkerConfig(mode="lossless", model_path=model, device=device, threads=threads,
                        stats_interval_s=0.25, envs=n)


def _check_beta(intrinsic_reward: float) -> float:
    if not np.isfinite(intrinsic_reward):
        raise ValueError(f"intrinsic_reward must be finite, got {intrinsic_reward}")
    return float(intrinsic_reward)


def _check_frame(frame: Any, which: str) -> np.ndarray:
    if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"{which}.render() must return an (H, W, 3) RGB array, got "
                         f"{type(frame).__name__} {getattr(frame, 'shape', '')}")
    return np.ascontiguousarray(frame, np.uint8)


def _action_map(space: gymnasium.Space, ale_set: Any, action: Any) -> dict[str, Any] | None:
    """The wire action of ``action`` in ``space`` (None: the first frame of an episode)."""
    if action is None:
        return None
    if isinstance(space, gymnasium.spaces.Discrete):
        index = int(action) - int(space.start)
        if ale_set is not None:  # ALE's minimal set: its full-set id is the shared vocab
            index = int(getattr(ale_set[index], "value", ale_set[index]))
        return make_action(action_id=index)
    return make_action(np.asarray(action, np.float32).ravel())


class IWMWrapper(gymnasium.Wrapper):
    """Adds ``info["iwm"]`` (and optionally ``beta * surprise`` to the reward) to an env.

    The n = 1 case of :class:`IWMVectorWrapper`'s sidecar. ``worker``: the worker's
    configuration instead of ``model`` / ``device`` / ``threads``.
    """

    def __init__(self, env: gymnasium.Env, *, intrinsic_reward: float = 0.0,
                 model: str | os.PathLike[str] | None = None, device: str = "cpu",
                 threads: int = 1, frame_timeout_s: float = FRAME_TIMEOUT_S,
                 worker: WorkerConfig | None = None) -> None:
        super().__init__(env)
        if env.render_mode != "rgb_array":
            raise ValueError(f"IWMWrapper needs an env that renders RGB frames: make it with "
                             f"render_mode='rgb_array' (got {env.render_mode!r})")
        self.beta = _check_beta(intrinsic_reward)
        self._worker_cfg = _worker_config(1, model, device, threads, worker)
        self._timeout = frame_timeout_s
        self._sidecar: _Sidecar | None = None

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        iwm = self._run(None)
        # the worker predicted this frame from the last episode's end: no evidence
        iwm["surprise"] = iwm["surprise_z"] = iwm["rr"] = None
        info["iwm"] = iwm
        return obs, info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        iwm = self._run(action)
        bonus = self.beta * iwm["surprise"] if iwm["surprise"] is not None else 0.0
        iwm["intrinsic_reward"] = bonus
        info["iwm"] = iwm
        return obs, float(reward) + bonus, terminated, truncated, info

    def close(self) -> None:
        if self._sidecar is not None:
            self._sidecar.close()
            self._sidecar = None
        super().close()

    def _run(self, action: Any) -> dict[str, Any]:
        frame = _check_frame(self.env.render(), "env")
        if self._sidecar is None:
            self._sidecar = _Sidecar(self._worker_cfg, [frame.shape])
        ale_set = getattr(self.env.unwrapped, "_action_set", None)
        got = self._sidecar.process([frame], [_action_map(self.env.action_space, ale_set,
                                                          action)], self._timeout)
        return got[0]


class IWMVectorWrapper(VectorWrapper):
    """Adds ``infos["iwm"]`` (arrays of shape (n,)) and optionally ``beta * surprise`` to
    the rewards of a vector env, through one batched worker for all its sub-envs.

    ``infos["iwm"]``: ``seq`` (int64, each sub-env's frame seq), ``surprise``,
    ``surprise_z``, ``rr``, ``mrr`` (float64, NaN where there is none: the first frame of an
    episode, a prediction still warming up) and ``intrinsic_reward`` (0 where there is no
    surprise). Autoreset is followed per sub-env (``autoreset_mode`` NEXT_STEP, SAME_STEP,
    or DISABLED with ``reset(options={"reset_mask": ...})``): the first frame of a new
    episode gets no surprise and no bonus, and no action produced it. Sub-envs must render
    RGB frames (``render_mode="rgb_array"``); their sizes may differ (batched per size).
    """

    def __init__(self, env: VectorEnv, *, intrinsic_reward: float = 0.0,
                 model: str | os.PathLike[str] | None = None, device: str = "cpu",
                 threads: int = 0, frame_timeout_s: float = FRAME_TIMEOUT_S,
                 worker: WorkerConfig | None = None) -> None:
        super().__init__(env)
        if env.render_mode != "rgb_array":
            raise ValueError(f"IWMVectorWrapper needs sub-envs that render RGB frames: make "
                             f"them with render_mode='rgb_array' (got {env.render_mode!r})")
        self.beta = _check_beta(intrinsic_reward)
        self.n = env.num_envs
        self._worker_cfg = _worker_config(self.n, model, device, threads, worker)
        self._timeout = frame_timeout_s
        self._sidecar: _Sidecar | None = None
        self._mode = AutoresetMode(env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP))
        self._first = np.ones(self.n, bool)  # the next frame starts an episode
        try:
            self._ale_sets: Sequence[Any] = env.get_attr("_action_set")
        except AttributeError:  # not an ALE game
            self._ale_sets = [None] * self.n

    def reset(self, *, seed: int | list[int] | None = None,
              options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        obs, infos = self.env.reset(seed=seed, options=options)
        mask = (options or {}).get("reset_mask")
        first = np.ones(self.n, bool) if mask is None else np.asarray(mask, bool)
        infos["iwm"] = self._run(first, None)
        self._first[:] = False
        return obs, infos

    def step(self, actions: Any) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
        obs, rewards, terminated, truncated, infos = self.env.step(actions)
        done = np.logical_or(terminated, truncated)
        # NEXT_STEP: a sub-env done last step was reset by this step (its action ignored);
        # SAME_STEP: one done now already shows its next episode's first frame
        first = self._first | done if self._mode == AutoresetMode.SAME_STEP else self._first
        iwm = self._run(first, actions)
        rewards = np.asarray(rewards, np.float64) + iwm["intrinsic_reward"]
        self._first = done if self._mode == AutoresetMode.NEXT_STEP else np.zeros(self.n, bool)
        infos["iwm"] = iwm
        return obs, rewards, terminated, truncated, infos

    def close(self, **kwargs: Any) -> None:
        if self._sidecar is not None:
            self._sidecar.close()
            self._sidecar = None
        super().close(**kwargs)

    def _run(self, first: np.ndarray, actions: Any) -> dict[str, np.ndarray]:
        frames = [_check_frame(f, f"sub-env {i}") for i, f in enumerate(self.env.render())]
        if len(frames) != self.n:
            raise ValueError(f"render() gave {len(frames)} frames for {self.n} sub-envs")
        if self._sidecar is None:
            self._sidecar = _Sidecar(self._worker_cfg, [f.shape for f in frames])
        space = self.env.single_action_space
        acts = [None if actions is None or first[i]
                else _action_map(space, self._ale_sets[i], actions[i]) for i in range(self.n)]
        got = self._sidecar.process(frames, acts, self._timeout)
        out = {"seq": np.array([g["seq"] for g in got], np.int64)}
        for name in FIELDS:
            out[name] = np.array([np.nan if g[name] is None or (first[i] and name != "mrr")
                                  else g[name] for i, g in enumerate(got)], np.float64)
        out["intrinsic_reward"] = np.where(np.isnan(out["surprise"]), 0.0,
                                           self.beta * out["surprise"])
        return out


class _Sidecar:
    """Rings + notices (the capture's part, one ring per env) and an encoder worker process
    serving them all (``cfg.envs``)."""

    def __init__(self, cfg: WorkerConfig, shapes: list[tuple[int, ...]]) -> None:
        import multiprocess as mp

        self._dir = Path(tempfile.mkdtemp(prefix="iwmg", dir="/tmp"))
        os.chmod(self._dir, 0o700)
        eps = Endpoints.ipc(self._dir)
        names = env_ring_names(f"iwm_{os.getpid()}_{secrets.token_hex(4)}", len(shapes))
        self.n = len(shapes)
        self.shapes = [tuple(s[:2]) for s in shapes]
        self._rings: list[FrameRing] = []
        self._pub: Publisher | None = None
        self._sub: Subscriber | None = None
        self._proc: Any = None
        self._pending: dict[tuple[int, int], dict[str, Any]] = {}
        try:
            for name, (h, w) in zip(names, self.shapes, strict=True):
                self._rings.append(FrameRing.create(name, slots=8, max_height=h, max_width=w))
            self._pub = Publisher(eps.capture)
            self._sub = Subscriber([eps.worker], [topics.SURPRISE, topics.MRR, topics.STATS])
            self._proc = mp.get_context("spawn").Process(
                target=_worker_entry, args=(cfg, eps, names if self.n > 1 else names[0]),
                name="iwm-worker", daemon=True)
            self._proc.start()
            self._wait(lambda: self._ready, START_TIMEOUT_S, "the worker to start")
        except BaseException:
            self.close()  # nothing left in /dev/shm or /tmp when the worker cannot start
            raise

    _ready = False

    def process(self, frames: list[np.ndarray], actions: list[dict[str, Any] | None],
                timeout: float) -> list[dict[str, Any]]:
        """One frame of each env (with the action that produced it) in, each one's numbers
        out: all n notices go out before the first result is awaited, so the worker takes
        them as one batch."""
        from workers.capture import write_frame

        keys = []
        for env, (ring, frame, action) in enumerate(zip(self._rings, frames, actions,
                                                        strict=True)):
            if frame.shape[:2] != self.shapes[env]:
                raise ValueError(f"env {env}'s render() changed its frame size from "
                                 f"{self.shapes[env]} to {frame.shape[:2]}; one size per env")
            seq = write_frame(ring, self._pub, frame, action, "gym",
                              env if self.n > 1 else None)["seq"]
            keys.append((env, seq))
        self._wait(lambda: all({"surprise", "mrr"} <= self._pending.get(k, {}).keys()
                               for k in keys), timeout,
                   f"the worker's results for frames {[s for _, s in keys]}")
        out = []
        for env, seq in keys:
            got = self._pending.pop((env, seq))
            s, m = got["surprise"], got["mrr"]
            out.append({"seq": seq, "surprise": s["surprise"],
                        "surprise_z": s.get("surprise_z"), "rr": m["rr"], "mrr": m["mrr"]})
        self._pending.clear()  # (older ones: a frame published twice)
        return out

    def _wait(self, done: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if not self._proc.is_alive():
                raise RuntimeError(f"the world-model worker exited (code "
                                   f"{self._proc.exitcode}) while waiting for {what}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer from the world-model worker within {timeout:.0f}"
                                   f" s while waiting for {what}")
            got = self._sub.recv(50)
            if got is None:
                continue
            topic, msg = got
            kind = topics.base_topic(topic)
            if kind == topics.STATS:
                self._ready = self._ready or msg["values"].get("ready") == 1
            elif topic in (topics.SURPRISE, topics.MRR):  # (not a named stream's)
                key = (msg.get("env") or 0, msg["seq"])
                self._pending.setdefault(key, {})[msg["kind"]] = msg

    def close(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
        for part in (self._sub, self._pub):
            if part is not None:
                part.close()
        for ring in self._rings:
            ring.unlink()
            ring.close()
        self._sub = self._pub = self._proc = None
        self._rings = []
        shutil.rmtree(self._dir, ignore_errors=True)


def _worker_entry(cfg: WorkerConfig, eps: Endpoints, ring: str | list[str]) -> None:
    from workers.entry import exit_with

    exit_with("workers.encoder:run_worker", cfg, eps, ring)
