"""The one ring reader: notice order by ring id, lazy (re-)attach, a reason per missed read."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from iwm_bus.bus.ring import FrameRing
from workers.ring_reader import FIRST, NEWER, OLDER, RESTART, NoticeOrder, RingReader


@pytest.fixture
def name() -> Iterator[str]:
    n = f"iwmt_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    yield n
    FrameRing.unlink_stale(n)


def frame(i: int) -> np.ndarray:
    return np.full((4, 6, 3), i, np.uint8)


def test_the_ring_id_decides_whatever_the_seqs_and_times_do() -> None:
    o = NoticeOrder("test")
    assert o.see(5, 11, 100) == FIRST
    assert o.see(6, 11, 200) == NEWER
    # an older seq of the same ring is a notice sent again, even with a later time
    assert o.see(3, 11, 300) == OLDER and o.last_seq == 6
    # another ring is a new capture, even with the seq going on
    assert o.see(9, 12, 400) == RESTART and o.restarts == 1 and o.ring_id == 12
    assert o.see(10, 12, 500) == NEWER


def test_without_ids_a_seq_going_back_is_a_new_capture_only_if_time_goes_on() -> None:
    o = NoticeOrder("test")
    assert o.see(5, None, 100) == FIRST
    assert o.see(5, None, 100) == OLDER  # the same notice again
    assert o.see(2, None, 50) == OLDER  # an older notice sent again (lossless)
    assert o.see(2, None, 150) == RESTART and o.restarts == 1


def test_follow_reads_gaps_and_backfill_and_says_why_a_read_missed(name: str) -> None:
    with FrameRing.create(name, 4, 4, 6) as ring:
        for i in range(3):
            ring.write(frame(i))
        r = RingReader(name, "test")
        first = r.follow(2, ring.ring_id)
        assert [(f.seq, f.why) for f in first] == [(0, "backfill"), (1, "backfill"),
                                                   (2, "notice")]
        assert [int(f.got[0][0, 0, 0]) for f in first] == [0, 1, 2]
        for i in range(3, 9):
            ring.write(frame(i))
        reads = r.follow(8, ring.ring_id)  # 3..4 are overwritten, 5..7 are gaps
        assert [(f.seq, f.why, f.miss) for f in reads] == [
            (3, "gap", "dropped"), (4, "gap", "dropped"), (5, "gap", None),
            (6, "gap", None), (7, "gap", None), (8, "notice", None)]
        assert r.follow(6, ring.ring_id) is None  # sent again: nothing to read
        assert r.read(9) == "unavailable"
        r.close()


def test_a_restarted_capture_is_read_from_its_new_ring(name: str) -> None:
    old = FrameRing.create(name, 4, 4, 6)
    for i in range(6):
        old.write(frame(i))
    r = RingReader(name, "test")
    assert r.follow(5, old.ring_id)[-1].got[0][0, 0, 0] == 5
    old.unlink()
    old.close()
    with FrameRing.create(name, 4, 4, 6) as new:
        for i in range(8):  # the seq goes on past the old one's
            new.write(frame(100 + i))
        reads = r.follow(7, new.ring_id)
        assert r.order.restarts == 1 and r.ring is not None
        assert r.ring.ring_id == new.ring_id
        assert reads[-1].seq == 7 and reads[-1].got[0][0, 0, 0] == 107
        r.close()


def test_a_ring_with_another_id_than_the_notices_is_not_read(name: str) -> None:
    """The name still holds the old capture's ring (the new one is not created yet): no
    frame of it is taken for the new capture's, and the failure is counted at the
    deadline."""
    with FrameRing.create(name, 4, 4, 6) as ring:
        ring.write(frame(0))
        r = RingReader(name, "test", attach_timeout_s=0.0)
        assert r.follow(0, ring.ring_id + 1) is None
        assert r.ring is None and r.attach_failures == 1
        assert r.read(0) == "detached"


def test_reads_go_into_the_given_buffer(name: str) -> None:
    bufs = []

    def buffer(nbytes: int) -> np.ndarray:
        bufs.append(np.empty(nbytes, np.uint8))
        return bufs[-1]

    with FrameRing.create(name, 4, 4, 6) as ring:
        ring.write(frame(7))
        r = RingReader(name, "test", buffer=buffer)
        r.see(0, ring.ring_id)
        pixels, meta = r.read(0)
        assert len(bufs) == 1 and np.shares_memory(pixels, bufs[0]) and meta.seq == 0
        assert int(pixels[0, 0, 0]) == 7
        r.close()


def test_following_inline_frames_never_touches_shared_memory(monkeypatch) -> None:
    """A viewer of a remote capture (pixels inside the notices) follows the stream without a
    ring: it must not try to attach one (and log failures) on every notice."""
    def no_attach(name: str) -> FrameRing:
        raise AssertionError("attached a ring for an inline frame")

    monkeypatch.setattr(FrameRing, "attach", staticmethod(no_attach))
    r = RingReader("iwmt_nowhere", "test", attach_timeout_s=0.0)
    for seq in range(3):
        assert r.follow(seq, 7, 100 + seq, read=False) == []
    assert r.ring is None and r.attach_failures == 0 and r.order.last_seq == 2
