"""``VisionBridge``: keeps a ``BeingState`` current from the sidecar's bus, in the background.

Give it the run directory (or ``tcp://HOST:PORT``); it connects one SUB socket to the worker's
PUB endpoint (``iwm.latent``, ``iwm.surprise``, ``iwm.mrr``, ``iwm.stats``) on its own thread and
keeps the newest state under a lock. The agent reads a consistent copy whenever it likes and
says how old is too old; hooks fire on the bridge thread as messages arrive::

    from agent_bridge import VisionBridge
    with VisionBridge("/tmp/iwm-1000") as bridge:
        bridge.on_surprise(1.0, lambda s: print("surprised at frame", s.frame_seq))
        state = bridge.wait_update(timeout_s=5)       # first latent (or StaleDataError)
        state = bridge.read_latest(max_age_ms=200)    # or StaleDataError
        bridge.publish_action(action_id=3, frame_seq=state.frame_seq)

``AsyncVisionBridge`` does the same on ``zmq.asyncio`` (``async with``, ``await read_latest``,
``async for state in bridge.updates()``).

Which message feeds which field: the plain topics (``iwm.latent``, ``iwm.surprise``,
``iwm.mrr``) feed the ``vision_core_*`` fields, surprise and MRR; a latent on
``iwm.latent.invariant`` / ``.semantic`` (or a plain latent whose variant is ``invariant``)
also feeds ``vision_semantic``, and ``.equivariant`` (or a plain latent whose variant is
``equivariant``, as a dual worker publishes its control stream) feeds
``vision_equivariant``; ``iwm.surprise.semantic`` / ``iwm.mrr.semantic`` feed
``vision_semantic_surprise`` (``_z``) and ``vision_semantic_mrr``.
Malformed or unexpected messages are counted (``decode_errors``, ``unexpected``) and
skipped; missing latent seqs are counted in ``gaps`` (frames the worker skipped in realtime
mode, or messages the bus dropped); a hook that raises is logged and counted
(``callback_errors``) and never stops the bridge.

Actions. ``publish_action`` binds the agent's PUB socket (``Endpoints.agent``) on first use,
or call ``open_actions()`` early: subscribers (the worker) connect to it within tens of ms,
and ZeroMQ drops what a PUB sends before they are connected.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.asyncio
from loguru import logger

from agent_bridge.state import BeingState
from iwm_bus import topics, wire
from iwm_bus.errors import IWMError, StaleDataError, WireError
from iwm_bus.ring import clock_ns
from iwm_bus.rundir import RunDir
from iwm_bus.transport import DEFAULT_HWM, Endpoints, Publisher, pub_socket, sub_socket, unbind_file

__all__ = ["AsyncVisionBridge", "BridgeStats", "VisionBridge", "build_action",
           "resolve_endpoints"]

Target = str | os.PathLike[str] | Endpoints
Callback = Callable[[BeingState], Any]
#: longest action vector publish_action accepts when the model's cond_dim is not given
MAX_ACTION_VECTOR = 256
_SEMANTIC_SUFFIXES = ("invariant", "semantic")


def resolve_endpoints(target: Target) -> Endpoints:
    """Endpoints of a sidecar from an ``Endpoints``, a ``tcp://HOST:PORT`` spec or a run dir.

    For a run dir, the manifest's ``endpoints`` map (when ``sidecar.json`` has one) wins over
    the default ipc socket paths inside the folder.
    """
    if isinstance(target, Endpoints):
        return target
    text = os.fspath(target)
    if text.startswith("tcp://"):
        return Endpoints.parse(text)
    if text.startswith(("ipc://", "inproc://")):
        raise ValueError(f"{text!r}: pass the run directory (or tcp://HOST:PORT), not one socket")
    path = Path(text)
    if not path.is_dir():
        raise FileNotFoundError(f"run dir {text!r} does not exist; start the sidecar "
                                f"(iwm-launch --run-dir {text}) or pass tcp://HOST:PORT")
    manifest = RunDir(path).read_manifest(missing_ok=True) or {}
    eps = manifest.get("endpoints")
    if isinstance(eps, Mapping) and all(isinstance(eps.get(k), str) for k in
                                        ("capture", "worker", "rpc", "agent")):
        return Endpoints(eps["capture"], eps["worker"], eps["rpc"], eps["agent"])
    return Endpoints.ipc(path)


def build_action(seq: int, vector: Any = None, action_id: int | None = None,
                 frame_seq: int | None = None, source: str | None = None,
                 max_vector: int = MAX_ACTION_VECTOR) -> dict[str, Any]:
    """Validate publish_action's arguments and build the ``agent.action`` message.

    Raises ``ValueError`` naming the bad argument.
    """
    if vector is None and action_id is None:
        raise ValueError("publish_action needs vector=... and/or action_id=...")
    msg: dict[str, Any] = {"seq": seq, "t_ns": clock_ns(), "frame_seq": None,
                           "vector": None, "action_id": None, "source": source}
    if vector is not None:
        try:
            vec = np.asarray(vector, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise ValueError(f"vector must be a sequence of numbers: {e}") from None
        if vec.ndim != 1 or not 1 <= vec.shape[0] <= max_vector:
            raise ValueError(f"vector must be 1-D with 1..{max_vector} values, got shape "
                             f"{vec.shape}")
        if not np.isfinite(vec).all():
            raise ValueError("vector holds NaN or inf")
        msg["vector"] = vec
    if action_id is not None:
        if isinstance(action_id, bool) or not isinstance(action_id, (int, np.integer)):
            raise ValueError(f"action_id must be an int, got {type(action_id).__name__}")
        if action_id < 0:
            raise ValueError(f"action_id must be >= 0, got {action_id}")
        msg["action_id"] = int(action_id)
    if frame_seq is not None:
        if isinstance(frame_seq, bool) or not isinstance(frame_seq, (int, np.integer)) \
                or frame_seq < 0:
            raise ValueError(f"frame_seq must be an int >= 0, got {frame_seq!r}")
        msg["frame_seq"] = int(frame_seq)
    if source is not None and not isinstance(source, str):
        raise ValueError(f"source must be a str, got {type(source).__name__}")
    return msg


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
class _Hook:
    id: int
    kind: str  # "surprise" | "low_mrr" | "latent"
    threshold: float | None
    callback: Callback


class _Tracker:
    """Applies decoded messages to a BeingState and says which hooks fire (no sockets, no locks)."""

    def __init__(self) -> None:
        self.state = BeingState()
        self.stats = BridgeStats()
        self.worker_stats: dict[str, dict[str, Any]] = {}
        self.hooks: dict[int, _Hook] = {}
        self._ids = itertools.count(1)
        self._last_latent_seq: int | None = None
        # a frame's surprise and MRR, held until its latent arrives: the worker publishes the
        # latent last, and the state then takes all three of one seq in one update
        self._pending: dict[str, tuple[dict[str, Any], int]] = {}
        self._dual = False  # seen a semantic stream (a dual worker)
        self._bad_logged = 0

    def add_hook(self, kind: str, threshold: float | None, callback: Callback) -> int:
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                    or not np.isfinite(threshold):
                raise ValueError(f"threshold must be a finite number, got {threshold!r}")
            threshold = float(threshold)
        hook = _Hook(next(self._ids), kind, threshold, callback)
        self.hooks[hook.id] = hook
        return hook.id

    def decode(self, frames: list[bytes]) -> tuple[str, dict[str, Any]] | None:
        try:
            return wire.unpack(frames)
        except WireError as e:
            self.stats.decode_errors += 1
            self._log_bad(f"dropped malformed message: {e}")
            return None

    def apply(self, topic: str, msg: dict[str, Any], t_ns: int) -> list[_Hook]:
        """Update the state from one message; return the hooks to run (in order)."""
        self.stats.received += 1
        base = topics.base_topic(topic)
        suffix = topic[len(base) + 1:]
        try:
            if base == topics.LATENT:
                return self._latent(msg, suffix, t_ns)
            if suffix in _SEMANTIC_SUFFIXES and base in (topics.SURPRISE, topics.MRR):
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

    def _latent(self, msg: dict[str, Any], suffix: str, t_ns: int) -> list[_Hook]:
        z = np.asarray(msg["z_cls"])
        if z.ndim == 2 and z.shape[0] == 1:
            z = z[0]
        if z.ndim != 1 or z.size == 0 or z.dtype.kind != "f":
            raise ValueError(f"z_cls must be a float (D,) array, got {z.dtype} {z.shape}")
        variant = msg["variant"]
        if suffix == "semantic":
            self._dual = True  # a dual worker: its plain latents are the equivariant stream
        if suffix in _SEMANTIC_SUFFIXES or (not suffix and not self._dual
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
        fired: list[_Hook] = []
        for base, (held, t_held) in list(self._pending.items()):
            if held["seq"] <= seq:  # this frame's (or an older one's whose latent was lost)
                del self._pending[base]
                fired += self._apply_metric(base, held, t_held)
        patches = msg.get("patches")
        st.update_latent(z, seq=seq, t_capture_ns=msg["t_capture_ns"],
                         t_publish_ns=msg["t_publish_ns"], patches=patches,
                         variant=variant, t_received_ns=t_ns)
        return [h for h in self.hooks.values() if h.kind == "latent"] + fired

    def _metric(self, base: str, msg: dict[str, Any], t_ns: int) -> list[_Hook]:
        """A plain surprise or MRR: checked now, applied with its frame's latent (at once
        when that latent is already in: a worker that publishes the latent first)."""
        self._check_metric(base, msg)
        if msg["seq"] == self.state.frame_seq:
            return self._apply_metric(base, msg, t_ns)
        self._pending[base] = (msg, t_ns)
        return []

    def _apply_metric(self, base: str, msg: dict[str, Any], t_ns: int) -> list[_Hook]:
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

    def _surprise(self, msg: dict[str, Any], t_ns: int) -> list[_Hook]:
        value, z = msg["surprise"], msg.get("surprise_z")
        st = self.state
        st.vision_prediction_surprise = value
        st.vision_surprise_z = z
        st.surprise_seq = msg["seq"]
        st.t_surprise_received_ns = t_ns
        if value is None:
            return []
        return [h for h in self.hooks.values() if h.kind == "surprise" and value > h.threshold]

    def _semantic(self, base: str, msg: dict[str, Any]) -> list[_Hook]:
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

    def _mrr(self, msg: dict[str, Any], t_ns: int) -> list[_Hook]:
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
        if self._bad_logged <= 10 or self._bad_logged % 1000 == 0:
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


def _check_max_age(max_age_ms: float | None) -> None:
    if max_age_ms is not None and (isinstance(max_age_ms, bool) or
                                   not isinstance(max_age_ms, (int, float)) or max_age_ms < 0):
        raise ValueError(f"max_age_ms must be a number >= 0 or None, got {max_age_ms!r}")


class VisionBridge:
    """A background SUB thread keeping a BeingState current (see the module docstring)."""

    def __init__(self, target: Target, *, source: str = "agent", cond_dim: int | None = None,
                 hwm: int = DEFAULT_HWM, poll_ms: int = 50) -> None:
        self.endpoints = resolve_endpoints(target)
        if not 1 <= poll_ms <= 1000:
            raise ValueError(f"poll_ms must be in 1..1000, got {poll_ms}")
        self.source = source
        self.max_vector = MAX_ACTION_VECTOR if cond_dim is None else int(cond_dim)
        self._hwm, self._poll_ms = hwm, poll_ms
        self._tracker = _Tracker()
        self._cond = threading.Condition(threading.Lock())
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None
        self._started_ns: int | None = None
        self._pub: Publisher | None = None
        self._pub_lock = threading.Lock()
        self._action_seq = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout_s: float = 2.0) -> VisionBridge:
        """Start the subscriber thread (idempotent); returns self."""
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stop.clear()
        self._ready.clear()
        self._thread_error = None
        self._started_ns = time.monotonic_ns()
        self._thread = threading.Thread(target=self._run, name="VisionBridge", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            self.stop()
            raise RuntimeError(f"{self}: subscriber thread did not start within {timeout_s} s")
        if self._thread_error is not None:
            raise IWMError(f"{self}: subscriber failed to start: {self._thread_error}") \
                from self._thread_error
        return self

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop the subscriber thread (bounded wait); the state stays readable."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
            if thread.is_alive():
                logger.error("{}: subscriber thread still running after {} s (a hook callback "
                             "blocking?); left as a daemon thread", self, timeout_s)
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        """Stop the thread and close the action socket."""
        self.stop()
        with self._pub_lock:
            if self._pub is not None:
                self._pub.close()  # and its ipc file
                self._pub = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> VisionBridge:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self._tracker.stats
        return (f"VisionBridge({self.endpoints.worker!r}, received={s.received}, "
                f"gaps={s.gaps}, decode_errors={s.decode_errors})")

    # ------------------------------------------------------------------ thread

    def _run(self) -> None:
        try:
            sock = sub_socket(zmq.Context.instance(), [self.endpoints.worker],
                              topics.WORKER_TOPICS, hwm=self._hwm, reconnect_max_ms=500)
        except Exception as e:  # noqa: BLE001 - reported to start()
            self._thread_error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(self._poll_ms, zmq.POLLIN):
                    continue
                for _ in range(256):  # drain what is queued, then check _stop again
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._handle(frames)
        except Exception as e:
            self._thread_error = e
            logger.exception("{}: subscriber thread died", self)
        finally:
            sock.close(linger=0)

    def _handle(self, frames: list[bytes]) -> None:
        t_ns = time.monotonic_ns()
        with self._cond:
            got = self._tracker.decode(frames)
            if got is None:
                return
            fired = self._tracker.apply(*got, t_ns)
            snap = self._tracker.state.copy() if fired else None
            self._cond.notify_all()
        for hook in fired:
            self._call(hook, snap)

    def _call(self, hook: _Hook, snap: BeingState) -> None:
        try:
            hook.callback(snap)
        except Exception as e:  # noqa: BLE001 - a hook must never kill the bridge
            with self._cond:
                self._tracker.stats.callback_errors += 1
                n = self._tracker.stats.callback_errors
            if n <= 10 or n % 1000 == 0:
                logger.opt(exception=e).error("{}: {} hook #{} raised (error #{})", self,
                                              hook.kind, hook.id, n)
        finally:
            with self._cond:
                self._tracker.stats.callbacks += 1

    # ------------------------------------------------------------------ reading

    def read_latest(self, max_age_ms: float | None = None) -> BeingState:
        """A consistent copy of the newest state, or ``StaleDataError`` (no data / too old)."""
        _check_max_age(max_age_ms)
        with self._cond:
            err = self._tracker.stale_error(self._where(), max_age_ms, self._started_ns,
                                            time.monotonic_ns())
            if err is None:
                return self._tracker.state.copy()
        raise err

    def wait_update(self, after_seq: int | None = None, timeout_s: float = 1.0) -> BeingState:
        """Block until a latent newer than ``after_seq`` (default: the current one) arrives.

        Returns a copy of the state; ``StaleDataError`` when none arrives within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            st = self._tracker.state
            base = st.updates
            while True:
                st = self._tracker.state
                newer = (st.updates > base if after_seq is None
                         else st.frame_seq is not None and st.frame_seq > after_seq)
                if newer:
                    return st.copy()
                left = deadline - time.monotonic()
                if left <= 0 or not self.running:
                    break
                self._cond.wait(min(left, 0.1))
        why = "" if self.running else " (bridge not running: call start())"
        raise StaleDataError(f"{self._where()}: no new latent within {timeout_s} s{why}; last "
                             f"frame seq {st.frame_seq}, {self._tracker.stats.received} "
                             "messages received")

    def _where(self) -> str:
        if self._thread_error is not None:
            return f"{self} (subscriber died: {self._thread_error})"
        return repr(self)

    @property
    def stats(self) -> BridgeStats:
        """A copy of the counters (received, gaps, decode_errors, ...)."""
        with self._cond:
            return BridgeStats(**vars(self._tracker.stats))

    def worker_stats(self) -> dict[str, dict[str, Any]]:
        """The newest ``iwm.stats`` values per source (e.g. fps, latency)."""
        with self._cond:
            return {k: dict(v) for k, v in self._tracker.worker_stats.items()}

    # ------------------------------------------------------------------ hooks

    def on_surprise(self, threshold: float, callback: Callback) -> int:
        """Call ``callback(state)`` on the bridge thread for every surprise > threshold."""
        with self._cond:
            return self._tracker.add_hook("surprise", threshold, callback)

    def on_low_mrr(self, threshold: float, callback: Callback) -> int:
        """Call ``callback(state)`` for every MRR message whose running mean < threshold."""
        with self._cond:
            return self._tracker.add_hook("low_mrr", threshold, callback)

    def on_latent(self, callback: Callback) -> int:
        """Call ``callback(state)`` for every new latent."""
        with self._cond:
            return self._tracker.add_hook("latent", None, callback)

    def remove_hook(self, hook_id: int) -> None:
        with self._cond:
            if self._tracker.hooks.pop(hook_id, None) is None:
                raise KeyError(f"no hook with id {hook_id}")

    # ------------------------------------------------------------------ actions

    def open_actions(self) -> None:
        """Bind the agent's PUB socket now (otherwise on the first publish_action)."""
        with self._pub_lock:
            if self._pub is None:
                self._pub = Publisher(self.endpoints.agent)

    def publish(self, topic: str, msg: Mapping[str, Any]) -> bool:
        """Publish another message of the agent's on its socket (e.g. ``agent.decision``,
        ``iwm_bus.wire.make_decision``); never blocks: False when it could not be sent.
        ``WireError`` when ``msg`` does not fit ``topic``'s schema."""
        with self._pub_lock:
            if self._pub is None:
                self._pub = Publisher(self.endpoints.agent)
            return self._pub.send(topic, msg)

    def publish_action(self, vector: Any = None, action_id: int | None = None,
                       frame_seq: int | None = None) -> int:
        """Publish ``agent.action`` (vector and/or discrete id); returns the action's seq.

        Never blocks. Bad arguments raise ``ValueError`` naming the argument.
        """
        with self._pub_lock:
            msg = build_action(self._action_seq, vector, action_id, frame_seq, self.source,
                               self.max_vector)
            if self._pub is None:
                self._pub = Publisher(self.endpoints.agent)
            ok = self._pub.send(topics.ACTION, msg)
            self._action_seq += 1
        with self._cond:
            if ok:
                self._tracker.stats.actions_sent += 1
            else:
                self._tracker.stats.actions_dropped += 1
        return msg["seq"]


