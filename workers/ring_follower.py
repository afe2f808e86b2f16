"""Following a capture's frames from its notices: the ring reader of the recorder and viewer.

A process that wants *every* frame a capture announces (the recorder, the live viewer)
attaches the shared-memory ring lazily, notices when the capture restarted (the frame seq
went back: re-attach, start over) and, besides the frame a notice names, reads the frames
whose notice never arrived and, on the first notice, those still in the ring before it.
:class:`RingFollower` does that once; what to do with each frame and how to count what was
lost stays with the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loguru import logger

from iwm_bus.bus.ring import FrameRing
from iwm_bus.errors import RingError

__all__ = ["FrameRead", "RingFollower"]


@dataclass(frozen=True)
class FrameRead:
    """One frame a notice calls for."""

    seq: int
    # "notice": the frame the notice named; "gap": one whose notice never arrived;
    # "backfill": one still in the ring before the first notice (not a loss if gone)
    why: str
    # (pixels (H, W, C) copy, FrameMeta), or None when the ring no longer holds it
    got: tuple[Any, Any] | None


class RingFollower:
    """The ring of ``ring_name`` as announced by frame notices (see the module doc)."""

    def __init__(self, ring_name: str, who: str) -> None:
        self.ring_name, self.who = ring_name, who
        self.ring: FrameRing | None = None
        self.last_seq: int | None = None  # the last notice followed
        self.last_t = 0  # its t_capture_ns
        self.capture_restarts = 0

    def on_notice(self, seq: int, read: bool = True,
                  t_capture_ns: int | None = None) -> list[FrameRead] | None:
        """The frames a notice for ``seq`` calls for, oldest first (``read=False``: only
        follow it, e.g. a frame that travelled inline). None: a duplicate notice, or no
        ring to read (cannot attach yet; ``last_seq`` stays, so the next notice reads the
        gap). A seq that goes back is a new capture, unless ``t_capture_ns`` goes back too:
        that is an older notice sent again (a lossless capture re-sends one to a fresh
        worker), a duplicate."""
        if self.last_seq is not None and seq <= self.last_seq:
            if seq == self.last_seq or (t_capture_ns is not None
                                        and t_capture_ns < self.last_t):
                return None
            logger.warning("{}: frame seq went back from {} to {}: the capture restarted; "
                           "re-attaching the ring", self.who, self.last_seq, seq)
            self.capture_restarts += 1
            self.close()
            self.last_seq = None
        if t_capture_ns is not None:
            self.last_t = t_capture_ns
        if not read:
            self.last_seq = seq
            return []
        ring = self._attach()
        if ring is None:
            return None
        if self.last_seq is None:
            before = [(s, "backfill") for s in range(max(0, seq - ring.slots + 1), seq)]
        else:
            before = [(s, "gap") for s in range(self.last_seq + 1, seq)]
        reads = [FrameRead(s, why, ring.read(s, with_meta=True))
                 for s, why in [*before, (seq, "notice")]]
        self.last_seq = seq
        return reads

    def _attach(self) -> FrameRing | None:
        if self.ring is None:
            try:
                self.ring = FrameRing.attach(self.ring_name)
            except RingError as e:
                logger.warning("{}: cannot attach ring {!r}: {}", self.who, self.ring_name, e)
                return None
        return self.ring

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None
