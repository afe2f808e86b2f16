"""Reading a capture's frames as its notices announce them: the one ring reader.

Every process that reads the shared-memory FrameRing (the worker, the recorder, the live
viewer, the gateway) does it through :class:`RingReader`:

- **which capture**: each ``iwm.frame`` notice carries the ring's random ``ring_id``
  (:attr:`iwm_bus.bus.ring.FrameRing.ring_id`). :class:`NoticeOrder` sorts a notice into the
  first of a stream, a newer one, an older one sent again (a lossless capture re-sends a
  notice to a fresh worker), or the first of a new capture (another ring id): one rule,
  whatever the seqs do. A notice without an id (a capture older than the id) falls back to
  seq and capture time: a seq that goes back while the time goes on is a new capture.
- **lazy attach**: the ring is attached on the first read, retried every 20 ms while a
  notice wants it; after ``attach_timeout_s`` an error is logged, ``attach_failures``
  counted, and the next notice tries again. An attached ring whose id is not the notices'
  (the old segment of a capture that restarted) is let go and attached again.
- **a reason for each missed read**: ``read`` answers the frame or why not: ``"dropped"``
  (overwritten), ``"torn"`` (overwritten while copied), ``"unavailable"`` (not written), or
  ``"detached"`` (no ring to read yet).

A remote worker cannot attach the ring: :class:`InlineFrames` holds the frames that came
inside their notices and answers as :class:`RingReader` does, so that after the read a frame
takes one path.

The worker chooses which announced seqs to read (:mod:`workers.encoder`); the recorder,
viewer and gateway want every frame and call :meth:`RingReader.follow`, which also reads
the frames whose notice never arrived and, on a stream's first notice, those still in the
ring before it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from loguru import logger

from iwm_bus.bus.ring import FrameMeta, FrameRing
from iwm_bus.errors import RingError
from iwm_bus.logs import worth_logging

__all__ = ["FIRST", "INVALID", "NEWER", "OLDER", "RESTART", "FrameRead", "InlineFrames",
           "NoticeOrder", "RingReader"]

#: what :meth:`NoticeOrder.see` makes of a notice (and :meth:`RingReader.see`: INVALID)
FIRST, NEWER, OLDER, RESTART, INVALID = "first", "newer", "older", "restart", "invalid"
#: how long to keep trying to attach the ring once a notice wants a frame of it
ATTACH_TIMEOUT_S = 5.0
#: pause between attach attempts
ATTACH_RETRY_S = 0.02
#: a remote worker holds at most this many inline frames not yet processed
INLINE_KEEP = 64


class NoticeOrder:
    """Where a frame notice stands in its capture's stream (see the module doc)."""

    def __init__(self, who: str) -> None:
        self.who = who
        self.ring_id: int | None = None  # the stream's ring id (None: its notices carry none)
        self.last_seq: int | None = None  # the newest seq announced
        self.last_t = 0  # the newest notice's t_capture_ns
        self.restarts = 0  # new captures seen after the first

    def see(self, seq: int, ring_id: int | None = None, t_capture_ns: int | None = None) -> str:
        """FIRST, NEWER, OLDER (the same or an earlier seq of this stream, sent again) or
        RESTART (the first notice of another capture)."""
        if self.last_seq is None:
            kind = FIRST
        elif ring_id is not None and self.ring_id is not None:
            kind = RESTART if ring_id != self.ring_id else NEWER if seq > self.last_seq else OLDER
        elif seq > self.last_seq:
            kind = NEWER
        elif seq == self.last_seq or (t_capture_ns is not None and t_capture_ns <= self.last_t):
            kind = OLDER
        else:
            kind = RESTART
        if kind == RESTART:
            self.restarts += 1
            logger.warning("{}: a new capture (ring id {} after {}, seq {} after {}): starting "
                           "a new stream", self.who, ring_id, self.ring_id, seq, self.last_seq)
        if kind != OLDER:
            self.ring_id, self.last_seq = ring_id, seq
            if t_capture_ns is not None:
                self.last_t = t_capture_ns
        return kind


@dataclass(frozen=True)
class FrameRead:
    """One frame a notice calls for (:meth:`RingReader.follow`)."""

    seq: int
    # "notice": the frame the notice named; "gap": one whose notice never arrived;
    # "backfill": one still in the ring before the stream's first notice (not a loss if gone)
    why: str
    # (pixels (H, W, C), FrameMeta), or None when it could not be read
    got: tuple[np.ndarray, FrameMeta] | None
    # why ``got`` is None (RingReader.read's reasons), else None
    miss: str | None = None


