"""``AsyncVisionBridge``: ``VisionBridge`` on ``zmq.asyncio`` (a reader task, no thread).

    async with AsyncVisionBridge("/tmp/iwm-1000") as bridge:
        state = await bridge.wait_update(timeout_s=5)
        async for state in bridge.updates():
            ...

Same state, hooks, counters and actions as :class:`agent_bridge.bridge.VisionBridge` (one
:class:`agent_bridge.tracker.Tracker`); hooks run on the event loop (a coroutine hook is
scheduled as a task).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator
from typing import Any

import zmq
import zmq.asyncio
from loguru import logger

from agent_bridge.bridge import MAX_ACTION_VECTOR, Target, build_action, resolve_endpoints
from agent_bridge.state import BeingState
from agent_bridge.tracker import BridgeStats, Callback, Hook, Tracker, check_max_age
from iwm_bus.bus import topics, wire
from iwm_bus.bus.transport import DEFAULT_HWM, pub_socket, sub_socket, unbind_file
from iwm_bus.errors import StaleDataError
from iwm_bus.logs import worth_logging

__all__ = ["AsyncVisionBridge"]


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
        self._tracker = Tracker()
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

    def _call(self, hook: Hook, snap: BeingState) -> None:
        self._tracker.stats.callbacks += 1
        try:
            out = hook.callback(snap)
            if inspect.isawaitable(out):
                task = asyncio.ensure_future(out)
                self._hook_tasks.add(task)
                task.add_done_callback(lambda t, h=hook: self._hook_done(t, h))
        except Exception as e:  # noqa: BLE001 - a hook must never kill the bridge
            self._hook_failed(hook, e)

    def _hook_done(self, task: asyncio.Future[Any], hook: Hook) -> None:
        self._hook_tasks.discard(task)  # type: ignore[arg-type]
        if not task.cancelled() and task.exception() is not None:
            self._hook_failed(hook, task.exception())

    def _hook_failed(self, hook: Hook, e: BaseException) -> None:
        self._tracker.stats.callback_errors += 1
        n = self._tracker.stats.callback_errors
        if worth_logging(n):
            logger.opt(exception=e).error("{}: {} hook #{} raised (error #{})", self, hook.kind,
                                          hook.id, n)

    def _where(self) -> str:
        return f"{self} (reader died: {self._error})" if self._error else repr(self)

    async def read_latest(self, max_age_ms: float | None = None) -> BeingState:
        """A copy of the newest state, or ``StaleDataError`` (no data / too old)."""
        check_max_age(max_age_ms)
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
