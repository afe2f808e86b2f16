"""The recorder process: the bus and the ring into a session file (``iwm_bus.session``).

``iwm-launch --record PATH`` starts it beside the capture and the worker::

    proc = ctx.Process(target=run_recorder, args=(RecorderConfig(path="run.mcap"),
                                                  Endpoints.ipc(run_dir), ring_name))

It subscribes to ``iwm.frame`` and replayed ``agent.action`` (capture endpoint), ``agent.action``
(agent endpoint) and, with ``record_latents``, ``iwm.latent`` / ``iwm.surprise`` / ``iwm.mrr``
(worker endpoint). For every frame notice it copies the pixels out of the ring at once (it
attaches lazily, on the first notice, and again when the capture restarts) and hands them to a
writer thread that encodes and appends them, so slow PNG encoding does not make it miss
frames. A frame it could not get is counted: ``missed_overwritten`` (the ring had moved on),
``missed_writer_behind`` (the write queue was full); a notice that never arrived is fetched
from the ring when it is still there (``from_ring``), else counted in ``missed_gap``. The
first notice also back-fills the frames still in the ring from before the recorder connected.

The file is flushed in bounded chunks (``chunk_size`` / ``chunk_seconds``). SIGTERM / SIGINT:
drain what is queued, close the file (index, closing statistics), exit 0. Exit codes: 0 clean,
1 failure while recording (the file stays readable up to its last chunk), 2 nothing started
(the file exists or cannot be created, bad config).
"""

from __future__ import annotations

import ctypes
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import zmq
from loguru import logger

from iwm_bus.bus import topics
from iwm_bus.bus.transport import Endpoints, Subscriber
from iwm_bus.config import check, fail, flag
from iwm_bus.errors import SessionError
from iwm_bus.session import FRAME_ENCODINGS, SessionOptions, SessionWriter
from workers.entry import StopFlag, stop_on_signals
from workers.ring_reader import RingReader

__all__ = ["RecorderConfig", "Recorder", "run_recorder"]

EXIT_OK, EXIT_FAILED, EXIT_NOT_STARTED = 0, 1, 2
POLL_MS = 50
#: on shutdown, keep draining the sockets this long for messages already in flight
SHUTDOWN_DRAIN_S = 0.3
LOG_INTERVAL_S = 10.0
#: glibc's mallopt parameter M_MMAP_THRESHOLD
_M_MMAP_THRESHOLD = -3
#: blocks at least this big get a mapping of their own, handed back to the OS when freed: frame
#: copies (a 210x160 RGB frame is 98 KiB), chunk buffers; zlib's 64 KiB PNG buffers stay below
MMAP_THRESHOLD = 72 << 10


@dataclass
class RecorderConfig:
    # session file to create (never overwritten unless overwrite)
    path: Path = field(metadata=flag("--record", "record the session to this .mcap file"))
    # png (lossless), zstd-raw (lossless, fastest) or jpeg (lossy)
    frame_encoding: str = "png"
    # record the worker's iwm.latent / iwm.surprise / iwm.mrr
    record_latents: bool = True
    # keep patch latents in iwm.latent (large: N x D float16 a frame); stripped by default
    record_patches: bool = False
    # record iwm.stats of every process (capture, worker)
    record_stats: bool = False
    # JPEG quality (frame_encoding="jpeg")
    jpeg_quality: int = 90
    # close a chunk at this many bytes or seconds (what a crash can lose)
    chunk_size: int = 1 << 20
    chunk_seconds: float = 1.0
    # fsync every chunk (power-loss safety; costs disk latency)
    fsync: bool = False
    # viewer channels for Foxglove / MCAP tools (frames as foxglove.CompressedImage, surprise,
    # MRR and actions as JSON); PNG frames are then stored twice (docs/sessions.md)
    viewer: bool = True
    # frames copied out of the ring but not yet written, at most this many bytes
    queue_bytes: int = 256 << 20
    # replace an existing file at path
    overwrite: bool = False
    # stored in the session's metadata: resolved config, source spec, env id, action space
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        check(self, "frame_encoding", str, choices=FRAME_ENCODINGS)
        check(self, "queue_bytes", int)
        if not 1 << 20 <= self.queue_bytes <= 64 << 30:
            fail(self, "queue_bytes", "must be in 1 MiB..64 GiB")
        for name in ("record_latents", "record_patches", "record_stats", "overwrite"):
            check(self, name, bool)
        if not isinstance(self.metadata, Mapping):
            fail(self, "metadata", "must be a dict")
        self.metadata = dict(self.metadata)
        self.options()  # validates the session options, naming RecorderConfig's fields

    def options(self) -> SessionOptions:
        try:
            return SessionOptions(frame_encoding=self.frame_encoding,
                                  jpeg_quality=self.jpeg_quality, chunk_size=self.chunk_size,
                                  chunk_seconds=self.chunk_seconds, fsync=self.fsync,
                                  viewer=self.viewer)
        except ValueError as e:
            raise ValueError(str(e).replace("SessionOptions.", "RecorderConfig.")) from None


# ---------------------------------------------------------------- writer thread