class RingReader:
    """The FrameRing ``name`` as its notices announce it (see the module doc).

    ``buffer``: a function giving the reusable array (uint8, ``nbytes`` long) that every
    read copies into (the worker's, pinned on CUDA); each frame read is then a view of it,
    valid until the next read. Without it every read returns a fresh copy.
    """

    def __init__(self, name: str, who: str,
                 buffer: Callable[[int], np.ndarray] | None = None,
                 attach_timeout_s: float = ATTACH_TIMEOUT_S) -> None:
        self.name, self.who = name, who
        self.order = NoticeOrder(who)
        self.kind: str | None = None  # what the last notice was (see)
        self.ring: FrameRing | None = None
        self.attach_failures = 0
        self.invalid = 0  # notices naming a frame their ring has not written
        self._buffer, self._out = buffer, None
        self._timeout = attach_timeout_s
        self._deadline: float | None = None
        self._next_try = 0.0

    # -- notices

    def see(self, seq: int, ring_id: int | None = None, t_capture_ns: int | None = None,
            attach: bool = True) -> str:
        """Sort a notice (:meth:`NoticeOrder.see`); a new capture lets the ring go. Wants
        the ring (``attach``: tries to attach it now, and on the next reads).

        INVALID: the notice names a frame its ring has not written (the capture writes the
        frame before it sends the notice): a malformed notice, ignored and counted in
        ``invalid``, so that it cannot send the reader (and a worker's cursor) off to seqs
        that never come."""
        if attach and self.ring is None:
            if self._deadline is None:
                self._deadline = time.monotonic() + self._timeout
            self.attach(ring_id)
        ring = self.ring
        if ring is not None and ring_id == ring.ring_id and seq > ring.latest_seq:
            self.invalid += 1
            if worth_logging(self.invalid):
                logger.warning("{}: ignored a notice of seq {}, beyond the ring's newest {} "
                               "(#{})", self.who, seq, ring.latest_seq, self.invalid)
            self.kind = INVALID
            return INVALID
        kind = self.kind = self.order.see(seq, ring_id, t_capture_ns)
        if kind == RESTART or (ring is not None and ring_id not in (None, ring.ring_id)):
            self.close()  # (another ring's notice: attached again on the next read)
            if attach:
                self._deadline = time.monotonic() + self._timeout
        return kind

    def follow(self, seq: int, ring_id: int | None = None, t_capture_ns: int | None = None,
               read: bool = True) -> list[FrameRead] | None:
        """Sort a notice and read the frames it calls for, oldest first: the gap since the
        last notice, on a stream's first one the frames still in the ring before it, and
        its own (``read=False``: only follow it, e.g. a frame that travelled inline). None:
        an older notice sent again, or no ring to read yet (the gap is read next time)."""
        last = self.order.last_seq
        kind = self.see(seq, ring_id, t_capture_ns, attach=read)
        if kind in (OLDER, INVALID):
            return None
        if not read:
            return []
        if not self.attach():
            self.order.last_seq = None if kind in (FIRST, RESTART) else last
            return None
        if kind in (FIRST, RESTART) or last is None:
            before = [(s, "backfill") for s in range(max(0, seq - self.slots + 1), seq)]
        else:
            before = [(s, "gap") for s in range(last + 1, seq)]
        out = []
        for s, why in [*before, (seq, "notice")]:
            got = self.read(s)
            out.append(FrameRead(s, why, None, got) if isinstance(got, str)
                       else FrameRead(s, why, got))
        return out

    # -- the ring

    @property
    def slots(self) -> int:
        assert self.ring is not None
        return self.ring.slots

    def attach(self, ring_id: int | None = None) -> bool:
        """True when the notices' ring (``ring_id``, default the stream's) is attached; else
        tries (at most every 20 ms) while a notice wants it, logging and counting a failure
        at the deadline."""
        if self.ring is not None:
            return True
        now = time.monotonic()
        if self._deadline is None or now < self._next_try:
            return False
        want = ring_id if ring_id is not None else self.order.ring_id
        try:
            ring = FrameRing.attach(self.name)
            if want is not None and ring.ring_id != want:
                ring.close()
                raise RingError(f"the ring there has id {ring.ring_id}, the notices "
                                f"{want} (the capture is restarting?)")
        except RingError as e:
            self._next_try = now + ATTACH_RETRY_S
            if now >= self._deadline:
                self.attach_failures += 1
                self._deadline = None  # the next notice starts another attempt
                logger.error("{}: cannot attach frame ring {!r} after {} s: {}", self.who,
                             self.name, self._timeout, e)
            return False
        self.ring, self._deadline = ring, None
        self._out = self._buffer(ring.slot_bytes) if self._buffer is not None else None
        logger.info("{}: attached frame ring {}", self.who, ring)
        return True

    def read(self, seq: int) -> tuple[np.ndarray, FrameMeta] | str:
        """``(pixels (H, W, C), FrameMeta)`` of frame ``seq``, or why not: "dropped",
        "torn", "unavailable" or "detached" (see the module doc)."""
        if not self.attach():
            return "detached"
        assert self.ring is not None
        got = self.ring.read(seq, out=self._out, with_meta=True)
        return got if got is not None else self.ring.last_miss or "unavailable"

    def close(self) -> None:
        if self.ring is not None:
            ring, self.ring, self._out = self.ring, None, None
            ring.close()

    def __repr__(self) -> str:
        return f"RingReader({self.name!r}, {self.who}, ring={self.ring!r})"


