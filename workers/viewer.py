"""The live viewer process: the bus and the ring into `Rerun <https://rerun.io>`_.

``iwm-launch --viewer [SPEC]`` starts it beside the capture and the worker; ``iwm-session
view`` uses the same :class:`RerunLog` for a recorded session. SPEC is ``spawn`` (the
default: start a Rerun viewer, which needs a display) or ``save:PATH.rrd`` (record headless
to a file that ``rerun PATH.rrd`` opens later). It needs ``rerun-sdk`` (the ``viewer`` extra):
imported lazily, so this module (and the launcher's preflight check) loads without it.

What is logged, on the timeline ``frame`` (the frame seq; Rerun adds its own ``log_time``):

``frame``
    the frame, downscaled by an integer stride to at most ``max_side`` pixels a side (read
    from the ring on its notice, or the notice's inline pixels; a frame the ring no longer
    holds is skipped and counted)
``surprise``, ``surprise_z``, ``mrr``, ``rr``
    scalar series from ``iwm.surprise`` / ``iwm.mrr`` (nil values are left out); a stream
    with a suffix (``iwm.surprise.semantic`` of a dual worker) goes to ``surprise/semantic``
    etc.
``agent/action_id``, ``agent/action_vector``, ``agent/action``
    the agent's actions (``agent.action``, from the agent and from a replay source) as
    scalars and a text log, on the frame they were decided on (``frame_seq``)
``agent/decision``, ``agent/decision/{slow_down,wait,escalate,stale,delay_s}``
    the arbiter's decisions (``agent.decision``, published by the demo agent): a text log
    line each (level WARN when it escalates) saying what was decided and why, and a 0/1
    series per kind (``delay_s`` in seconds), on the frame decided on (a decision without
    fresh vision, on the last frame seen)
``agent/plan/costs``, ``agent/plan/cost``
    when a decision carries a plan: the predicted cost of each candidate as a bar chart and
    the chosen candidate's cost as a series

Why a separate process: logging images costs CPU and the viewer may be slow; like the
recorder, it only reads the ring and subscribes, so it can never slow the capture or the
worker, and when it dies the launcher reports it and the sidecar goes on.

Exit codes: 0 clean stop, 1 failure while running, 2 nothing started (rerun-sdk missing,
bad spec, the viewer or file could not be opened).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from loguru import logger

from iwm_bus.bus import topics
from iwm_bus.bus.transport import Endpoints, Subscriber
from iwm_bus.bus.wire import decision_text
from iwm_bus.config import check, flag
from workers.entry import StopFlag, stop_on_signals
from workers.ring_reader import RingReader

__all__ = ["ViewerConfig", "ViewerTarget", "RerunLog", "LiveViewer", "check_target",
           "downscale", "require_rerun", "run_viewer"]

EXIT_OK, EXIT_FAILED, EXIT_NOT_STARTED = 0, 1, 2
POLL_MS = 50
#: on shutdown, keep draining the sockets this long for messages already in flight
SHUTDOWN_DRAIN_S = 0.3
LOG_INTERVAL_S = 10.0
#: frames are downscaled to at most this many pixels a side
DEFAULT_MAX_SIDE = 320
TIMELINE = "frame"
INSTALL_HINT = "pip install 'iwm-bus[viewer]'"


# ---------------------------------------------------------------- spec


@dataclass(frozen=True)
class ViewerTarget:
    """Where the log goes: a spawned viewer (``path`` None) or an .rrd file."""

    path: Path | None = None

    @classmethod
    def parse(cls, spec: str | None) -> ViewerTarget:
        """``None`` / ``spawn`` / ``save:PATH.rrd``; ValueError for anything else."""
        if spec is None or spec == "spawn":
            return cls(None)
        if spec.startswith("save:") and len(spec) > len("save:"):
            return cls(Path(spec[len("save:"):]))
        raise ValueError(f"--viewer {spec!r}: expected spawn or save:PATH.rrd")

    def __str__(self) -> str:
        return "spawn" if self.path is None else f"save:{self.path}"


def require_rerun(what: str = "--viewer") -> Any:
    """The ``rerun`` module, or ValueError (one line naming the extra) when it is missing."""
    try:
        import rerun
    except ImportError as e:
        raise ValueError(f"{what} needs rerun-sdk, which cannot be imported ({e}): "
                         f"{INSTALL_HINT}") from None
    return rerun


def check_target(spec: str | None, what: str = "--viewer") -> ViewerTarget:
    """Everything that can be wrong with a viewer spec, checked before anything starts.

    ValueError: bad spec, rerun-sdk missing, ``spawn`` without a display (Linux);
    FileNotFoundError: the .rrd file's folder does not exist.
    """
    target = ViewerTarget.parse(spec)
    require_rerun(what)
    if target.path is not None and not target.path.parent.is_dir():
        raise FileNotFoundError(f"{what} save:{target.path}: folder {target.path.parent} "
                                "does not exist")
    if target.path is None and sys.platform.startswith("linux") and not (
            os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        who = f"{what} spawn" if what.startswith("--") else what
        raise ValueError(f"{who} starts the Rerun viewer, which needs a display (no "
                         "DISPLAY or WAYLAND_DISPLAY); write an .rrd file instead (--viewer "
                         "save:PATH.rrd, iwm-session view --save PATH.rrd) and open it with "
                         "`rerun PATH.rrd` where there is one")
    return target


@dataclass
class ViewerConfig:
    # spawn | save:PATH.rrd (see ViewerTarget)
    spec: str | None = field(default=None, metadata=flag(
        "--viewer", "stream the run to Rerun: spawn (the default) a viewer, or save:PATH.rrd "
                    "headless (needs the viewer extra)", nargs="?", const="spawn",
        metavar="SPEC"))
    # frames are downscaled to at most this many pixels a side
    max_side: int = DEFAULT_MAX_SIDE
    # Rerun application id (the viewer groups recordings by it)
    app_id: str = "iwm-bus"

    def __post_init__(self) -> None:
        ViewerTarget.parse(self.spec)
        check(self, "max_side", int, 16, 8192)
        check(self, "app_id", str)


# ---------------------------------------------------------------- logging to Rerun


def downscale(pixels: np.ndarray, max_side: int = DEFAULT_MAX_SIDE) -> np.ndarray:
    """``(H, W, C)`` uint8 taken every k-th pixel so that no side exceeds ``max_side``
    (nearest neighbour: cheap, and exact at k = 1); one channel becomes ``(H, W)``."""
    h, w = pixels.shape[:2]
    k = max(1, math.ceil(max(h, w) / max_side))
    out = pixels[::k, ::k] if k > 1 else pixels
    if out.ndim == 3 and out.shape[2] == 1:
        out = out[:, :, 0]
    return np.ascontiguousarray(out)


def _entity(name: str, topic: str, base: str) -> str:
    """``surprise`` for ``iwm.surprise``, ``surprise/semantic`` for ``iwm.surprise.semantic``."""
    if topic == base:
        return name
    return f"{name}/{topic[len(base) + 1:].replace('.', '/')}"


class RerunLog:
    """One Rerun recording: frames, scalar series and actions on the ``frame`` timeline.

    Works with rerun-sdk 0.20 and later (``Scalars`` or the older ``Scalar``, ``set_time``
    or ``set_time_sequence``), through the module functions with ``recording=``.
    """

    def __init__(self, target: ViewerTarget, *, app_id: str = "iwm-bus",
                 max_side: int = DEFAULT_MAX_SIDE, what: str = "--viewer") -> None:
        rr = require_rerun(what)
        self.rr, self.target, self.max_side = rr, target, max_side
        self._scalar = getattr(rr, "Scalars", None) or rr.Scalar
        self.rec = rr.RecordingStream(app_id)
        if target.path is not None:
            rr.save(str(target.path), recording=self.rec)
        else:
            rr.spawn(connect=True, recording=self.rec)
        self.counts: dict[str, int] = dict.fromkeys(
            ("frames", "scalars", "actions", "decisions"), 0)

    def _at(self, seq: int) -> None:
        if hasattr(self.rr, "set_time"):
            self.rr.set_time(TIMELINE, sequence=int(seq), recording=self.rec)
        else:  # rerun-sdk < 0.23
            self.rr.set_time_sequence(TIMELINE, int(seq), recording=self.rec)

    def frame(self, seq: int, pixels: np.ndarray) -> None:
        self._at(seq)
        self.rr.log("frame", self.rr.Image(downscale(pixels, self.max_side)),
                    recording=self.rec)
        self.counts["frames"] += 1

    def scalar(self, seq: int, entity: str, value: Any) -> None:
        if value is None:
            return
        self._at(seq)
        self.rr.log(entity, self._scalar(float(value)), recording=self.rec)
        self.counts["scalars"] += 1

    def event(self, topic: str, msg: dict[str, Any], last_frame: int | None = None) -> bool:
        """Log a wire ``surprise`` / ``mrr`` / ``action`` / ``decision`` message; False for
        other topics."""
        if topic == topics.SURPRISE or topic.startswith(topics.SURPRISE + "."):
            for key in ("surprise", "surprise_z"):
                self.scalar(msg["seq"], _entity(key, topic, topics.SURPRISE), msg.get(key))
            return True
        if topic == topics.MRR or topic.startswith(topics.MRR + "."):
            for key in ("mrr", "rr"):
                self.scalar(msg["seq"], _entity(key, topic, topics.MRR), msg.get(key))
            return True
        if topic == topics.ACTION:
            self.action(msg, last_frame)
            return True
        if topic == topics.DECISION:
            self.decision(msg, last_frame)
            return True
        return False

    def action(self, msg: dict[str, Any], last_frame: int | None) -> None:
        seq = msg.get("frame_seq")
        seq = last_frame if seq is None else seq
        if seq is None:
            return  # no frame yet to put it on
        self._at(seq)
        aid, vec = msg.get("action_id"), msg.get("vector")
        if aid is not None:
            self.rr.log("agent/action_id", self._scalar(float(aid)), recording=self.rec)
        if vec is not None:
            values = np.asarray(vec, np.float64).ravel()
            if values.size:
                self.rr.log("agent/action_vector", self._scalar(values), recording=self.rec)
        parts = ([f"action_id {aid}"] if aid is not None else []) + (
            [f"vector {np.round(np.asarray(vec, np.float64).ravel(), 3).tolist()}"]
            if vec is not None else [])
        text = f"{', '.join(parts) or 'no action'} (from {msg.get('source') or '?'}, " \
               f"frame {seq})"
        self.rr.log("agent/action", self.rr.TextLog(text), recording=self.rec)
        self.counts["actions"] += 1

    def decision(self, msg: dict[str, Any], last_frame: int | None) -> None:
        """An arbiter decision: a text line, a 0/1 series per kind and the plan's costs."""
        seq = msg.get("frame_seq")
        seq = last_frame if seq is None else seq
        if seq is None:
            return  # no frame yet to put it on
        self._at(seq)
        for entity, key in (("slow_down", "slow_down"), ("wait", "prefer_wait"),
                            ("escalate", "escalate"), ("stale", "stale"),
                            ("delay_s", "delay_s")):
            self.rr.log(f"agent/decision/{entity}", self._scalar(float(msg[key])),
                        recording=self.rec)
        level = self.rr.TextLogLevel.WARN if msg["escalate"] else self.rr.TextLogLevel.INFO
        self.rr.log("agent/decision", self.rr.TextLog(
            f"{decision_text(msg)} (frame {seq})", level=level), recording=self.rec)
        costs = msg.get("plan_costs")
        if costs is not None:
            costs = np.asarray(costs, np.float64)
            self.rr.log("agent/plan/costs", self.rr.BarChart(costs), recording=self.rec)
            choice = msg.get("plan_choice")
            best = costs[choice] if choice is not None else costs.min()
            self.rr.log("agent/plan/cost", self._scalar(float(best)), recording=self.rec)
        self.counts["decisions"] += 1

    def close(self) -> None:
        """Flush what is buffered to the file or the viewer."""
        flush = getattr(self.rec, "flush", None)
        if flush is not None:
            flush()
        self.rr.disconnect(recording=self.rec)

    def __enter__(self) -> RerunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- the live viewer


