"""Per-stream state of the encoder worker: actions, latents, rollout MRR, frames, counters.

:class:`workers.encoder.EncoderWorker` holds one of each for the frame stream it serves:
:class:`ActionBook` validates actions and answers "the action in force at capture time",
:class:`LatentBank` keeps the MRR candidates, :class:`HorizonMRR` measures the rollout
confidence (the frames come from :mod:`workers.ring_reader`) and
:class:`StreamStats` counts what happened. None of them touch a socket.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from loguru import logger

from iwm_bus import metrics
from iwm_bus.actions import check_action_id, pad_cond
from iwm_bus.bus.wire import make_action
from iwm_bus.errors import RingError
from iwm_bus.logs import Throttle

#: rollout horizons whose MRR is measured (rollout RPC: mrr_seq[k] is horizon k + 1)
HORIZON = 5
#: the horizon MRR is measured every this many processed frames
HORIZON_EVERY = 8
#: running MRR (per frame and per horizon) is the mean of the last this many values
MRR_WINDOW = 1000


# ----------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Action:
    """An action as the predictor takes it, and as it is published with the surprise."""

    # (cond_dim,) float32, the vector zero-padded (zeros when there is none)
    cond: np.ndarray
    # discrete action token, -1 = none
    action_id: int = -1
    # the action map published on iwm.surprise (None when no action was known)
    wire: dict[str, Any] | None = None


class ActionBook:
    """Validates the actions frame notices carry, against the model's action format.

    A vector longer than ``cond_dim``, not 1-D, or not finite, or an action id outside
    ``[-1, num_actions)`` is counted in ``bad`` and ignored. A model without discrete action
    tokens (``num_actions == 0``) cannot use an id: it is dropped from the action (the vector
    is still used) and counted in ``ids_ignored``.
    """

    def __init__(self, cond_dim: int, num_actions: int, log: Throttle) -> None:
        self.cond_dim, self.num_actions, self._log = cond_dim, num_actions, log
        self.none = Action(np.zeros(cond_dim, np.float32))
        self.received = 0  # valid actions parsed
        self.bad = 0
        self.ids_ignored = 0

    def parse(self, vector: Any, action_id: Any, where: str) -> Action | None:
        """The checked Action, or None (counted, logged) when it is bad."""
        try:
            cond, vec = self.none.cond, None
            if vector is not None:
                vec = np.asarray(vector)
                if vec.dtype.kind not in "fiu" or vec.ndim != 1:
                    raise ValueError(f"vector must be a 1-D numeric array, got dtype "
                                     f"{vec.dtype} shape {vec.shape}")
                cond = pad_cond(vec, self.cond_dim)  # raises when too long or not finite
            aid = self._action_id(action_id)
        except ValueError as e:
            self.bad += 1
            self._log.warning("bad-action", "ignored bad action from {} (#{}): {}", where,
                              self.bad, e)
            return None
        if vec is None and aid < 0:
            return self.none
        self.received += 1
        return Action(cond, aid, make_action(vec, aid if aid >= 0 else None))

    def _action_id(self, action_id: Any) -> int:
        if action_id is None or action_id == -1:
            return -1
        check_action_id(action_id)  # an int >= 0 (-1 is "none", above)
        if self.num_actions == 0:
            self.ids_ignored += 1
            if self.ids_ignored == 1:
                logger.warning("the model has no discrete action tokens (num_actions=0): "
                               "action ids are ignored, action vectors are used")
            return -1
        return check_action_id(action_id, self.num_actions)



# ----------------------------------------------------------------------------- latents


def frame_key(patches: np.ndarray) -> np.ndarray:
    """The vector a frame is ranked by in MRR: its patch latents (N, D), each token
    layer-normed, flattened to (N*D,) float32 (``train.evaluate`` ranks the same way)."""
    return metrics.layer_norm(patches).astype(np.float32).reshape(-1)


class LatentBank:
    """The ``size`` most recent frame keys (MRR candidates), kept as unit vectors.

    :meth:`rank` is :func:`iwm_bus.metrics.reciprocal_rank` with ties in favour of the
    truth (cosine similarity), in one pass over the stored unit keys (~0.1 ms for 32 frames
    of 64 x 192 latents, against ~6 ms normalising the bank again for every ranking). The
    observed key is scored by the same expression as the candidates, in the same array, so
    a candidate identical to it ties exactly.
    """

    def __init__(self, size: int, dim: int) -> None:
        self._buf = np.zeros((size + 1, dim), np.float64)  # row 0: the observed key
        self._n = 0
        self._i = 0

    def __len__(self) -> int:
        return self._n

    def add(self, key: np.ndarray) -> None:
        self._buf[1 + self._i] = _unit(key)
        self._i = (self._i + 1) % (len(self._buf) - 1)
        self._n = min(self._n + 1, len(self._buf) - 1)

    def rank(self, pred: np.ndarray, key: np.ndarray) -> float:
        """Reciprocal rank of ``key`` among itself and the stored keys by cosine similarity
        to ``pred`` (all (F,)); only strictly more similar candidates cost a rank."""
        pool = self._buf[: 1 + self._n]
        pool[0] = _unit(key)
        sims = np.einsum("kf,f->k", pool, _unit(pred))  # one loop, the same for every row
        return 1.0 / (1 + int(np.count_nonzero(sims[1:] > sims[0])))

    def clear(self) -> None:
        self._n = self._i = 0


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


class HorizonMRR:
    """Measured rollout confidence: the running MRR of h-step rollouts, h = 1..horizon.

    Every ``every`` processed frames a rollout *chain* starts from that frame's one-step
    prediction; the worker advances the live chains together with its own next-frame
    prediction (one batched predictor call per frame, with the actions actually used), and
    a chain is ranked at every frame it reaches until it is ``horizon`` frames old.
    Horizon 1 is the worker's per-frame reciprocal rank itself. (Measuring all horizons at
    once every ``every`` frames instead cost a 5 x 5 rollout that stalled the frame after it.)
    """

    def __init__(self, horizon: int = HORIZON, every: int = HORIZON_EVERY,
                 window: int = MRR_WINDOW) -> None:
        self.horizon, self.every = horizon, every
        self.means = [metrics.RunningMean(window) for _ in range(horizon)]
        self._chains: list[tuple[int, np.ndarray]] = []  # (age in frames, predicted (N, D))
        self._count = 0

    def values(self) -> np.ndarray:
        """(horizon,) float32 running means; NaN where not measured yet."""
        return np.array([m.value for m in self.means], np.float32)

    def chains(self) -> list[np.ndarray]:
        """The live chains' predictions for the last processed frame, (N, D) each: the worker
        advances them with its next prediction and passes the results to ``observe``."""
        return [p for _, p in self._chains]

    def observe(self, steps: int, pred: np.ndarray, rr: float, advanced: list[np.ndarray],
                key: np.ndarray, bank: LatentBank) -> None:
        """A frame ``steps`` frames after the last one, ranked as ``key`` among ``bank``:
        ``pred`` (N, D) / ``rr`` the worker's prediction of it and its reciprocal rank,
        ``advanced`` the chains (in ``chains()`` order) advanced by the same ``steps``."""
        if steps <= self.horizon:
            self.means[steps - 1].update(rr)
        live = []
        for (age, _), p in zip(self._chains, advanced, strict=True):
            age += steps
            if age <= self.horizon and len(bank):
                rr_h = bank.rank(frame_key(p), key)
                self.means[age - 1].update(rr_h)
            if age < self.horizon:
                live.append((age, p))
        self._count += 1
        if self._count % self.every == 0 and steps < self.horizon:
            live.append((steps, pred))
        self._chains = live

    def clear(self) -> None:
        """Forget the chains (a new stream, or a gap the prediction does not bridge)."""
        self._chains = []
        self._count = 0


# ----------------------------------------------------------------------------- frames


def rgb(frame: Any) -> Any:
    """(H, W, C) with C in 1, 3, 4 -> (H, W, 3): grey repeated, alpha (RGBA) dropped."""
    c = frame.shape[-1]
    if c == 3:
        return frame
    if c == 4:
        return frame[..., :3]
    if c == 1:
        return frame.expand(*frame.shape[:2], 3) if isinstance(frame, torch.Tensor) \
            else np.repeat(frame, 3, axis=-1)
    raise RingError(f"frames with {c} channels cannot be encoded (1, 3 or 4)")


# ----------------------------------------------------------------------------- stats


@dataclass
class StreamStats:
    """Counters of the frame stream plus the current stats window."""

    notices: int = 0
    frames: int = 0
    dropped_overwritten: int = 0
    torn: int = 0
    skipped: int = 0
    stream_restarts: int = 0
    _win_notices: int = 0
    _win_frames: int = 0
    _win_latency_ns: list[int] = field(default_factory=list)
    _win_start: float = field(default_factory=time.monotonic)

    def notice(self) -> None:
        self.notices += 1
        self._win_notices += 1

    def frame(self, latency_ns: int) -> None:
        self.frames += 1
        self._win_frames += 1
        self._win_latency_ns.append(latency_ns)

    def take_window(self) -> dict[str, float | None]:
        """Rates and capture->publish latency percentiles since the last call; resets."""
        now = time.monotonic()
        dt = max(now - self._win_start, 1e-9)
        lat = np.asarray(self._win_latency_ns, np.float64) / 1e6
        out = {"fps_in": self._win_notices / dt, "fps_out": self._win_frames / dt,
               "latency_p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
               "latency_p99_ms": float(np.percentile(lat, 99)) if lat.size else None}
        self._win_notices = self._win_frames = 0
        self._win_latency_ns = []
        self._win_start = now
        return out
