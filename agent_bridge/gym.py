"""A gymnasium wrapper that runs every frame of an env through a world-model sidecar.

::

    import gymnasium as gym
    from agent_bridge.gym import IWMWrapper

    env = IWMWrapper(gym.make("ALE/Breakout-v5", render_mode="rgb_array"),
                     intrinsic_reward=0.01)          # curiosity: reward += 0.01 * surprise
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    info["iwm"]   # {"seq", "surprise", "surprise_z", "rr", "mrr", "intrinsic_reward"}

The wrapper is the sidecar's capture: it owns a shared-memory FrameRing, writes each
rendered frame (``env.render()``, any RGB-rendering env) into it with the action that
produced it, announces it on ``iwm.frame`` and waits for that frame's ``iwm.surprise`` and
``iwm.mrr`` from an encoder worker process it starts (lossless: every frame, in order).
The worker runs the shipped model (or ``model=PATH``) in its own process, so this process
imports no torch. Discrete actions travel as ``action_id`` (an ALE game's minimal action set
is mapped to its full 18-action ids, the vocabulary the shipped model was trained on, see
docs/actions.md), Box actions as the action ``vector`` (flattened). Surprise is nil for the first frame of an episode (its prediction
came from the last episode's end); the intrinsic reward is then 0. Curiosity as prediction error: ICM (Pathak et al.
2017), RND (Burda et al. 2018).

Vector envs: wrap each sub-env (``gym.vector.SyncVectorEnv([lambda: IWMWrapper(...)] *
n)``): one worker per sub-env. ``close()`` stops the worker and removes the ring.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np

from iwm_bus.bus import topics
from iwm_bus.bus.ring import FrameRing
from iwm_bus.bus.transport import Endpoints, Publisher, Subscriber
from iwm_bus.bus.wire import make_action
from iwm_bus.config import WorkerConfig

__all__ = ["IWMWrapper"]

#: seconds to wait for the worker to be ready, and for one frame's result
START_TIMEOUT_S = 120.0
FRAME_TIMEOUT_S = 30.0


class IWMWrapper(gymnasium.Wrapper):
    """Adds ``info["iwm"]`` (and optionally ``beta * surprise`` to the reward) to an env."""

    def __init__(self, env: gymnasium.Env, *, intrinsic_reward: float = 0.0,
                 model: str | os.PathLike[str] | None = None, device: str = "cpu",
                 threads: int = 1, frame_timeout_s: float = FRAME_TIMEOUT_S) -> None:
        super().__init__(env)
        if env.render_mode != "rgb_array":
            raise ValueError(f"IWMWrapper needs an env that renders RGB frames: make it with "
                             f"render_mode='rgb_array' (got {env.render_mode!r})")
        if not np.isfinite(intrinsic_reward):
            raise ValueError(f"intrinsic_reward must be finite, got {intrinsic_reward}")
        self.beta = float(intrinsic_reward)
        self._worker_cfg = WorkerConfig(mode="lossless", model_path=model, device=device,
                                        threads=threads, stats_interval_s=0.25)
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

    # ------------------------------------------------------------------ internals

    def _run(self, action: Any) -> dict[str, Any]:
        frame = self.env.render()
        if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"env.render() must return an (H, W, 3) RGB array, got "
                             f"{type(frame).__name__} {getattr(frame, 'shape', '')}")
        if self._sidecar is None:
            self._sidecar = _Sidecar(self._worker_cfg, frame.shape)
        elif frame.shape[:2] != self._sidecar.shape:
            raise ValueError(f"env.render() changed its frame size from {self._sidecar.shape} "
                             f"to {frame.shape[:2]}; one size per wrapped env")
        return self._sidecar.process(np.ascontiguousarray(frame, np.uint8),
                                     self._action(action), self._timeout)

    def _action(self, action: Any) -> dict[str, Any] | None:
        if action is None:  # the first frame of an episode: no action produced it
            return None
        if isinstance(self.env.action_space, gymnasium.spaces.Discrete):
            index = int(action) - int(self.env.action_space.start)
            ale_set = getattr(self.env.unwrapped, "_action_set", None)
            if ale_set is not None:  # ALE's minimal set: its full-set id is the shared vocab
                index = int(getattr(ale_set[index], "value", ale_set[index]))
            return make_action(action_id=index)
        return make_action(np.asarray(action, np.float32).ravel())


class _Sidecar:
    """Ring + notices (the capture's part) and an encoder worker process."""

    def __init__(self, cfg: WorkerConfig, shape: tuple[int, ...]) -> None:
        import multiprocess as mp

        self._dir = Path(tempfile.mkdtemp(prefix="iwmg", dir="/tmp"))
        os.chmod(self._dir, 0o700)
        eps = Endpoints.ipc(self._dir)
        name = f"iwm_{os.getpid()}_{secrets.token_hex(4)}"
        h, w, _ = shape
        self.shape = (h, w)
        self._ring: FrameRing | None = None
        self._pub: Publisher | None = None
        self._sub: Subscriber | None = None
        self._proc: Any = None
        self._pending: dict[int, dict[str, Any]] = {}
        try:
            self._ring = FrameRing.create(name, slots=8, max_height=h, max_width=w)
            self._pub = Publisher(eps.capture)
            self._sub = Subscriber([eps.worker], [topics.SURPRISE, topics.MRR, topics.STATS])
            self._proc = mp.get_context("spawn").Process(
                target=_worker_entry, args=(cfg, eps, name), name="iwm-worker", daemon=True)
            self._proc.start()
            self._wait(lambda: self._ready, START_TIMEOUT_S, "the worker to start")
        except BaseException:
            self.close()  # nothing left in /dev/shm or /tmp when the worker cannot start
            raise

    _ready = False

    def process(self, frame: np.ndarray, action: dict[str, Any] | None,
                timeout: float) -> dict[str, Any]:
        from workers.capture import write_frame

        seq = write_frame(self._ring, self._pub, frame, action, "gym")["seq"]
        self._wait(lambda: {"surprise", "mrr"} <= self._pending.get(seq, {}).keys(), timeout,
                   f"the worker's result for frame {seq}")
        got = self._pending.pop(seq)
        for old in [s for s in self._pending if s < seq]:
            del self._pending[old]
        s, m = got["surprise"], got["mrr"]
        return {"seq": seq, "surprise": s["surprise"], "surprise_z": s.get("surprise_z"),
                "rr": m["rr"], "mrr": m["mrr"]}

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
            else:
                self._pending.setdefault(msg["seq"], {})[msg["kind"]] = msg

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
        if self._ring is not None:
            self._ring.unlink()
            self._ring.close()
        self._sub = self._pub = self._ring = self._proc = None
        shutil.rmtree(self._dir, ignore_errors=True)


def _worker_entry(cfg: WorkerConfig, eps: Endpoints, ring: str) -> None:
    from workers.entry import exit_with

    exit_with("workers.encoder:run_worker", cfg, eps, ring)