class LiveViewer:
    """Sockets, ring reader and loop of the live view (see the module docstring)."""

    def __init__(self, cfg: ViewerConfig, endpoints: Endpoints, ring_name: str) -> None:
        self.cfg, self.endpoints, self.ring_name = cfg, endpoints, ring_name
        self.log = RerunLog(ViewerTarget.parse(cfg.spec), app_id=cfg.app_id,
                            max_side=cfg.max_side)
        self._ctx = zmq.Context()
        try:
            self.subs = [
                Subscriber([endpoints.capture], [topics.FRAME, topics.ACTION], ctx=self._ctx),
                Subscriber([endpoints.agent], [topics.ACTION, topics.DECISION],
                           ctx=self._ctx),
                Subscriber([endpoints.worker], [topics.SURPRISE, topics.MRR], ctx=self._ctx)]
        except BaseException:
            self._ctx.destroy(linger=0)
            self.log.close()
            raise
        self._poller = zmq.Poller()
        for sub in self.subs:
            self._poller.register(sub.sock, zmq.POLLIN)
        self.reader = RingReader(ring_name, "viewer")
        self.counts: dict[str, int] = dict.fromkeys(
            ("notices", "skipped_frames", "capture_restarts"), 0)
        self.t_start = time.monotonic()

    # ------------------------------------------------------------ frames

    def on_frame(self, msg: dict[str, Any]) -> None:
        seq = msg["seq"]
        self.counts["notices"] += 1
        inline = msg.get("pixels")  # the frame travels inline (remote capture)
        reads = self.reader.follow(seq, msg.get("ring_id"), msg["t_capture_ns"],
                                   read=inline is None)
        self.counts["capture_restarts"] = self.reader.order.restarts
        if reads is None:  # a duplicate, or no ring to read yet
            self.counts["skipped_frames"] += int(inline is None and self.reader.ring is None)
            return
        if inline is not None:
            self.log.frame(seq, inline)
            return
        for r in reads:
            if r.got is not None:
                self.log.frame(r.seq, r.got[0])
            elif r.why != "backfill":
                self.counts["skipped_frames"] += 1

    # ------------------------------------------------------------ loop

    def on_message(self, topic: str, msg: dict[str, Any]) -> None:
        if topic == topics.FRAME:
            self.on_frame(msg)
        else:
            self.log.event(topic, msg, self.reader.order.last_seq)

    def poll_once(self, timeout_ms: int) -> int:
        """Handle what arrived within ``timeout_ms``; the number handled."""
        events = dict(self._poller.poll(timeout_ms))
        return sum(sub.drain(self.on_message) for sub in self.subs if sub.sock in events)

    def run(self, stop: Any) -> None:
        """Log until ``stop`` is truthy, then drain what is in flight."""
        logger.info("viewer: {} + {} → rerun {}", self.endpoints.capture,
                    self.endpoints.worker, self.log.target)
        next_log = time.monotonic() + LOG_INTERVAL_S
        while not stop:
            self.poll_once(POLL_MS)
            if time.monotonic() >= next_log:
                next_log += LOG_INTERVAL_S
                logger.info("viewer: {}", self.stats())
        # the worker may still publish the last frames' values: listen the whole drain time
        deadline = time.monotonic() + SHUTDOWN_DRAIN_S
        while time.monotonic() < deadline:
            self.poll_once(20)

    def stats(self) -> dict[str, Any]:
        return {**self.counts, **self.log.counts, "last_seq": self.reader.order.last_seq,
                "running_s": round(time.monotonic() - self.t_start, 3),
                "decode_errors": sum(s.decode_errors for s in self.subs)}

    def close(self) -> None:
        try:
            self.log.close()
        finally:
            for sub in self.subs:
                sub.close()
            self._ctx.destroy(linger=0)
            self.reader.close()


# ---------------------------------------------------------------- process entry


def run_viewer(cfg: ViewerConfig, endpoints: Endpoints, ring_name: str) -> int:
    """Process entry (spawn-safe): log to Rerun until SIGTERM/SIGINT; the exit code."""
    stop = StopFlag()
    with stop_on_signals(stop, "viewer"):
        try:
            viewer = LiveViewer(cfg, endpoints, ring_name)
        except Exception as e:  # rerun missing, the file or the viewer cannot be opened
            logger.error("viewer: cannot start: {}", e)
            return EXIT_NOT_STARTED
        code = EXIT_OK
        try:
            viewer.run(stop)
        except Exception as e:
            logger.opt(exception=e).error("viewer: failed: {}", e)
            code = EXIT_FAILED
        try:
            viewer.close()
        except Exception as e:
            logger.opt(exception=e).error("viewer: closing {} failed: {}", viewer.log.target, e)
            return EXIT_FAILED
        logger.info("viewer: stopped: {}", viewer.stats())
        return code