class InlineFrames:
    """The frames of a remote worker, which cannot attach the ring: each arrives with its
    ``iwm.frame`` notice (``pixels``, sent by the gateway, decoded by
    :class:`iwm_bus.bus.link_frames.LinkFrameSubscriber`). It answers the worker as
    :class:`RingReader` does (``see``, ``attach``, ``read``, ``slots``, ``close``),
    so that from here on a frame takes one path; ``slots`` spans the frames held, so "older
    than the ring holds" means "older than the oldest frame held"."""

    def __init__(self, keep: int = INLINE_KEEP) -> None:
        self.keep = keep
        self.order = NoticeOrder("remote worker")
        self._frames: dict[int, tuple[np.ndarray, int]] = {}
        self.latest_seq = -1
        self.attach_failures = 0  # never: there is nothing to attach
        self.invalid = 0  # never checked: no ring says what was written
        self.missing = 0  # notices that came without their pixels

    @property
    def slots(self) -> int:
        return self.latest_seq - min(self._frames) + 1 if self._frames else 1

    def see(self, seq: int, ring_id: int | None = None,
            t_capture_ns: int | None = None) -> str:
        kind = self.order.see(seq, ring_id, t_capture_ns)
        if kind == RESTART:
            self.close()
        return kind

    def add(self, seq: int, pixels: Any, t_capture_ns: int) -> None:
        """Hold the frame of a notice (the oldest goes beyond ``keep``): ``pixels`` is the
        caller's no more (a writable array is held as it is)."""
        if not isinstance(pixels, np.ndarray) or pixels.ndim != 3 or pixels.dtype != np.uint8:
            self.missing += 1
            if worth_logging(self.missing):
                logger.warning("frame notice {} came without (H, W, C) uint8 pixels (#{}): a "
                               "remote worker needs the gateway's inline frames", seq,
                               self.missing)
            return
        if seq < self.latest_seq - self.keep:
            return
        # a read-only array (a view of the message or of the decoded bytes) is copied: torch
        # wants writable memory, as the ring's frames are copied out of shared memory
        self._frames[seq] = (pixels if pixels.flags.writeable else pixels.copy(), t_capture_ns)
        self.latest_seq = max(self.latest_seq, seq)
        while len(self._frames) > self.keep:
            del self._frames[min(self._frames)]

    def attach(self) -> bool:
        return bool(self._frames)

    def read(self, seq: int) -> tuple[np.ndarray, FrameMeta] | str:
        """``(pixels (H, W, C), FrameMeta)``, or "unavailable" when it never arrived; the
        frames before it are let go."""
        got = self._frames.pop(seq, None)
        for old in [s for s in self._frames if s < seq]:
            del self._frames[old]
        if got is None:
            return "unavailable"
        pixels, t_ns = got
        return pixels, FrameMeta(seq, t_ns, *pixels.shape[:2])

    def close(self) -> None:
        self._frames.clear()
        self.latest_seq = -1
