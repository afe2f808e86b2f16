"""Tests for iwm_bus.bus.ring.FrameRing: real shared memory, real processes.

.venv/bin/pytest tests/test_ring.py -q
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import random
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iwm_bus.bus.ring import MAX_RING_BYTES, FrameMeta, FrameRing
from iwm_bus.errors import RingError, StaleRingError

REPO = Path(__file__).resolve().parents[2]
SHM = Path("/dev/shm")
JOIN_S = 30.0


def _unique_name() -> str:
    return f"iwmtest_{os.getpid()}_{uuid4().hex[:8]}"


@pytest.fixture
def name() -> Iterator[str]:
    """A fresh ring name; whatever is left under it is removed afterwards."""
    ring_name = _unique_name()
    try:
        yield ring_name
    finally:
        FrameRing.unlink_stale(ring_name)


@pytest.fixture
def ring(name: str) -> Iterator[FrameRing]:
    with FrameRing.create(name, slots=4, max_height=48, max_width=64) as r:
        yield r


def _frame(h: int, w: int, value: int, c: int = 3) -> np.ndarray:
    rng = np.random.default_rng(value)
    return rng.integers(0, 256, (h, w, c), dtype=np.uint8)


# ----------------------------------------------------------------------------- basics


def test_round_trip_with_meta_between_creator_and_reader(ring: FrameRing) -> None:
    assert ring.latest_seq == -1
    frame = _frame(48, 64, 1)
    assert ring.write(frame, t_capture_ns=123) == 0
    assert ring.write(frame) == 1
    reader = FrameRing.attach(ring.name)
    try:
        assert (reader.name, reader.slots, reader.channels) == (ring.name, 4, 3)
        assert (reader.max_height, reader.max_width, reader.slot_bytes) == (48, 64, 48 * 64 * 3)
        assert reader.latest_seq == 1
        got = reader.read(0, with_meta=True)
        assert got is not None
        pixels, meta = got
        assert meta == FrameMeta(seq=0, t_capture_ns=123, height=48, width=64)
        np.testing.assert_array_equal(pixels, frame)
        pixels[:] = 0  # a copy: the slot is untouched
        np.testing.assert_array_equal(reader.read(0), frame)
        assert reader.stats.as_dict() == {
            "written": 0,
            "read": 2,
            "dropped": 0,
            "torn": 0,
            "unavailable": 0,
        }
        assert ring.stats.written == 2
    finally:
        reader.close()


def test_wrap_around_drops_overwritten_seqs(ring: FrameRing) -> None:
    frames = [_frame(48, 64, i) for i in range(10)]
    seqs = [ring.write(f) for f in frames]
    assert seqs == list(range(10))
    assert ring.latest_seq == 9
    assert [ring.slot_of(s) for s in (0, 5, 9)] == [0, 1, 1]
    for seq in range(6):  # slots=4: only 6..9 survive
        assert ring.read(seq) is None and ring.last_miss == "dropped"
    for seq in range(6, 10):
        np.testing.assert_array_equal(ring.read(seq), frames[seq])
    assert ring.stats.dropped == 6
    assert ring.stats.read == 4


def test_unwritten_and_negative_seqs_are_unavailable(ring: FrameRing) -> None:
    assert ring.read(0) is None and ring.last_miss == "unavailable"  # empty ring
    ring.write(_frame(4, 4, 0))
    assert ring.read(1) is None
    assert ring.read(10**12) is None
    assert ring.read(-1) is None
    assert ring.stats.unavailable == 4
    assert ring.stats.dropped == 0
    with pytest.raises(TypeError):
        ring.read(1.5)  # type: ignore[call-overload]


def test_variable_sizes_and_non_contiguous_input(ring: FrameRing) -> None:
    big = _frame(96, 128, 7)
    cases = [_frame(1, 1, 1), _frame(48, 64, 2), _frame(17, 3, 3), big[::2, ::2], big[:30, 5:60]]
    cases.append(np.ascontiguousarray(big[:20, :20, ::-1]))
    cases.append(big[:20, :20, ::-1])  # negative channel stride
    for frame in cases:
        seq = ring.write(frame)
        got = ring.read(seq, with_meta=True)
        assert got is not None
        assert got[0].shape == frame.shape == (got[1].height, got[1].width, 3)
        np.testing.assert_array_equal(got[0], frame)


def test_read_into_out_buffer(ring: FrameRing) -> None:
    small, full = _frame(10, 20, 1), _frame(48, 64, 2)
    out = np.zeros((48, 64, 3), np.uint8)
    ring.write(small)
    ring.write(full)
    got = ring.read(0, out=out)
    assert got is not None and got.shape == (10, 20, 3)
    assert np.shares_memory(got, out)
    np.testing.assert_array_equal(got, small)
    np.testing.assert_array_equal(out.reshape(-1)[: small.size], small.reshape(-1))
    flat = np.empty(48 * 64 * 3, np.uint8)
    np.testing.assert_array_equal(ring.read(1, out=flat), full)
    with pytest.raises(ValueError, match=r"out has 100 elements, frame needs 9216"):
        ring.read(1, out=np.empty(100, np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        ring.read(1, out=np.empty(48 * 64 * 3, np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        ring.read(1, out=np.empty((64, 48, 3), np.uint8).transpose(1, 0, 2))


def test_read_without_out_returns_a_copy_the_ring_cannot_change(ring: FrameRing) -> None:
    first = _frame(8, 8, 1)
    got = ring.read(ring.write(first))
    for i in range(ring.slots):  # the writer laps the ring: every slot overwritten
        ring.write(_frame(8, 8, 2 + i))
    np.testing.assert_array_equal(got, first)
    assert got.flags.owndata and got.flags.writeable and got.shape == (8, 8, 3)


def test_frame_overwritten_during_the_copy_is_torn(ring: FrameRing,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The seqlock: the word is loaded again after the copy, so a writer that laps the
    reader while it copies is caught (here the lap happens inside the reader's copy)."""
    reader = FrameRing.attach(ring.name)
    real_copyto, lapped = np.copyto, []

    def copy_then_lap(dst: np.ndarray, src: np.ndarray, **kwargs: Any) -> None:
        real_copyto(dst, src, **kwargs)
        if not lapped:
            lapped.append(True)
            for i in range(ring.slots):
                ring.write(_frame(8, 8, 10 + i))

    try:
        seq = ring.write(_frame(8, 8, 1))
        monkeypatch.setattr(np, "copyto", copy_then_lap)
        assert reader.read(seq) is None
        monkeypatch.undo()
        assert lapped and reader.stats.torn == 1 and reader.stats.read == 0
        assert reader.last_miss == "torn"
        latest = reader.read(reader.latest_seq)  # the ring itself is fine
        np.testing.assert_array_equal(latest, _frame(8, 8, 10 + ring.slots - 1))
    finally:
        reader.close()


