"""The capture process: frames from a source into the shared-memory FrameRing, one
``iwm.frame`` notice per frame on the bus.

``launch.py`` starts it as a spawned process (``iwm-launch --source SPEC``)::

    proc = ctx.Process(target=exit_with, args=("workers.capture:run_capture",
                                               CaptureConfig(source="gym:ALE/Pong-v5"),
                                               Endpoints.ipc(run_dir), "iwm_ring_x"))

It creates the ring (sized to the source's first frame; it alone owns and unlinks it), binds
PUB ``endpoints.capture`` and connects a SUB to ``endpoints.agent`` for ``agent.action``:
the latest action drives the source (gym envs, the synthetic square). Per frame: step the
source → ``ring.write`` (never waits for readers) → for a replay source, re-publish the
recorded action on ``agent.action`` → publish the notice ``{seq, slot, t_capture_ns,
height, width, channels, action, source, ring_id}`` (``action``: the source's, else the
agent's latest: the one way an action reaches the worker) → pace. ``iwm.stats`` (source
``capture``) goes
out once a second.

Pacing: ``fps`` caps the frame rate (0 = no cap); frames that carry a recorded time (replay,
video) follow it at ``rate`` x real time instead (``rate`` 0 = no recorded pacing, the fps
cap applies). ``mode="lossless"`` adds a credit window on the worker's published seq (every
``iwm.surprise`` carries the seq it processed): capture waits for the worker's
``iwm.ready`` before writing (and sends the notices still in the ring again to a worker
that took over or has seen none), never has more than ``slots - 1`` unprocessed frames in
the ring, and
at the end waits up to ``drain_timeout_s`` for the last frame to be processed.

Exit codes (``run_capture`` returns them, ``workers.entry.exit_with`` exits with them): 0 after the end
of the source / ``frames`` / ``duration`` or on SIGTERM/SIGINT; 2 when nothing could start
(bad spec, frame larger than the ring, ring name taken, endpoint in use); 1 on a failure while
running. Timestamps are ``iwm_bus.bus.ring.clock_ns`` (the wall clock), as the ring uses.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq
from loguru import logger

from iwm_bus.bus import topics
from iwm_bus.bus.ring import FrameRing, clock_ns
from iwm_bus.bus.transport import Endpoints, Publisher, Subscriber
from iwm_bus.bus.wire import make_action
from iwm_bus.config import MODES, RingConfig, check, fail, flag
from iwm_bus.errors import RingError, WireError
from iwm_bus.logs import worth_logging
from workers.entry import StopFlag, stop_on_signals
from workers.sources import Source, SourceError, SourceFrame, check_spec, open_source

__all__ = ["CaptureConfig", "run_capture", "write_frame"]

#: exit codes
EXIT_OK, EXIT_FAILED, EXIT_NOT_STARTED = 0, 1, 2
STATS_INTERVAL_S = 1.0
WAIT_LOG_INTERVAL_S = 5.0
#: most agent.action messages drained per frame (a flood cannot stall capture)
MAX_ACTIONS_PER_FRAME = 1000
#: recorded pacing re-anchors when it falls further behind than this (no catch-up burst)
MAX_LAG_S = 1.0
#: lossless: a worker reporting no notice this long after capture stopped sending them (credit
#: wait) is a fresh one that needs the oldest unprocessed notice again
FRESH_GRACE_NS = 300_000_000
#: lossless: after binding, wait at least this long before the first frame (slow joiners)
SUBSCRIBER_SETTLE_S = 0.3
#: at shutdown the PUB socket gets this long to deliver queued notices
FLUSH_LINGER_MS = 500


def write_frame(ring: FrameRing, pub: Publisher, pixels: np.ndarray,
                action: dict[str, Any] | None, source: str,
                env: int | None = None) -> dict[str, Any]:
    """The capture's step for one frame: into the ring, then its ``iwm.frame`` notice on
    ``pub``; returns the notice (``notice["seq"]`` is the frame's seq). ``env``: the
    capture stream of a multi-stream worker (``--envs``), on the notice."""
    t_capture = clock_ns()
    height, width, channels = pixels.shape
    seq = ring.write(pixels, t_capture_ns=t_capture)
    notice = {"seq": seq, "slot": ring.slot_of(seq), "t_capture_ns": t_capture,
              "ring_id": ring.ring_id,
              "height": height, "width": width, "channels": channels, "action": action,
              "source": source, **({"env": env} if env is not None else {})}
    pub.send(topics.FRAME, notice)
    return notice


@dataclass
class CaptureConfig:
    # source spec (workers.sources.SPEC_FORMS), e.g. synthetic:64x64, gym:ALE/Pong-v5
    # (iwm-launch --source, which has its own default)
    source: str = "synthetic"
    # frame-rate cap in frames per second; 0 = as fast as possible
    fps: float = field(default=30.0, metadata=flag("--fps", "capture rate cap (0 = no cap)"))
    # realtime: never wait for the worker; lossless: credit window (slots-1) on its seq.
    # iwm-launch sets it from its one --mode (launch_config.SidecarConfig.mode)
    mode: str = "realtime"
    # stop after this many frames (None = until the source ends or a signal)
    frames: int | None = field(default=None, metadata=flag("--frames", "stop after N frames"))
    # stop after this many seconds (None = no limit)
    duration: float | None = field(default=None, metadata=flag(
        "--duration", "stop after S seconds"))
    # recorded pacing (replay/video) by recorded timestamps: 1 = real time, 2 = 2x; 0 = off
    rate: float = field(default=1.0, metadata=flag(
        "--rate", "replay speed: 1 = real time, 2 = twice as fast, 0 = as fast as the worker "
                  "allows"))
    # replay/video/folder: start over at the end
    loop: bool = field(default=False, metadata=flag("--loop", "replay/video/folder: loop"))
    # seed of the source's default policy / synthetic scene / gym env
    seed: int = field(default=0, metadata=flag("--seed"))
    # ring geometry: slot count and the largest frame accepted
    ring: RingConfig = field(default_factory=RingConfig)
    # lossless: at the end, wait this long for the worker to process the last frame
    drain_timeout_s: float = 60.0
    # extra source options, e.g. {"max_episode_steps": 500} (gym), {"speed": 2} (synthetic)
    options: dict[str, Any] = field(default_factory=dict)
    # this capture's stream of a multi-stream worker (iwm-launch --envs N: 0..N-1), on its
    # notices; its credits are that stream's surprise only. None: the worker's one stream
    env: int | None = None

    def __post_init__(self) -> None:
        check(self, "source", str)
        try:
            check_spec(self.source)
        except ValueError as e:
            fail(self, "source", str(e))
        check(self, "fps", float, 0.0, 10_000.0)
        check(self, "mode", str, choices=MODES)
        check(self, "frames", int, 1, optional=True)
        check(self, "duration", float, 1e-3, 1e9, optional=True)
        check(self, "rate", float, 0.0, 1000.0)
        check(self, "loop", bool)
        check(self, "seed", int, 0)
        if isinstance(self.ring, Mapping):
            self.ring = RingConfig(**self.ring)
        check(self, "ring", RingConfig)
        check(self, "drain_timeout_s", float, 0.0, 1e6)
        check(self, "env", int, 0, 1023, optional=True)
        if not isinstance(self.options, Mapping) or not all(
                isinstance(k, str) for k in self.options):
            fail(self, "options", "must be a dict with str keys")
        self.options = dict(self.options)
        if {"seed", "loop"} & set(self.options):
            fail(self, "options", "seed and loop are CaptureConfig fields")


# ---------------------------------------------------------------- entry points


def run_capture(cfg: CaptureConfig, endpoints: Endpoints, ring_name: str) -> int:
    """Run the capture until its end, a limit or SIGTERM/SIGINT; return the exit code.

    Spawn-safe (top level, picklable arguments). The ring is unlinked on every path.
    """
    stop = StopFlag()
    with stop_on_signals(stop, "capture"):
        try:
            source = open_source(cfg.source, seed=cfg.seed, loop=cfg.loop, **cfg.options)
        except (ValueError, SourceError) as e:
            logger.error("capture: cannot open source: {}", e)
            return EXIT_NOT_STARTED
        try:
            return _run_source(cfg, endpoints, ring_name, source, stop)
        except Exception as e:  # reported as the exit code, with the traceback in the log
            logger.opt(exception=e).error("capture: {} failed: {}: {}", cfg.source,
                                          type(e).__name__, e)
            return EXIT_FAILED
        finally:
            source.close()


def _run_source(cfg: CaptureConfig, endpoints: Endpoints, ring_name: str, source: Source,
                stop: StopFlag) -> int:
    first = source.reset()
    problem = _fit_problem(first.pixels, cfg.ring, cfg.source)
    if problem:
        logger.error("capture: {}", problem)
        return EXIT_NOT_STARTED
    height, width, channels = first.pixels.shape
    try:
        ring = FrameRing.create(ring_name, cfg.ring.slots, height, width, channels)
    except (RingError, ValueError) as e:
        logger.error("capture: cannot create the ring: {}", e)
        return EXIT_NOT_STARTED
    try:
        try:
            loop = _CaptureLoop(cfg, endpoints, ring, source, stop)
        except OSError as e:  # bind failed: another sidecar on these endpoints
            logger.error("capture: {}", e)
            return EXIT_NOT_STARTED
        with loop:
            return loop.run(first)
    finally:
        ring.unlink()
        ring.close()


def _fit_problem(pixels: np.ndarray, ring: RingConfig, spec: str) -> str | None:
    height, width, channels = pixels.shape
    if channels != ring.channels:
        return (f"{spec} gives {channels}-channel frames but the ring is configured for "
                f"{ring.channels} channels")
    if height > ring.max_height or width > ring.max_width:
        return (f"{spec} gives {height}x{width} frames (height x width), larger than the ring "
                f"maximum {ring.max_height}x{ring.max_width}; raise RingConfig.max_height / "
                "max_width or use a smaller source")
    return None


# ---------------------------------------------------------------- the loop


class _CaptureLoop:
    """Sockets, counters and the per-frame loop of one capture run (the ring is the caller's)."""

    def __init__(self, cfg: CaptureConfig, endpoints: Endpoints, ring: FrameRing,
                 source: Source, stop: StopFlag) -> None:
        self.cfg, self.endpoints, self.ring, self.source, self.stop = (
            cfg, endpoints, ring, source, stop)
        self.lossless = cfg.mode == "lossless"
        self.period = 1.0 / cfg.fps if cfg.fps > 0 else 0.0
        self._ctx = zmq.Context()
        with ExitStack() as stack:
            stack.callback(self._ctx.destroy, linger=0)
            self.pub = Publisher(endpoints.capture, ctx=self._ctx)
            self._bound_at = time.monotonic()
            self.agent = Subscriber([endpoints.agent], [topics.ACTION], ctx=self._ctx)
            self.worker = (Subscriber([endpoints.worker], [topics.SURPRISE, topics.READY],
                                      ctx=self._ctx) if self.lossless else None)
            stack.pop_all()
        self.seq = -1
        self.frames = 0
        # lossless: the notices of the frames still in the ring, to re-send to a fresh worker
        self._recent: dict[int, dict[str, Any]] = {}
        # per worker stream (None: the plain one), from iwm.ready: when it said it had seen
        # no notice, and the restart counts seen (a new one: a worker took over)
        self._fresh_worker_t: dict[str | None, int] = {}
        self._worker_restarts: dict[str | None, set[int]] = {}
        self._resent_t = 0  # when notices were last sent again
        self.resent_notices = 0
        self._blocked_t = 0  # when the current credit wait began (clock_ns)
        # latest agent action map and its t_ns (None until an agent speaks)
        self.action: dict[str, Any] | None = None
        self.action_t_ns: int | None = None
        self.actions_received = 0
        self.bad_action_msgs = 0
        self.replayed_actions = 0
        # lossless: highest seq processed, per worker variant; whether the worker spoke
        self.processed: dict[str, int] = {}
        self.worker_seen = False
        self.credit_wait_s = 0.0
        self._due: float | None = None  # fps pacing: when the next frame is due
        self._anchor: tuple[float, int] | None = None  # recorded pacing: (wall, recorded ns)
        self._stats_due = time.monotonic() + STATS_INTERVAL_S
        self._stats_window = (time.monotonic(), 0)

    def close(self) -> None:
        # the last notices and stats may still be queued: flush them for a bounded time
        self.pub.close(linger_ms=FLUSH_LINGER_MS)
        for sub in (self.agent, self.worker):
            if sub is not None:
                sub.close()
        self._ctx.term()

    def __enter__(self) -> _CaptureLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, first: SourceFrame) -> int:
        logger.info("capture: {} {}x{} → ring {!r} ({} slots), {} mode, fps cap {}",
                    self.cfg.source, first.pixels.shape[1], first.pixels.shape[0],
                    self.ring.name, self.ring.slots, self.cfg.mode, self.cfg.fps or "none")
        if self.lossless and not self._wait_for_worker():
            return self._finish("stopped while waiting for the worker")
        started = time.monotonic()
        frame: SourceFrame | None = first
        why = "end of source"
        while frame is not None and not self.stop:
            self._emit(frame)
            self._maybe_stats()
            limit = self._limit_reached(started)
            if limit:
                why = limit
                break
            if self.lossless and not self._wait_credit():
                break
            if not self._recorded(frame):
                self._wait_fps()
            self._drain_actions()
            frame = self.source.step(self.action)
            if frame is not None and self._recorded(frame):
                self._wait_recorded(frame)
        if self.stop:
            return self._finish(f"signal {self.stop.signum}")
        if self.lossless:
            self._drain_worker()
        return self._finish(why)

    def _finish(self, why: str) -> int:
        self._publish_stats()
        logger.info("capture: stopped ({}) after {} frames, last seq {}", why, self.frames,
                    self.seq)
        return EXIT_OK

    def _limit_reached(self, started: float) -> str | None:
        cfg = self.cfg
        if cfg.frames is not None and self.frames >= cfg.frames:
            return f"{cfg.frames} frames"
        if cfg.duration is not None and time.monotonic() - started >= cfg.duration:
            return f"{cfg.duration} s"
        return None

    # ------------------------------------------------------------ per frame

    def _emit(self, frame: SourceFrame) -> None:
        """Write the frame into the ring, then tell the bus (replayed action first).

        The notice carries the action in force at capture time, the one way an action
        reaches the worker: the source's when it knows what produced the frame (gym,
        synthetic, replay), else the agent's latest ``agent.action``."""
        action = frame.action if frame.action is not None else self.action  # (the one the
        # source stepped with: drained just before the step)
        t_action = clock_ns()
        if getattr(self.source, "republish_actions", False) and frame.action:
            self.replayed_actions += 1  # the replayed action goes out before its frame
            self.pub.send(topics.ACTION, {
                "seq": self.replayed_actions - 1, "t_ns": t_action,
                "frame_seq": self.ring.latest_seq if self.ring.latest_seq >= 0 else None,
                "source": "replay", "vector": frame.action.get("vector"),
                "action_id": frame.action.get("action_id")})
        notice = write_frame(self.ring, self.pub, frame.pixels, action, self.cfg.source,
                             self.cfg.env)
        seq = notice["seq"]
        self.seq, self.frames = seq, self.frames + 1
        if self.lossless:
            self._recent[seq] = notice
            self._recent.pop(seq - self.ring.slots, None)
        if self._due is None:
            self._due = time.monotonic()
        if frame.t_recorded_ns is not None and self._anchor is None:
            self._anchor = (time.monotonic(), frame.t_recorded_ns)

    def _drain_actions(self) -> None:
        """Keep the newest valid agent.action (bounded per frame)."""
        for _ in range(MAX_ACTIONS_PER_FRAME):
            got = self.agent.recv(timeout_ms=0)
            if got is None:
                return
            msg = got[1]
            try:
                action = make_action(msg.get("vector"), msg.get("action_id"))
            except WireError as e:
                action, why = None, str(e)
            else:
                why = "it has neither vector nor action_id"
            if action is None:
                self.bad_action_msgs += 1
                if worth_logging(self.bad_action_msgs):
                    logger.warning("capture: ignored agent.action seq {}: {}", msg.get("seq"), why)
                continue
            self.action, self.action_t_ns = action, msg["t_ns"]
            self.actions_received += 1

    def _recorded(self, frame: SourceFrame) -> bool:
        return self.cfg.rate > 0 and frame.t_recorded_ns is not None

    def _wait_fps(self) -> None:
        if not self.period:
            return
        now = time.monotonic()
        self._due = (self._due if self._due is not None else now) + self.period
        if self._due < now - self.period:  # fell behind (credits, slow source): no burst
            self._due = now
        self._sleep_until(self._due)

    def _wait_recorded(self, frame: SourceFrame) -> None:
        """Sleep until ``frame`` is due at ``rate`` x its recorded time."""
        t_rec = frame.t_recorded_ns
        assert t_rec is not None
        now = time.monotonic()
        if self._anchor is None or t_rec < self._anchor[1]:  # first frame, or a new pass
            self._anchor = (now, t_rec)
            return
        due = self._anchor[0] + (t_rec - self._anchor[1]) / 1e9 / self.cfg.rate
        if due < now - MAX_LAG_S:
            self._anchor = (now, t_rec)
            return
        self._sleep_until(due)

    def _sleep_until(self, deadline: float) -> None:
        while not self.stop:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.02))
            self._maybe_stats()

    # ------------------------------------------------------------ lossless credits

    def _processed_seq(self) -> int:
        return min(self.processed.values()) if self.processed else -1

    def _poll_worker(self, timeout_ms: int) -> None:
        assert self.worker is not None
        got = self.worker.recv(timeout_ms=timeout_ms)
        while got is not None:
            topic, msg = got
            self.worker_seen = True
            if msg["kind"] == "surprise" and msg.get("env") != self.cfg.env:
                pass  # another capture stream's frame (a multi-stream worker)
            elif msg["kind"] == "surprise":  # frame seq processed: the credit
                variant = msg.get("variant") or topic
                # (never beyond the newest frame written: a bogus seq cannot credit frames
                # not written yet)
                seq = min(msg["seq"], self.seq)
                self.processed[variant] = max(self.processed.get(variant, -1), seq)
            else:  # iwm.ready, per worker stream
                stream = msg.get("stream")
                if msg["notices"] == 0:
                    self._fresh_worker_t[stream] = msg["t_ns"]
                else:
                    self._fresh_worker_t.pop(stream, None)
                seen = self._worker_restarts.setdefault(stream, set())
                if msg["restarts"] not in seen:  # once per worker life: two workers of one
                    seen.add(msg["restarts"])    # stream name do not set it off every tick
                    if len(seen) > 1:
                        self._fresh_worker_t.pop(stream, None)  # (re-sent here already)
                        self._resend_notices("a worker took over")
            got = self.worker.recv(timeout_ms=0)

    def _resend_to_fresh_worker(self) -> None:
        """While capture waits for credits it sends no notices, and a worker that has seen
        none (restarted after a crash) would wait for one forever: re-send the notices."""
        # only a worker that still had seen no notice well after we stopped sending them
        since = max(self._blocked_t, self._resent_t) + FRESH_GRACE_NS
        fresh = [s for s, t in self._fresh_worker_t.items() if t >= since]
        if not fresh:
            return
        for stream in fresh:
            del self._fresh_worker_t[stream]
        self._resend_notices("a fresh worker")

    def _resend_notices(self, why: str) -> None:
        """Send the notices of the frames still in the ring again, oldest first: the worker
        that lost them (they went to its dead predecessor) gets their actions too, for the
        unprocessed ones and for those its at-least-once rewind publishes again."""
        seqs = sorted(self._recent)
        if seqs:
            logger.info("capture: lossless: {}; re-sending the notices of seqs {}..{}", why,
                        seqs[0], seqs[-1])
        for s in seqs:
            self.pub.send(topics.FRAME, self._recent[s])
        self.resent_notices += len(seqs)
        self._resent_t = clock_ns()

    def _wait_for_worker(self) -> bool:
        """Lossless start: block until the worker speaks (iwm.ready); False when stopped."""
        logger.info("capture: lossless: waiting for the worker on {}", self.endpoints.worker)
        started = time.monotonic()
        next_log = started + WAIT_LOG_INTERVAL_S
        # subscribers that connected before we bound (worker, recorder) re-connect within
        # their reconnect interval: give them a moment so the first notices reach them
        settled = self._bound_at + SUBSCRIBER_SETTLE_S
        while not self.worker_seen or time.monotonic() < settled:
            if self.stop:
                return False
            self._poll_worker(20 if self.worker_seen else 100)
            self._maybe_stats()
            if time.monotonic() >= next_log:
                next_log += WAIT_LOG_INTERVAL_S
                logger.warning("capture: lossless: no message from the worker on {} after "
                               "{:.0f} s; still waiting", self.endpoints.worker,
                               time.monotonic() - started)
        return True

    def _wait_credit(self) -> bool:
        """Block while ``slots - 1`` frames are unprocessed; False when stopped."""
        window = self.ring.slots - 1
        self._poll_worker(0)
        if self.seq - self._processed_seq() < window:
            return True
        started = time.monotonic()
        self._blocked_t = clock_ns()
        next_log = started + WAIT_LOG_INTERVAL_S
        try:
            while self.seq - self._processed_seq() >= window:
                if self.stop:
                    return False
                self._poll_worker(50)
                self._resend_to_fresh_worker()
                self._maybe_stats()
                if time.monotonic() >= next_log:
                    next_log += WAIT_LOG_INTERVAL_S
                    logger.warning("capture: lossless: worker at seq {} of {}; waited {:.0f} s",
                                   self._processed_seq(), self.seq, time.monotonic() - started)
            return True
        finally:
            self.credit_wait_s += time.monotonic() - started

    def _drain_worker(self) -> None:
        """Lossless end: wait (bounded) until the worker has processed the last frame."""
        deadline = time.monotonic() + self.cfg.drain_timeout_s
        self._blocked_t = clock_ns()
        while self._processed_seq() < self.seq and not self.stop:
            if time.monotonic() >= deadline:
                logger.warning("capture: lossless: worker processed up to seq {} of {} within "
                               "{} s; stopping anyway", self._processed_seq(), self.seq,
                               self.cfg.drain_timeout_s)
                return
            self._poll_worker(50)
            self._resend_to_fresh_worker()
            self._maybe_stats()

    # ------------------------------------------------------------ stats

    def _maybe_stats(self) -> None:
        if time.monotonic() >= self._stats_due:
            self._publish_stats()

    def _publish_stats(self) -> None:
        now = time.monotonic()
        t0, frames0 = self._stats_window
        fps = (self.frames - frames0) / (now - t0) if now > t0 else 0.0
        self._stats_window = (now, self.frames)
        self._stats_due = now + STATS_INTERVAL_S
        values: dict[str, Any] = {
            "fps": round(fps, 2), "frames": self.frames, "seq": self.seq,
            "episodes": int(getattr(self.source, "episodes", 0)),
            "bad_actions": int(getattr(self.source, "bad_actions", 0)) + self.bad_action_msgs,
            "actions_received": self.actions_received,
            "action_decode_errors": self.agent.decode_errors,
            "replayed_actions": self.replayed_actions, "resent_notices": self.resent_notices,
            "notices_dropped": self.pub.dropped,
            "credit_wait_s": round(self.credit_wait_s, 3),
            "mode": self.cfg.mode,
        }
        if self.lossless:
            values["processed_seq"] = self._processed_seq()
        self.pub.send(topics.STATS, {"t_ns": clock_ns(), "source": "capture", "values": values})
