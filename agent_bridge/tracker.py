"""Applying bus messages to a ``BeingState``: what both bridges share (no sockets, no locks).

:class:`Tracker` takes decoded ``iwm.latent`` / ``iwm.surprise`` / ``iwm.mrr`` /
``iwm.stats`` messages, updates one state (a frame's surprise and MRR are held until its
latent, published last, arrives: one update per frame) and says which hooks fire;
:class:`VisionBridge` (a thread) and :class:`AsyncVisionBridge` (a task) feed it from their
sockets under their own lock.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from loguru import logger

from agent_bridge.state import BeingState
from iwm_bus.bus import topics, wire
from iwm_bus.errors import StaleDataError, UnknownMessage, WireError, WireVersionError
from iwm_bus.logs import worth_logging

__all__ = ["BridgeStats", "Callback", "Hook", "SEMANTIC_SUFFIXES", "Tracker", "check_max_age"]

Callback = Callable[[BeingState], Any]
#: topic suffixes of a semantic (invariant) stream
SEMANTIC_SUFFIXES = ("invariant", "semantic")


@dataclass
class BridgeStats:
    """Counters of one bridge (a copy; see ``VisionBridge.stats``)."""

    # valid messages received, all topics
    received: int = 0
    # latent frame seqs missing between consecutive latents on the plain topic
    gaps: int = 0
    # messages that failed to decode (bad bytes, wrong schema)
    decode_errors: int = 0
    # valid messages with unexpected content (e.g. a z_cls that is not (D,)), skipped
    unexpected: int = 0
    # a newer worker's messages (docs/wire.md): read without the fields this bridge does not
    # know / of kinds it does not know, skipped
    unknown_fields: int = 0
    unknown_kinds: int = 0
    # messages of a worker of another major wire version, refused (logged once)
    other_major: int = 0
    # times the latent seq went backwards (worker or capture restarted)
    restarts: int = 0
    # hook callbacks that raised
    callback_errors: int = 0
    # hook callbacks run
    callbacks: int = 0
    # actions published / dropped by the PUB socket
    actions_sent: int = 0
    actions_dropped: int = 0


@dataclass
class Hook:
    id: int
    kind: str  # "surprise" | "low_mrr" | "latent"
    threshold: float | None
    callback: Callback


class Tracker:
    """Applies decoded messages to a BeingState and says which hooks fire (no sockets, no locks)."""

    def __init__(self) -> None:
        self.state = BeingState()
        self.stats = BridgeStats()
        self.worker_stats: dict[str, dict[str, Any]] = {}
        self.hooks: dict[int, Hook] = {}
        self._ids = itertools.count(1)
        self._last_latent_seq: int | None = None
        # a frame's surprise and MRR, held until its latent arrives: the worker publishes the
        # latent last, and the state then takes all three of one seq in one update
        self._pending: dict[str, tuple[dict[str, Any], int]] = {}
        self._dual = False  # seen a semantic stream (a dual worker)
        self._bad_logged = 0
        self._unknown = wire.Unknowns()

    def add_hook(self, kind: str, threshold: float | None, callback: Callback) -> int:
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                    or not np.isfinite(threshold):
                raise ValueError(f"threshold must be a finite number, got {threshold!r}")
            threshold = float(threshold)
        hook = Hook(next(self._ids), kind, threshold, callback)
        self.hooks[hook.id] = hook
        return hook.id

    def decode(self, frames: list[bytes]) -> tuple[str, dict[str, Any]] | None:
        """The message, or None for one to skip: malformed, of another major version, or of
        a kind this bridge does not know (each counted)."""
        unknown = self._unknown
        try:
            return wire.unpack(frames, unknown=unknown)
        except UnknownMessage:
            return None
        except WireVersionError as e:
            self.stats.other_major += 1
            if self.stats.other_major % 1000 == 1:  # one line, not one a message
                logger.error("VisionBridge: {} (#{})", e, self.stats.other_major)
            return None
        except WireError as e:
            self.stats.decode_errors += 1
            self._log_bad(f"dropped malformed message: {e}")
            return None
        finally:
            self.stats.unknown_fields, self.stats.unknown_kinds = unknown.fields, unknown.kinds

    def apply(self, topic: str, msg: dict[str, Any], t_ns: int) -> list[Hook]:
        """Update the state from one message; return the hooks to run (in order)."""
        self.stats.received += 1
        base = topics.base_topic(topic)
        suffix = topic[len(base) + 1:]
        try:
            if base == topics.LATENT:
                return self._latent(msg, suffix, t_ns)
            if suffix in SEMANTIC_SUFFIXES and base in (topics.SURPRISE, topics.MRR):
                return self._semantic(base, msg)
            if suffix:  # other per-variant surprise/mrr streams: not the core state
                return []
            if base in (topics.SURPRISE, topics.MRR):
                return self._metric(base, msg, t_ns)
            if base == topics.STATS:
                self.worker_stats[msg["source"]] = dict(msg["values"], t_ns=msg["t_ns"])
                return []
        except ValueError as e:
            self.stats.unexpected += 1
            self._log_bad(f"skipped unexpected {topic} message: {e}")
            return []
        self.stats.unexpected += 1
        self._log_bad(f"skipped message on unexpected topic {topic!r}")
        return []

    def _latent(self, msg: dict[str, Any], suffix: str, t_ns: int) -> list[Hook]:
        z = np.asarray(msg["z_cls"])
        if z.ndim == 2 and z.shape[0] == 1:
            z = z[0]
        if z.ndim != 1 or z.size == 0 or z.dtype.kind != "f":
            raise ValueError(f"z_cls must be a float (D,) array, got {z.dtype} {z.shape}")
        variant = msg["variant"]
        if suffix == "semantic":
            self._dual = True  # a dual worker: its plain latents are the equivariant stream
        if suffix in SEMANTIC_SUFFIXES or (not suffix and not self._dual
                                            and variant == "invariant"):
            self.state.vision_semantic = z
        if suffix == "equivariant" or (not suffix and (self._dual or variant == "equivariant")):
            self.state.vision_equivariant = z
        if suffix:
            return []
        st, seq = self.state, msg["seq"]
        last = self._last_latent_seq
        if last is not None and seq > last + 1:
            self.stats.gaps += seq - last - 1
        elif last is not None and seq <= last:
            self.stats.restarts += 1
            # a new stream: what an old frame left waiting is not this stream's
            self._pending = {b: v for b, v in self._pending.items() if v[0]["seq"] <= seq}
            if seq < last and st.semantic_seq != seq:  # a new stream: old semantic numbers
                st.vision_semantic_surprise = st.vision_semantic_surprise_z = None
                st.vision_semantic_mrr = st.semantic_seq = None
        if st.vision_core_latent is not None and st.vision_core_latent.shape != z.shape:
            st.vision_core_latent = None  # a different model: the old latent is not comparable
        self._last_latent_seq = seq
        fired: list[Hook] = []
        for base, (held, t_held) in list(self._pending.items()):
            if held["seq"] <= seq:  # this frame's (or an older one's whose latent was lost)
                del self._pending[base]
                fired += self._apply_metric(base, held, t_held)
        patches = msg.get("patches")
        st.update_latent(z, seq=seq, t_capture_ns=msg["t_capture_ns"],
                         t_publish_ns=msg["t_publish_ns"], patches=patches,
                         variant=variant, t_received_ns=t_ns)
        return [h for h in self.hooks.values() if h.kind == "latent"] + fired

    def _metric(self, base: str, msg: dict[str, Any], t_ns: int) -> list[Hook]:
        """A plain surprise or MRR: checked now, applied with its frame's latent (at once
        when that latent is already in: a worker that publishes the latent first)."""
        self._check_metric(base, msg)
        if msg["seq"] == self.state.frame_seq:
            return self._apply_metric(base, msg, t_ns)
        self._pending[base] = (msg, t_ns)
        return []

    def _apply_metric(self, base: str, msg: dict[str, Any], t_ns: int) -> list[Hook]:
        return (self._surprise if base == topics.SURPRISE else self._mrr)(msg, t_ns)

    @staticmethod
    def _check_metric(base: str, msg: dict[str, Any]) -> None:
        if base == topics.SURPRISE:
            for name in ("surprise", "surprise_z"):
                v = msg.get(name)
                if v is not None and not np.isfinite(v):
                    raise ValueError(f"{name} is {v}")
        else:
            for name in ("rr", "mrr"):
                v = msg[name]
                if v is not None and not 0.0 <= v <= 1.0:
                    raise ValueError(f"{name} must be in [0, 1], got {v}")

    def _surprise(self, msg: dict[str, Any], t_ns: int) -> list[Hook]:
        value, z = msg["surprise"], msg.get("surprise_z")
        st = self.state
        st.vision_prediction_surprise = value
        st.vision_surprise_z = z
        st.surprise_seq = msg["seq"]
        st.t_surprise_received_ns = t_ns
        if value is None:
            return []
        return [h for h in self.hooks.values() if h.kind == "surprise" and value > h.threshold]

    def _semantic(self, base: str, msg: dict[str, Any]) -> list[Hook]:
        """A dual worker's semantic stream: its surprise (for escalation) and MRR (it comes
        before the plain stream's messages of the same frame, or from another worker)."""
        self._check_metric(base, msg)
        st = self.state
        if base == topics.SURPRISE:
            st.vision_semantic_surprise = msg["surprise"]
            st.vision_semantic_surprise_z = msg.get("surprise_z")
            st.semantic_seq = msg["seq"]
        elif msg["mrr"] is not None:
            st.vision_semantic_mrr = msg["mrr"]
        return []

    def _mrr(self, msg: dict[str, Any], t_ns: int) -> list[Hook]:
        rr, mean = msg["rr"], msg["mrr"]
        st = self.state
        st.vision_rr = rr
        if mean is not None:  # a running mean stays valid across a frame without prediction
            st.vision_mrr = mean
        st.mrr_seq, st.mrr_k, st.t_mrr_received_ns = msg["seq"], msg["k"], t_ns
        if mean is None:
            return []
        return [h for h in self.hooks.values() if h.kind == "low_mrr" and mean < h.threshold]

    def _log_bad(self, text: str) -> None:
        self._bad_logged += 1
        if worth_logging(self._bad_logged):
            logger.warning("VisionBridge: {} (#{})", text, self._bad_logged)

    def stale_error(self, where: str, max_age_ms: float | None, started_ns: int | None,
                    now_ns: int) -> StaleDataError | None:
        """The StaleDataError that read_latest should raise now, or None when data is fresh."""
        st = self.state
        if st.t_received_ns is None:
            since = "" if started_ns is None else f" in {(now_ns - started_ns) / 1e9:.1f} s"
            return StaleDataError(
                f"{where}: no vision data yet (received {self.stats.received} messages{since}); "
                "is the worker running and is a frame source feeding it?")
        age = st.age_ms(now_ns)
        if max_age_ms is not None and age > max_age_ms:
            return StaleDataError(
                f"{where}: vision data is {age:.0f} ms old (max_age_ms={max_age_ms:g}); last "
                f"frame seq {st.frame_seq}; the worker or the frame source may be stopped "
                "or stalled")
        return None


def check_max_age(max_age_ms: float | None) -> None:
    if max_age_ms is not None and (isinstance(max_age_ms, bool) or
                                   not isinstance(max_age_ms, (int, float)) or max_age_ms < 0):
        raise ValueError(f"max_age_ms must be a number >= 0 or None, got {max_age_ms!r}")
