"""Which frames of one capture stream the encoder worker processes, in which order.

:class:`FrameCursor` takes one capture's ``iwm.frame`` notices and answers the next frame to
process (its seq, pixels, capture time and the action on its notice): lossless every seq in
order, realtime the newest a notice named, with the rewind of a restarted lossless worker
and the losses counted (docs/worker.md, "Frames and modes"). The worker holds one per
capture stream (``--envs N``: N), so that each stream keeps its own order, notices and
cursor; nothing here touches a socket or a model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from workers.ring_reader import FIRST, INVALID, OLDER, RESTART, InlineFrames, RingReader
from workers.stream import StreamStats

__all__ = ["NOTICE_KEEP", "REWIND_GRACE_S", "FrameCursor", "NextFrame"]

#: lossless, restarted: how long after its first notice the worker waits before it rewinds,
#: so that the notices the capture sends again on its iwm.ready (with their actions, and for
#: a remote worker their pixels) are here first
REWIND_GRACE_S = 0.25
#: frame notices remembered (by seq) until their frame is processed
NOTICE_KEEP = 4096

#: (seq, pixels (H, W, C), t_capture_ns, the notice's action map or None)
NextFrame = tuple[int, np.ndarray, int, "dict[str, Any] | None"]


class FrameCursor:
    """One capture stream's notices and cursor (see the module doc).

    ``reader`` reads the stream's frames (its ring, or a remote worker's inline frames);
    ``stats`` counts notices and losses (shared by a worker's streams: totals);
    ``on_restart`` is called when a notice of a new capture starts a new stream.
    """

    def __init__(self, mode: str, restarts: int, reader: RingReader | InlineFrames,
                 stats: StreamStats, on_restart: Callable[[], None]) -> None:
        self.mode, self.restarts, self.reader, self.stats = mode, restarts, reader, stats
        self._on_restart = on_restart
        # the notices of the frames still to process: seq -> (t_capture_ns, action)
        self.notices: dict[int, tuple[int, dict[str, Any] | None]] = {}
        self.cursor: int | None = None  # next seq not yet processed, skipped or dropped
        self.newest: int | None = None  # the newest seq a notice named
        # lossless, restarted: go back from the first notice to the oldest frame the dead
        # worker may not have published (the capture's credit window: ring slots - 1), once
        # REWIND_GRACE_S after that notice (monotonic; 0: no rewind pending)
        self.rewind = False
        self.rewind_at = 0.0

    def notice(self, msg: dict[str, Any]) -> bool:
        """Take a frame notice: remember it (its capture time and action) until its frame
        is processed; a notice of another capture starts a new stream. False when the
        notice names a frame its ring has not written (ignored, counted by the reader)."""
        seq, t_capture = msg["seq"], msg["t_capture_ns"]
        self.stats.notice()
        kind = self.reader.see(seq, msg.get("ring_id"), t_capture)
        if kind == INVALID:
            return False
        if kind == RESTART:
            self.stats.stream_restarts += 1
            self.notices.clear()
            self.cursor = self.newest = None
            self.rewind = False
            self._on_restart()
        if kind in (FIRST, RESTART):
            # realtime never goes below the first notice. Lossless: the first worker starts
            # at the stream's beginning (a notice sent before its subscription was connected
            # is not lost, the frame is still in the ring); a restarted one where the capture
            # re-sends, the oldest frame its predecessor did not publish
            first = self.mode == "lossless" and not self.restarts
            self.cursor = 0 if first else seq
            self.rewind = self.mode == "lossless" and not first
            self.rewind_at = time.monotonic() + REWIND_GRACE_S if self.rewind else 0.0
        assert self.cursor is not None
        if kind != OLDER:
            self.newest = seq
        # an OLDER notice is one a lossless capture re-sent to a fresh worker (with its
        # action): kept while its frame is still to be processed, or may be once rewound
        if seq >= self.cursor or self.rewind:
            self.notices[seq] = (t_capture, msg.get("action"))
            while len(self.notices) > NOTICE_KEEP:
                self.notices.pop(min(self.notices))
            if isinstance(self.reader, InlineFrames):
                self.reader.add(seq, msg.get("pixels"), t_capture)
        return True

    def has_work(self) -> bool:
        """A frame a notice named is still to be processed (and the ring is there; a
        pending rewind waits out its grace)."""
        return (self.cursor is not None and self.newest is not None
                and self.newest >= self.cursor and self.reader.attach()
                and not (self.rewind and time.monotonic() < self.rewind_at))

    def wait_s(self, now: float) -> float | None:
        """Seconds until this stream may have work without a new notice (attaching its
        ring, a pending rewind), or None."""
        wait = None
        if self.cursor is not None and not self.reader.attach():
            wait = 0.02  # still attaching
        if self.rewind:
            wait = min(wait if wait is not None else 1e9, self.rewind_at - now)
        return wait

    def next_frame(self) -> NextFrame | None:
        """The next frame to process (call when :meth:`has_work`), or None when it could
        not be read (torn, or overwritten: counted)."""
        seq = self._next_seq()
        got = self.reader.read(seq)
        notice = self.notices.pop(seq, None)
        if isinstance(got, str):
            if got == "torn":
                self.stats.torn += 1
            else:  # "unavailable" cannot happen for a seq a notice named; count it as lost
                self.stats.dropped_overwritten += 1
            return None
        pixels, meta = got
        t_capture, action = notice if notice is not None else (meta.t_capture_ns, None)
        return seq, pixels, t_capture, action

    def _next_seq(self) -> int:
        """The seq to process now, of those the notices named (advances the cursor past
        it): realtime the newest, lossless the next in order (frames overwritten already
        are counted and passed over)."""
        assert self.cursor is not None and self.newest is not None
        if self.mode == "realtime":
            seq = self.newest
            self.stats.skipped += seq - self.cursor
        else:
            slots = self.reader.slots
            oldest = self.newest - slots + 1  # older seqs are overwritten already
            if self.rewind:  # at least once: a frame published twice beats one lost
                self.rewind = False
                self.cursor = max(0, oldest, self.cursor - (slots - 1))
            if self.cursor < oldest:
                self.stats.dropped_overwritten += oldest - self.cursor
                self.cursor = oldest
            seq = self.cursor
        self.cursor = seq + 1
        for old in [s for s in self.notices if s < seq]:
            del self.notices[old]
        return seq