def test_capture_time_beyond_int64_is_refused_before_the_slot_is_touched(
        ring: FrameRing) -> None:
    reader = FrameRing.attach(ring.name)
    try:
        seq = ring.write(_frame(8, 8, 1), t_capture_ns=5)
        for bad in (2**63, -(2**63) - 1):
            with pytest.raises(ValueError, match="does not fit in int64"):
                ring.write(_frame(8, 8, 2), t_capture_ns=bad)
        assert ring.latest_seq == seq and ring.stats.written == 1
        assert reader.read(seq, with_meta=True)[1].t_capture_ns == 5
        low = ring.write(_frame(8, 8, 3), t_capture_ns=-(2**63))
        assert reader.read(low, with_meta=True)[1].t_capture_ns == -(2**63)
    finally:
        reader.close()


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (np.zeros((49, 64, 3), np.uint8), r"49x64 is larger than .* maximum 48x64"),
        (np.zeros((48, 65, 3), np.uint8), r"48x65 is larger"),
        (np.zeros((8, 8, 3), np.float32), r"dtype must be uint8, got float32"),
        (np.zeros((8, 8, 3), np.uint16), r"dtype must be uint8, got uint16"),
        (np.zeros((8, 8), np.uint8), r"got ndim 2 .*frame\[\.\.\., None\]"),
        (np.zeros((1, 8, 8, 3), np.uint8), r"got ndim 4"),
        (np.zeros((8, 8, 4), np.uint8), r"frame has 4 channels, ring .* holds 3"),
        (np.zeros((0, 8, 3), np.uint8), r"frame is empty"),
    ],
)
def test_bad_frames_raise_value_error(ring: FrameRing, frame: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ring.write(frame)
    assert ring.latest_seq == -1 and ring.stats.written == 0


def test_non_array_frame_raises_type_error(ring: FrameRing) -> None:
    with pytest.raises(TypeError, match="numpy array, got list"):
        ring.write([[[0, 0, 0]]])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"slots": 1}, r"slots must be >= 2"),
        ({"slots": 0}, r"slots must be > 0"),
        ({"max_height": 0}, r"max_height must be > 0"),
        ({"max_width": -3}, r"max_width must be > 0"),
        ({"channels": 0}, r"channels must be > 0"),
        ({"max_width": 2.5}, r"max_width must be an integer"),
        ({"slots": True}, r"slots must be an integer"),
        ({"max_height": 100_000, "max_width": 100_000}, r"over the cap .*MAX_RING_BYTES"),
    ],
)
def test_bad_create_arguments(name: str, kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"slots": 4, "max_height": 8, "max_width": 8} | kwargs
    with pytest.raises(ValueError, match=message):
        FrameRing.create(name, **args)
    assert not (SHM / name).exists()
    assert MAX_RING_BYTES < 100_000 * 100_000 * 3


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("a/b", "must not contain '/'"),
        ("x" * 201, r"1\.\.200 characters"),
        ("", r"1\.\.200"),
        (".hidden", "must not start"),
        ("sp ace", "letters, digits"),
        (7, "must be a str"),
    ],
)
def test_bad_names(bad: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FrameRing.create(bad, 2, 4, 4)
    with pytest.raises(ValueError, match=message):
        FrameRing.attach(bad)


def test_attach_missing_ring(name: str) -> None:
    with pytest.raises(RingError, match=rf"no ring named '{name}'.*is the capture running\?"):
        FrameRing.attach(name)


def test_ring_id_is_the_creators_and_new_per_ring(name: str) -> None:
    """A reader sees its creator's id, and a ring re-created under the same name (a restarted
    capture) has another one: notices carry it so that readers tell the two apart."""
    ids = []
    for _ in range(2):
        with FrameRing.create(name, 2, 4, 4) as ring:
            reader = FrameRing.attach(name)
            assert reader.ring_id == ring.ring_id > 0
            ids.append(ring.ring_id)
            reader.close()
    assert ids[0] != ids[1]


def _raw_segment(name: str, size: int, head: bytes = b"") -> SharedMemory:
    shm = SharedMemory(name=name, create=True, size=size)
    shm.buf[: len(head)] = head
    return shm


@pytest.mark.parametrize(
    ("size", "head", "message"),
    [
        (4096, b"GARBAGE!", r"is not a FrameRing: magic .* is bad"),
        (4096, b"", r"is not a FrameRing: magic 0x0 is blank"),
        (64, b"", r"is 64 bytes, too small for a FrameRing"),
    ],
)
def test_attach_foreign_segment(name: str, size: int, head: bytes, message: str) -> None:
    shm = _raw_segment(name, size, head)
    try:
        with pytest.raises(RingError, match=message):
            FrameRing.attach(name)
    finally:
        shm.close()
        shm.unlink()


@pytest.mark.parametrize(
    ("word", "value", "message"),
    [
        (1, 99, r"layout version 99, this code reads 2"),
        (7, 12345, r"total 12345 bytes"),
        (2, 1, r"corrupt header: slots must be >= 2"),
    ],
)
def test_attach_bad_header(ring: FrameRing, word: int, value: int, message: str) -> None:
    ring._ring_hdr[word] = value
    with pytest.raises(RingError, match=message):
        FrameRing.attach(ring.name)


def test_segment_is_owner_only(ring: FrameRing) -> None:
    mode = os.stat(SHM / ring.name).st_mode
    assert mode & 0o777 == 0o600


def test_stale_segment_is_reported_never_reused(name: str) -> None:
    crashed = FrameRing.create(name, slots=2, max_height=4, max_width=4)
    try:
        crashed.write(_frame(4, 4, 5))
        crashed._ring_hdr[9] = _dead_pid()  # the creator pid word: pretend it crashed
        with pytest.raises(StaleRingError) as info:
            FrameRing.create(name, slots=8, max_height=16, max_width=16)
        message = str(info.value)
        for part in (
            f"named '{name}' already exists",
            "no longer running",
            f"FrameRing.unlink_stale('{name}')",
            f"rm /dev/shm/{name}",
            "never reused",
        ):
            assert part in message
        assert isinstance(info.value, FileExistsError)
        assert crashed.latest_seq == 0  # untouched
        assert FrameRing.unlink_stale(name) is True
        assert not (SHM / name).exists()
        assert FrameRing.unlink_stale(name) is False
        with FrameRing.create(name, slots=8, max_height=16, max_width=16) as fresh:
            assert fresh.latest_seq == -1
    finally:
        crashed.close()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(JOIN_S)
    return proc.pid


def test_lifecycle_rules(ring: FrameRing) -> None:
    ring.write(_frame(4, 4, 1))
    with FrameRing.attach(ring.name) as reader:
        with pytest.raises(RingError, match="only the creator may unlink"):
            reader.unlink()
        with pytest.raises(TypeError, match="attach"):
            pickle.dumps(reader)
        assert not reader.owner and ring.owner
    assert reader.closed
    for call in (
        lambda: reader.read(0),
        lambda: reader.write(_frame(4, 4, 1)),
        lambda: reader.latest_seq,
    ):
        with pytest.raises(RingError, match="is closed"):
            call()
    reader.close()  # idempotent
    assert (SHM / ring.name).exists()  # a reader's exit never unlinks
    assert "closed" in repr(reader) and "owner" in repr(ring)


def test_creator_context_manager_unlinks(name: str) -> None:
    with FrameRing.create(name, 2, 4, 4) as ring:
        assert (SHM / name).exists()
    assert ring.closed and not (SHM / name).exists()
    ring.unlink()  # idempotent


def test_round_trip_property(name: str) -> None:
    with FrameRing.create(name, slots=3, max_height=40, max_width=40, channels=2) as ring:

        @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(
            h=st.integers(1, 40),
            w=st.integers(1, 40),
            step=st.sampled_from([1, 2, -1]),
            seed=st.integers(0, 2**32 - 1),
            t=st.integers(0, 2**63 - 1),
        )
        def check(h: int, w: int, step: int, seed: int, t: int) -> None:
            base = _frame(40, 40, seed, c=2)[:: abs(step), ::step]
            frame = base[:h, :w]
            seq = ring.write(frame, t_capture_ns=t)
            got = ring.read(seq, with_meta=True)
            assert got is not None
            assert got[1] == FrameMeta(seq, t, frame.shape[0], frame.shape[1])
            np.testing.assert_array_equal(got[0], frame)

        check()


# ----------------------------------------------------------------------------- processes

# Torture test: frames whose every 8-byte word identifies their seq, so a frame mixing two
# writes (torn) or belonging to another seq (mismatched) can never pass the check.
TORTURE_SLOTS = 4
TORTURE_SHAPES = [(256, 256, 3), (192, 256, 3), (128, 320, 3)]  # H*W*C divisible by 8
TORTURE_MAX = (256, 320)
_GOLDEN = 0x9E3779B97F4A7C15
_WORD_MIX = np.uint64(0xD1B54A32D192ED03)


def _shape_for(seq: int) -> tuple[int, int, int]:
    return TORTURE_SHAPES[seq % len(TORTURE_SHAPES)]


def _t_for(seq: int) -> int:
    return seq * 3 + 1


def _stamp(seq: int, words: np.ndarray) -> np.ndarray:
    """Fill ``words`` (uint64) with seq's pattern in place; word 0 is the seq itself."""
    words[:] = np.arange(words.size, dtype=np.uint64) * _WORD_MIX
    words += np.uint64((seq * _GOLDEN) % 2**64)
    words[0] = seq
    return words


def _torture_writer(name: str, duration_s: float, barrier: Any, results: Any) -> None:
    ring = FrameRing.attach(name)  # the single writer need not be the creator
    max_words = TORTURE_MAX[0] * TORTURE_MAX[1] * 3 // 8
    patterns = {}  # precomputed base patterns per shape: the writer runs at full speed
    for shape in TORTURE_SHAPES:
        patterns[shape] = _stamp(0, np.empty(int(np.prod(shape)) // 8, np.uint64))
    buf = np.empty(max_words, np.uint64)
    barrier.wait(JOIN_S)
    deadline, last = time.monotonic() + duration_s, -1
    while time.monotonic() < deadline:
        seq = last + 1
        shape = _shape_for(seq)
        words = buf[: int(np.prod(shape)) // 8]
        np.add(patterns[shape], np.uint64((seq * _GOLDEN) % 2**64), out=words)
        words[0] = seq
        last = ring.write(words.view(np.uint8).reshape(shape), t_capture_ns=_t_for(seq))
        if last != seq:
            results.put({"role": "writer", "error": f"write returned {last}, expected {seq}"})
            return
    results.put({"role": "writer", "last": last, **ring.stats.as_dict()})
    ring.close()


def _pick_seq(attempt: int, latest: int, rng: random.Random) -> int:
    mode = attempt % 4
    if mode == 0:
        return latest
    if mode == 1:  # a recent one, possibly already gone (or negative early on)
        return latest - rng.randint(1, TORTURE_SLOTS + 2)
    if mode == 2:  # the future
        return latest + 1 + rng.randint(0, 3)
    return latest - (TORTURE_SLOTS - 1)  # the oldest: the slot the writer takes next


def _check_frame(seq: int, got: tuple[np.ndarray, FrameMeta], expect: np.ndarray) -> str:
    frame, meta = got
    shape = _shape_for(seq)
    if meta != FrameMeta(seq, _t_for(seq), shape[0], shape[1]) or frame.shape != shape:
        return f"seq {seq}: meta {meta} shape {frame.shape}"
    words = frame.reshape(-1).view(np.uint64)
    if not np.array_equal(words, _stamp(seq, expect[: words.size])):
        bad = np.flatnonzero(words != expect[: words.size])
        return f"seq {seq}: {bad.size} words differ, first at {bad[0]}, word0={words[0]}"
    return ""


def _torture_reader(name: str, seed: int, stop: Any, barrier: Any, results: Any) -> None:
    ring = FrameRing.attach(name)
    rng = random.Random(seed)
    max_bytes = TORTURE_MAX[0] * TORTURE_MAX[1] * 3
    out, expect = np.empty(max_bytes, np.uint8), np.empty(max_bytes // 8, np.uint64)
    attempts, ok, errors = 0, 0, []
    barrier.wait(JOIN_S)
    while not stop.is_set():
        seq = _pick_seq(attempts, ring.latest_seq, rng)
        got = ring.read(seq, out=out if attempts % 2 else None, with_meta=True)
        attempts += 1
        if got is None:
            continue
        error = _check_frame(seq, got, expect)
        if error:
            errors.append(error)
        else:
            ok += 1
    results.put(
        {
            "role": "reader",
            "attempts": attempts,
            "ok": ok,
            "errors": errors[:5],
            "n_errors": len(errors),
            **ring.stats.as_dict(),
        }
    )
    ring.close()


def _run_torture(name: str, n_readers: int, duration_s: float) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    barrier, stop, results = ctx.Barrier(n_readers + 1), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_torture_writer, args=(name, duration_s, barrier, results))]
    procs += [
        ctx.Process(target=_torture_reader, args=(name, i, stop, barrier, results))
        for i in range(n_readers)
    ]
    try:
        for proc in procs:
            proc.start()
        reports = [results.get(timeout=JOIN_S + duration_s)]  # the writer's, when it stops
        stop.set()
        reports += [results.get(timeout=JOIN_S) for _ in range(n_readers)]
        for proc in procs:
            proc.join(JOIN_S)
            assert proc.exitcode == 0, f"{proc.name} exit code {proc.exitcode}"
        return reports
    finally:
        stop.set()
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)


@pytest.mark.timeout(90)
def test_torture_one_writer_many_readers(name: str) -> None:
    h, w = TORTURE_MAX
    with FrameRing.create(name, slots=TORTURE_SLOTS, max_height=h, max_width=w) as ring:
        reports = _run_torture(name, n_readers=3, duration_s=3.0)
        writer = next(r for r in reports if r["role"] == "writer")
        readers = [r for r in reports if r["role"] == "reader"]
        assert "error" not in writer, writer
        assert writer["written"] == writer["last"] + 1 == ring.latest_seq + 1
        assert writer["written"] > 1000, writer
        for rep in readers:
            assert rep["n_errors"] == 0, rep["errors"]  # never a torn or mismatched frame
            assert rep["ok"] == rep["read"] > 0, rep
            misses = rep["dropped"] + rep["torn"] + rep["unavailable"]
            assert rep["read"] + misses == rep["attempts"], rep
        totals = {k: sum(r[k] for r in readers) for k in ("dropped", "torn", "unavailable")}
        assert all(v > 0 for v in totals.values()), (totals, readers)


_CHILD_ATTACH = """
import sys
from iwm_bus.bus.ring import FrameRing
name, mode = sys.argv[1], sys.argv[2]
ring = FrameRing.attach(name)
frame = ring.read(ring.latest_seq)
assert frame is not None and int(frame[0, 0, 0]) == 7, frame
if mode == "close":
    ring.close()
elif mode == "with":
    with ring:
        pass
print("ok", mode)
"""


def _python(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=JOIN_S
    )


def _assert_quiet(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stderr
    for word in ("resource_tracker", "leaked", "Traceback", "Warning"):
        assert word not in proc.stderr, proc.stderr


@pytest.mark.parametrize("mode", ["close", "with", "exit-without-close"])
def test_readers_in_other_processes_leave_no_trace(name: str, mode: str) -> None:
    ring = FrameRing.create(name, slots=2, max_height=4, max_width=4)
    try:
        ring.write(np.full((4, 4, 3), 7, np.uint8))
        for _ in range(2):
            proc = _python(["-c", _CHILD_ATTACH, name, mode])
            _assert_quiet(proc)
            assert f"ok {mode}" in proc.stdout
            assert (SHM / name).exists()  # the reader's exit did not unlink it
        ring.unlink()
        assert not (SHM / name).exists()
    finally:
        ring.close()


_SPAWN_SCRIPT = """
import multiprocessing as mp
import sys
import numpy as np
from iwm_bus.bus.ring import FrameRing

def reader(name, close):
    ring = FrameRing.attach(name)
    assert ring.read(0) is not None
    if close:
        ring.close()

if __name__ == "__main__":
    name = sys.argv[1]
    ctx = mp.get_context("spawn")  # children share this process's resource tracker
    with FrameRing.create(name, slots=2, max_height=4, max_width=4) as ring:
        ring.write(np.zeros((4, 4, 3), np.uint8))
        procs = [ctx.Process(target=reader, args=(name, i % 2 == 0)) for i in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(20)
            assert p.exitcode == 0, p.exitcode
    print("ok")
"""


def test_spawned_readers_sharing_the_tracker_are_quiet(name: str, tmp_path: Path) -> None:
    script = tmp_path / "spawn_readers.py"
    script.write_text(textwrap.dedent(_SPAWN_SCRIPT))
    proc = _python([str(script), name])
    _assert_quiet(proc)
    assert "ok" in proc.stdout
    assert not (SHM / name).exists()


def test_reclaim_dead_leaves_a_live_creators_ring() -> None:
    from iwm_bus.bus.ring import reclaim_dead

    name = f"iwmlive_{os.getpid()}_{os.urandom(3).hex()}"
    with FrameRing.create(name, slots=2, max_height=4, max_width=4):
        assert reclaim_dead(prefix="iwmlive_") == []
        assert os.path.exists(f"/dev/shm/{name}")


def test_reclaim_dead_takes_a_blank_segment_of_a_dead_launcher() -> None:
    """A capture killed between creating its segment and writing the header leaves it
    blank (no creator pid): it is reclaimed once the launcher in its name is gone and it is
    old enough, never while that launcher lives or while it is fresh."""
    from iwm_bus.bus.ring import reclaim_dead

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(30)
    tag = os.urandom(3).hex()
    old_blank = SHM / f"iwmblank_{dead.pid}_{tag}"
    fresh_blank = SHM / f"iwmblank_{dead.pid}_{tag}f"
    live_blank = SHM / f"iwmblank_{os.getpid()}_{tag}"
    for path in (old_blank, fresh_blank, live_blank):
        path.write_bytes(bytes(4096))
    past = time.time() - 60
    for path in (old_blank, live_blank):
        os.utime(path, (past, past))
    try:
        gone = reclaim_dead(prefix="iwmblank_")
        assert [g[0] for g in gone] == [old_blank.name]
        assert not old_blank.exists() and fresh_blank.exists() and live_blank.exists()
    finally:
        for path in (old_blank, fresh_blank, live_blank):
            path.unlink(missing_ok=True)