class AsyncVisionBridge:
    """``VisionBridge`` on ``zmq.asyncio``: a reader task instead of a thread.

    Hooks may be plain functions (called inline) or coroutine functions (run as tasks).
    """

    def __init__(self, target: Target, *, source: str = "agent", cond_dim: int | None = None,
                 hwm: int = DEFAULT_HWM) -> None:
        self.endpoints = resolve_endpoints(target)
        self.source = source
        self.max_vector = MAX_ACTION_VECTOR if cond_dim is None else int(cond_dim)
        self._hwm = hwm
        self._tracker = _Tracker()
        self._task: asyncio.Task[None] | None = None
        self._cond: asyncio.Condition | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._pub: zmq.asyncio.Socket | None = None
        self._pub_inode: int | None = None  # the agent endpoint's ipc file, when bound
        self._hook_tasks: set[asyncio.Task[Any]] = set()
        self._started_ns: int | None = None
        self._error: BaseException | None = None
        self._action_seq = 0

    async def start(self) -> AsyncVisionBridge:
        if self._task is not None and not self._task.done():
            return self
        self._cond = asyncio.Condition()
        self._sock = sub_socket(zmq.asyncio.Context.instance(), [self.endpoints.worker],
                                topics.WORKER_TOPICS, hwm=self._hwm, reconnect_max_ms=500)
        self._started_ns = time.monotonic_ns()
        self._error = None
        self._task = asyncio.create_task(self._run(), name="AsyncVisionBridge")
        return self

    async def close(self, timeout_s: float = 2.0) -> None:
        tasks = [t for t in [self._task, *self._hook_tasks] if t is not None and not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=timeout_s)
            if pending:
                logger.error("{}: {} tasks did not stop within {} s", self, len(pending),
                             timeout_s)
        if self._sock is not None:
            self._sock.close(linger=0)
        if self._pub is not None:
            self._pub.close(linger=0)
            unbind_file(self.endpoints.agent, self._pub_inode)
        self._sock = self._pub = None

    async def __aenter__(self) -> AsyncVisionBridge:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def __repr__(self) -> str:
        s = self._tracker.stats
        return (f"AsyncVisionBridge({self.endpoints.worker!r}, received={s.received}, "
                f"gaps={s.gaps}, decode_errors={s.decode_errors})")

    async def _run(self) -> None:
        assert self._sock is not None and self._cond is not None
        try:
            while True:
                frames = await self._sock.recv_multipart()
                t_ns = time.monotonic_ns()
                got = self._tracker.decode(frames)
                if got is None:
                    continue
                fired = self._tracker.apply(*got, t_ns)
                async with self._cond:
                    self._cond.notify_all()
                if fired:
                    snap = self._tracker.state.copy()
                    for hook in fired:
                        self._call(hook, snap)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._error = e
            logger.exception("{}: reader task died", self)

    def _call(self, hook: _Hook, snap: BeingState) -> None:
        self._tracker.stats.callbacks += 1
        try:
            out = hook.callback(snap)
            if inspect.isawaitable(out):
                task = asyncio.ensure_future(out)
                self._hook_tasks.add(task)
                task.add_done_callback(lambda t, h=hook: self._hook_done(t, h))
        except Exception as e:  # noqa: BLE001 - a hook must never kill the bridge
            self._hook_failed(hook, e)

    def _hook_done(self, task: asyncio.Future[Any], hook: _Hook) -> None:
        self._hook_tasks.discard(task)  # type: ignore[arg-type]
        if not task.cancelled() and task.exception() is not None:
            self._hook_failed(hook, task.exception())

    def _hook_failed(self, hook: _Hook, e: BaseException) -> None:
        self._tracker.stats.callback_errors += 1
        n = self._tracker.stats.callback_errors
        if n <= 10 or n % 1000 == 0:
            logger.opt(exception=e).error("{}: {} hook #{} raised (error #{})", self, hook.kind,
                                          hook.id, n)

    def _where(self) -> str:
        return f"{self} (reader died: {self._error})" if self._error else repr(self)

    async def read_latest(self, max_age_ms: float | None = None) -> BeingState:
        """A copy of the newest state, or ``StaleDataError`` (no data / too old)."""
        _check_max_age(max_age_ms)
        err = self._tracker.stale_error(self._where(), max_age_ms, self._started_ns,
                                        time.monotonic_ns())
        if err is not None:
            raise err
        return self._tracker.state.copy()

    async def wait_update(self, after_seq: int | None = None,
                          timeout_s: float = 1.0) -> BeingState:
        """Wait for a latent newer than ``after_seq`` (default: the current one); bounded."""
        if self._cond is None:
            raise RuntimeError(f"{self}: not started; use 'async with' or await start()")
        base = self._tracker.state.updates

        def newer() -> bool:
            st = self._tracker.state
            if after_seq is None:
                return st.updates > base
            return st.frame_seq is not None and st.frame_seq > after_seq

        try:
            async with self._cond:
                await asyncio.wait_for(self._cond.wait_for(newer), timeout_s)
        except asyncio.TimeoutError:
            st = self._tracker.state
            raise StaleDataError(f"{self._where()}: no new latent within {timeout_s} s; last "
                                 f"frame seq {st.frame_seq}") from None
        return self._tracker.state.copy()

    async def updates(self, timeout_s: float = 5.0) -> AsyncIterator[BeingState]:
        """Yield the state after each new latent (the newest; a slow consumer skips some).

        Raises ``StaleDataError`` when no latent arrives within ``timeout_s``.
        """
        seq: int | None = self._tracker.state.frame_seq
        while True:
            st = await self.wait_update(after_seq=seq if seq is not None else -1,
                                        timeout_s=timeout_s)
            seq = st.frame_seq
            yield st

    @property
    def stats(self) -> BridgeStats:
        return BridgeStats(**vars(self._tracker.stats))

    def worker_stats(self) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in self._tracker.worker_stats.items()}

    def on_surprise(self, threshold: float, callback: Callback) -> int:
        return self._tracker.add_hook("surprise", threshold, callback)

    def on_low_mrr(self, threshold: float, callback: Callback) -> int:
        return self._tracker.add_hook("low_mrr", threshold, callback)

    def on_latent(self, callback: Callback) -> int:
        return self._tracker.add_hook("latent", None, callback)

    def remove_hook(self, hook_id: int) -> None:
        if self._tracker.hooks.pop(hook_id, None) is None:
            raise KeyError(f"no hook with id {hook_id}")

    def open_actions(self) -> None:
        """Bind the agent's PUB socket now (otherwise on the first publish_action)."""
        if self._pub is None:
            self._pub, self._pub_inode = pub_socket(zmq.asyncio.Context.instance(),
                                                    self.endpoints.agent, hwm=self._hwm)

    async def publish_action(self, vector: Any = None, action_id: int | None = None,
                             frame_seq: int | None = None) -> int:
        """Publish ``agent.action``; returns its seq (see ``VisionBridge.publish_action``)."""
        msg = build_action(self._action_seq, vector, action_id, frame_seq, self.source,
                           self.max_vector)
        self.open_actions()
        assert self._pub is not None
        frames = wire.pack(topics.ACTION, msg)
        self._action_seq += 1
        try:
            await self._pub.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            self._tracker.stats.actions_dropped += 1
        else:
            self._tracker.stats.actions_sent += 1
        return msg["seq"]
