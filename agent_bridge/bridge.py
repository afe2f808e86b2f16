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

``agent_bridge.async_bridge.AsyncVisionBridge`` does the same on ``zmq.asyncio`` (``async
with``, ``await read_latest``, ``async for state in bridge.updates()``); both apply messages
through one ``agent_bridge.tracker.Tracker``.

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
(``callback_errors``) and never stops the bridge. A newer worker's messages are read without
the fields this bridge does not know and its new kinds skipped (``unknown_fields``,
``unknown_kinds``); a worker of another major wire version is refused (``other_major``, one
log line naming both versions; docs/wire.md).

Actions. ``publish_action`` binds the agent's PUB socket (``Endpoints.agent``) on first use,
or call ``open_actions()`` early: subscribers (the worker) connect to it within tens of ms,
and ZeroMQ drops what a PUB sends before they are connected.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from loguru import logger

from agent_bridge.state import BeingState
from agent_bridge.tracker import BridgeStats, Callback, Hook, Tracker, check_max_age
from iwm_bus.actions import check_action_id, check_vector
from iwm_bus.bus import topics
from iwm_bus.bus.ring import clock_ns
from iwm_bus.bus.rundir import RunDir
from iwm_bus.bus.transport import DEFAULT_HWM, Endpoints, Publisher, sub_socket
from iwm_bus.errors import IWMError, StaleDataError
from iwm_bus.logs import worth_logging

__all__ = ["MAX_ACTION_VECTOR", "Target", "VisionBridge", "build_action", "resolve_endpoints"]

Target = str | os.PathLike[str] | Endpoints
#: longest action vector publish_action accepts when the model's cond_dim is not given
MAX_ACTION_VECTOR = 256


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
        msg["vector"] = check_vector(vector, max_vector)
    if action_id is not None:
        msg["action_id"] = check_action_id(action_id)
    if frame_seq is not None:
        if isinstance(frame_seq, bool) or not isinstance(frame_seq, (int, np.integer)) \
                or frame_seq < 0:
            raise ValueError(f"frame_seq must be an int >= 0, got {frame_seq!r}")
        msg["frame_seq"] = int(frame_seq)
    if source is not None and not isinstance(source, str):
        raise ValueError(f"source must be a str, got {type(source).__name__}")
    return msg

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
        self._tracker = Tracker()
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

    def _call(self, hook: Hook, snap: BeingState) -> None:
        try:
            hook.callback(snap)
        except Exception as e:  # noqa: BLE001 - a hook must never kill the bridge
            with self._cond:
                self._tracker.stats.callback_errors += 1
                n = self._tracker.stats.callback_errors
            if worth_logging(n):
                logger.opt(exception=e).error("{}: {} hook #{} raised (error #{})", self,
                                              hook.kind, hook.id, n)
        finally:
            with self._cond:
                self._tracker.stats.callbacks += 1

    # ------------------------------------------------------------------ reading

    def read_latest(self, max_age_ms: float | None = None) -> BeingState:
        """A consistent copy of the newest state, or ``StaleDataError`` (no data / too old)."""
        check_max_age(max_age_ms)
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
        ``iwm_bus.bus.wire.make_decision``); never blocks: False when it could not be sent.
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