class _WriterThread(threading.Thread):
    """Owns the SessionWriter: encodes and appends what the recorder queues, in order."""

    def __init__(self, writer: SessionWriter, max_bytes: int) -> None:
        super().__init__(name="session-writer", daemon=True)
        self.writer = writer
        self.max_bytes = max_bytes
        self.queued_bytes = 0
        self.error: BaseException | None = None
        self._q: queue.SimpleQueue[tuple[str, tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()

    def put_frame(self, seq: int, t_ns: int, pixels: Any, action: Any) -> bool:
        """Queue a frame (the caller's copy); False when the byte budget is used up."""
        with self._lock:
            if self.queued_bytes + pixels.nbytes > self.max_bytes:
                return False
            self.queued_bytes += pixels.nbytes
        self._q.put(("frame", (seq, t_ns, pixels, action)))
        return True

    def put_event(self, topic: str, t_ns: int, msg: dict[str, Any]) -> None:
        self._q.put(("event", (topic, t_ns, msg)))

    def finish(self, timeout: float) -> bool:
        """Stop after the queued items; False when it did not finish within ``timeout``."""
        self._q.put(None)
        self.join(timeout)
        return not self.is_alive()

    def run(self) -> None:
        try:
            while True:
                try:
                    item = self._q.get(timeout=0.1)
                except queue.Empty:
                    self.writer.flush_if_due()
                    continue
                if item is None:
                    return
                kind, args = item
                if kind == "frame":
                    self.writer.write_frame(*args)
                    with self._lock:
                        self.queued_bytes -= args[2].nbytes
                else:
                    self.writer.write_event(*args)
        except BaseException as e:  # handed to the recorder loop, which exits with 1
            self.error = e


# ---------------------------------------------------------------- the recorder


class Recorder:
    """Sockets, ring reader, counters and loop of one recording (see the module docstring)."""

    def __init__(self, cfg: RecorderConfig, endpoints: Endpoints, ring_name: str) -> None:
        self.cfg, self.endpoints, self.ring_name = cfg, endpoints, ring_name
        meta = {**cfg.metadata, "recorder": {k: (str(v) if isinstance(v, Path) else v)
                                             for k, v in asdict(cfg).items() if k != "metadata"}}
        self.writer = SessionWriter(cfg.path, metadata=meta, overwrite=cfg.overwrite,
                                    options=cfg.options())
        self.thread = _WriterThread(self.writer, cfg.queue_bytes)
        self._ctx = zmq.Context()
        try:
            self.subs = self._subscribe(cfg, endpoints)
        except BaseException:
            self._ctx.destroy(linger=0)
            self.writer.close(end_metadata={"recorder": "failed to subscribe"})
            raise
        self._poller = zmq.Poller()
        for sub in self.subs:
            self._poller.register(sub.sock, zmq.POLLIN)
        self.reader = RingReader(ring_name, "recorder")
        self.counts: dict[str, int] = dict.fromkeys(
            ("notices", "frames", "from_ring", "missed_overwritten", "missed_gap",
             "missed_writer_behind", "missed_no_ring", "capture_restarts", "bad_notices",
             "events"), 0)
        self.first_seq: int | None = None
        self.t_start = time.monotonic()
        self.thread.start()

    def _subscribe(self, cfg: RecorderConfig, endpoints: Endpoints) -> list[Subscriber]:
        stats = [topics.STATS] if cfg.record_stats else []
        latents = [topics.LATENT, topics.SURPRISE, topics.MRR] if cfg.record_latents else []
        subs = [Subscriber([endpoints.capture], [topics.FRAME, topics.ACTION, *stats],
                           ctx=self._ctx),
                Subscriber([endpoints.agent], [topics.ACTION, topics.DECISION], ctx=self._ctx)]
        if latents or stats:
            subs.append(Subscriber([endpoints.worker], latents + stats, ctx=self._ctx))
        return subs

    # ------------------------------------------------------------ frames

    def on_frame(self, msg: dict[str, Any]) -> None:
        seq = msg["seq"]
        self.counts["notices"] += 1
        reads = self.reader.follow(seq, msg.get("ring_id"), msg["t_capture_ns"])
        self.counts["capture_restarts"] = self.reader.order.restarts
        self.counts["bad_notices"] = self.reader.invalid
        if reads is None:
            if self.reader.ring is None:
                self.counts["missed_no_ring"] += 1
            return
        for r in reads:
            if r.got is None:
                if r.why == "notice":
                    self.counts["missed_overwritten"] += 1
                elif r.why == "gap":
                    self.counts["missed_gap"] += 1
            elif r.why == "notice":
                self._queue_frame(seq, msg["t_capture_ns"], r.got[0], msg.get("action"))
            elif self._queue_frame(r.seq, r.got[1].t_capture_ns, r.got[0], None):
                self.counts["from_ring"] += 1

    def _queue_frame(self, seq: int, t_ns: int, pixels: Any, action: Any) -> bool:
        if not self.thread.put_frame(seq, t_ns, pixels, action):
            self.counts["missed_writer_behind"] += 1
            return False
        if self.first_seq is None:
            self.first_seq = seq
        self.counts["frames"] += 1
        return True

    # ------------------------------------------------------------ events

    def on_message(self, topic: str, msg: dict[str, Any]) -> None:
        base = topics.base_topic(topic)
        if base == topics.FRAME:
            self.on_frame(msg)
            return
        if base == topics.LATENT and not self.cfg.record_patches and msg.get("patches") is not None:
            msg = {**msg, "patches": None}
        t_ns = msg.get("t_capture_ns", msg.get("t_ns"))
        self.thread.put_event(topic, t_ns, msg)
        self.counts["events"] += 1

    # ------------------------------------------------------------ loop

    def poll_once(self, timeout_ms: int) -> int:
        """Handle what arrived within ``timeout_ms`` (frames first); the number handled."""
        events = dict(self._poller.poll(timeout_ms))
        handled = sum(sub.drain(self.on_message) for sub in self.subs if sub.sock in events)
        if self.thread.error is not None:
            raise RuntimeError(f"recorder: writing {self.cfg.path} failed: "
                               f"{self.thread.error}") from self.thread.error
        return handled

    def run(self, stop: Any) -> None:
        """Record until ``stop`` is truthy, then drain what is in flight."""
        logger.info("recorder: {} → {} ({}{})", self.endpoints.capture, self.cfg.path,
                    self.cfg.frame_encoding, ", latents" if self.cfg.record_latents else "")
        next_log = time.monotonic() + LOG_INTERVAL_S
        while not stop:
            self.poll_once(POLL_MS)
            if time.monotonic() >= next_log:
                next_log += LOG_INTERVAL_S
                logger.info("recorder: {}", self.stats())
        deadline = time.monotonic() + SHUTDOWN_DRAIN_S
        while time.monotonic() < deadline and self.poll_once(20):
            pass

    def stats(self) -> dict[str, Any]:
        missed = sum(v for k, v in self.counts.items() if k.startswith("missed_"))
        return {**self.counts, "missed": missed, "first_seq": self.first_seq,
                "last_seq": self.reader.order.last_seq,
                "recording_s": round(time.monotonic() - self.t_start, 3),
                "decode_errors": sum(s.decode_errors for s in self.subs),
                # a newer writer's fields and kinds, passed over (docs/wire.md); messages of
                # another major version, refused
                "unknown_fields": sum(s.unknown.fields for s in self.subs),
                "unknown_kinds": sum(s.unknown.kinds for s in self.subs),
                "other_major": sum(s.other_major for s in self.subs),
                "queued_bytes": self.thread.queued_bytes}

    def close(self) -> None:
        """Write what is queued, then the index and the closing statistics."""
        try:
            if not self.thread.finish(timeout=120):
                raise RuntimeError(f"recorder: the writer thread did not finish {self.cfg.path} "
                                   "within 120 s")
            if self.thread.error is not None:
                raise RuntimeError(f"recorder: writing {self.cfg.path} failed: "
                                   f"{self.thread.error}") from self.thread.error
            self.writer.close(end_metadata={"recorder": self.stats()})
        finally:
            for sub in self.subs:
                sub.close()
            self._ctx.destroy(linger=0)
            self.reader.close()


# ---------------------------------------------------------------- process entry


def map_large_blocks() -> bool:
    """Have glibc map blocks of ``MMAP_THRESHOLD`` bytes or more instead of carving them out
    of the heap; False where the C library has no ``mallopt`` (not glibc).

    glibc's own threshold rises to the largest block freed so far (the first MiB chunk
    buffer), so every frame copied out of the ring lands in the heap. When the writer falls
    behind, the queue holds MiBs of them; once it drains, the heap gives back only what lies
    above its highest live block, the small blocks allocated among the frames keep the rest
    resident, and each burst ratchets the recorder's RSS up (the soak's growth, issue 13).
    Setting the threshold also stops it rising.
    """
    try:
        return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def run_recorder(cfg: RecorderConfig, endpoints: Endpoints, ring_name: str) -> int:
    """Process entry (spawn-safe): record until SIGTERM/SIGINT; returns the exit code."""
    map_large_blocks()  # process-wide, so here and not in Recorder
    stop = StopFlag()
    with stop_on_signals(stop, "recorder"):
        try:
            recorder = Recorder(cfg, endpoints, ring_name)
        except (OSError, ValueError, SessionError) as e:
            logger.error("recorder: cannot start: {}", e)
            return EXIT_NOT_STARTED
        code = EXIT_OK
        try:
            recorder.run(stop)
        except Exception as e:  # reported as the exit code; the file keeps its complete chunks
            logger.opt(exception=e).error("recorder: failed: {}", e)
            code = EXIT_FAILED
        try:
            recorder.close()
        except Exception as e:
            logger.opt(exception=e).error("recorder: closing {} failed: {}; the file is "
                                          "readable up to its last chunk (iwm-session recover)",
                                          cfg.path, e)
            return EXIT_FAILED
        stats = recorder.stats()
        logger.info("recorder: {} closed: {} frames, {} missed ({} s)", cfg.path,
                    stats["frames"], stats["missed"], stats["recording_s"])
        return code
