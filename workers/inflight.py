"""Exactly-once across a remote worker's restart: the gateway's frames in flight and the
results it has passed on.

A remote worker killed mid-stream takes the frames it had not answered with it; the one that
takes over (the GPU machine's launcher restarts it, or its standby takes over) must get them
again, and must not publish twice what its predecessor already did. The gateway
(:mod:`workers.gateway`) sees both sides, so it keeps the books here:

- **frames in flight**: every frame it sent (its message parts, as sent) until every worker
  stream has answered it (its ``iwm.latent``, the last message of a frame), at most
  ``capacity`` (the ring's slots: a lossless capture keeps fewer unanswered). A worker that
  connects gets the unanswered ones again, oldest first (:meth:`InFlight.unanswered`).
- **results passed on**: one ``iwm.surprise`` / ``iwm.mrr`` / ``iwm.latent`` per topic and
  frame (seq and capture time): a result of a frame already passed on, which a worker that
  took over publishes again, is dropped (:meth:`InFlight.first_time`).

A frame that leaves the books unanswered, pushed out by newer ones, is counted
(``evicted``): in realtime mode a frame the worker skipped, in lossless a frame lost.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from iwm_bus.bus import topics

__all__ = ["DEDUP_KEEP", "InFlight", "RESULT_TOPICS"]

#: frames kept at least (the ring's slots when larger)
MIN_CAPACITY = 8
#: results remembered per topic to drop a re-run's duplicates (far more than a worker's
#: rewind, which goes back at most the ring's slots)
DEDUP_KEEP = 1024
#: the topics (and their ``.stream`` forms) that carry one message per frame
RESULT_TOPICS = (topics.SURPRISE, topics.MRR, topics.LATENT)


class InFlight:
    """The gateway's books for exactly-once (see the module doc). Not thread-safe."""

    def __init__(self, capacity: int = MIN_CAPACITY) -> None:
        self.capacity = max(MIN_CAPACITY, capacity)
        # seq -> (t_capture_ns, message parts as sent)
        self._frames: dict[int, tuple[int, list[Any]]] = {}
        # per latent topic (one per worker stream): the newest seq it answered in this stream
        self._answered: dict[str, int] = {}
        # per result topic: the (seq, t_capture_ns) passed on, oldest first
        self._passed: dict[str, OrderedDict[tuple[int, int], None]] = {}
        # the capture time of the oldest frame sent in this stream (None: none yet): a latent
        # of an older frame is a previous capture's, which answers nothing here
        self._t0: int | None = None
        self.evicted = 0  # frames pushed out of the books unanswered
        self.duplicates = 0  # results dropped: their frame's were passed on already

    def __len__(self) -> int:
        return len(self._frames)

    def restart(self) -> None:
        """A new capture (another ring): its seqs start again."""
        self._frames.clear()
        self._answered.clear()
        self._t0 = None

    def sent(self, seq: int, t_capture_ns: int, parts: list[Any]) -> None:
        """Frame ``seq`` went out as ``parts``: keep it until every stream answered it."""
        self._t0 = t_capture_ns if self._t0 is None else min(self._t0, t_capture_ns)
        if self.answered(seq):
            return  # (a re-send of a frame answered already)
        self._frames[seq] = (t_capture_ns, parts)
        while len(self._frames) > self.capacity:  # the oldest goes
            del self._frames[min(self._frames)]
            self.evicted += 1

    def get(self, seq: int) -> list[Any] | None:
        """The parts frame ``seq`` went out as, while it is unanswered."""
        got = self._frames.get(seq)
        return got[1] if got is not None else None

    def answered(self, seq: int) -> bool:
        """Every stream that answered anything in this stream has answered ``seq``."""
        return bool(self._answered) and seq <= min(self._answered.values())

    def unanswered(self) -> list[tuple[int, list[Any]]]:
        """The frames not yet answered by every stream, oldest first."""
        return [(seq, parts) for seq, (_, parts) in sorted(self._frames.items())]

    def first_time(self, topic: str, seq: int, t_capture_ns: int) -> bool:
        """A result on ``topic`` (``iwm.latent``, ``iwm.surprise.semantic``, ...) of frame
        (``seq``, ``t_capture_ns``): True when it is the first of its frame on that topic
        (pass it on), False for a duplicate (counted). A latent answers its frame."""
        passed = self._passed.setdefault(topic, OrderedDict())
        key = (seq, t_capture_ns)
        if key in passed:
            self.duplicates += 1
            return False
        passed[key] = None
        if len(passed) > DEDUP_KEEP:
            passed.popitem(last=False)
        if topics.base_topic(topic) == topics.LATENT and self._t0 is not None \
                and t_capture_ns >= self._t0:
            self._answered[topic] = max(self._answered.get(topic, -1), seq)
            done = min(self._answered.values())
            for old in [s for s in self._frames if s <= done]:
                del self._frames[old]
        return True
