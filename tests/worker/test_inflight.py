"""The gateway's books for exactly-once across a remote worker's restart (workers.inflight).

    .venv/bin/pytest tests/worker/test_inflight.py -q
"""

from __future__ import annotations

from iwm_bus.bus import topics
from workers.inflight import InFlight


def _sent(books: InFlight, *seqs: int, t0: int = 1000) -> None:
    for s in seqs:
        books.sent(s, t0 + s, [b"iwm.frame", b"header", bytes([s])])


def test_a_frame_stays_until_every_stream_answered_it() -> None:
    books = InFlight()
    _sent(books, 0, 1, 2, 3)
    assert [s for s, _ in books.unanswered()] == [0, 1, 2, 3]
    assert books.first_time(topics.SURPRISE, 1, 1001)  # not an answer: only the latent is
    assert len(books) == 4
    assert books.first_time(topics.LATENT, 1, 1001)
    assert [s for s, _ in books.unanswered()] == [2, 3] and books.answered(1)
    # a second stream: frames wait for it too, from its first answer on
    assert books.first_time(topics.LATENT + ".semantic", 0, 1000)
    _sent(books, 4)
    assert books.first_time(topics.LATENT, 3, 1003)
    assert [s for s, _ in books.unanswered()] == [2, 3, 4]  # (0 only: the semantic stream)
    assert books.get(2) == [b"iwm.frame", b"header", b"\x02"] and books.get(0) is None
    assert books.first_time(topics.LATENT + ".semantic", 3, 1003)
    assert [s for s, _ in books.unanswered()] == [4]
    _sent(books, 2)  # a re-send of an answered frame is not kept again
    assert [s for s, _ in books.unanswered()] == [4]


def test_results_pass_once_per_topic_and_frame() -> None:
    books = InFlight()
    _sent(books, 5)
    assert books.first_time(topics.LATENT, 5, 1005)
    assert not books.first_time(topics.LATENT, 5, 1005)  # a re-run's
    assert books.first_time(topics.LATENT + ".semantic", 5, 1005)  # another stream's
    assert books.first_time(topics.MRR, 5, 1005) and not books.first_time(topics.MRR, 5, 1005)
    assert books.first_time(topics.LATENT, 5, 9999)  # seq 5 of another capture: not a copy
    assert books.duplicates == 2


def test_a_new_capture_starts_new_books_and_old_results_answer_nothing() -> None:
    books = InFlight()
    _sent(books, 0, 1, 2)
    books.restart()
    _sent(books, 0, 1, t0=5000)
    assert books.first_time(topics.LATENT, 2, 1002)  # the old capture's, late: passed on
    assert [s for s, _ in books.unanswered()] == [0, 1]  # but it answers nothing here
    assert books.first_time(topics.LATENT, 0, 5000)
    assert [s for s, _ in books.unanswered()] == [1]


def test_frames_beyond_the_capacity_are_evicted_and_counted() -> None:
    books = InFlight(capacity=8)
    _sent(books, *range(11))
    assert [s for s, _ in books.unanswered()] == list(range(3, 11)) and books.evicted == 3
