"""Transport: pub/sub across spawned processes over ipc and tcp, stalls, malformed frames.

    .venv/bin/pytest tests/test_transport.py -q
"""

from __future__ import annotations

import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from iwm_bus.bus import topics, wire
from iwm_bus.bus.transport import MAX_IPC_PATH, Endpoints, Publisher, Subscriber

#: every wait in a child or in the parent ends after this long
WAIT_S = 30.0
N_IN_ORDER = 500  # below the default HWMs, so nothing may be dropped


def _stats(i: int = 0) -> dict[str, Any]:
    return {"t_ns": time.monotonic_ns(), "source": "test", "values": {"i": i}}


def _frame(seq: int, pixels: np.ndarray | None = None) -> dict[str, Any]:
    return {"seq": seq, "slot": seq % 8, "t_capture_ns": time.monotonic_ns(), "height": 1,
            "width": 1, "channels": 3, "pixels": pixels, "source": "test"}


def _sync_publish(pub: Publisher, ready: Any) -> None:
    """Send stats until the subscriber says it is connected (PUB/SUB slow joiner)."""
    deadline = time.monotonic() + WAIT_S
    i = 0
    while not ready.wait(0.02):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{pub}: subscriber never reported ready")
        pub.send(topics.STATS, _stats(i))
        i += 1


def _sync_subscribe(sub: Subscriber, ready: Any) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        got = sub.recv(timeout_ms=100)
        if got is not None and got[0] == topics.STATS:
            ready.set()
            return
    raise TimeoutError(f"{sub}: no sync message within {WAIT_S} s")


# ------------------------------------------------------------------ children (spawned)


def publisher_main(endpoint: str, n: int, ready: Any, done: Any) -> None:
    """Bind a PUB, sync with the subscriber, send frames 0..n-1, wait until told to stop."""
    with Publisher(endpoint) as pub:
        _sync_publish(pub, ready)
        for seq in range(n):
            pub.send(topics.FRAME, _frame(seq))
        done.wait(WAIT_S)


def stalled_subscriber_main(endpoint: str, ready: Any, sent_all: Any, drained: Any,
                            out: Any) -> None:
    """Connect with a tiny HWM, sync, stop reading until the publisher is done, then drain."""
    with Subscriber([endpoint], [topics.FRAME, topics.STATS], hwm=2) as sub:
        sub.sock.setsockopt(zmq.RCVBUF, 64 * 1024)
        _sync_subscribe(sub, ready)
        sent_all.wait(WAIT_S)  # stall: read nothing while the publisher sends
        seqs: list[int] = []
        quiet_since = time.monotonic()
        final_seq = None
        deadline = time.monotonic() + WAIT_S
        while final_seq is None and time.monotonic() < deadline:
            got = sub.recv(timeout_ms=50)
            if got is None:
                if time.monotonic() - quiet_since > 0.5:
                    drained.set()  # queue empty: the publisher now sends the final frame
                continue
            quiet_since = time.monotonic()
            topic, msg = got
            if topic == topics.FRAME:
                seqs.append(msg["seq"])
                if msg["pixels"] is None:
                    final_seq = msg["seq"]
        out.put({"seqs": seqs, "gaps": sub.gaps, "decode_errors": sub.decode_errors})


# ------------------------------------------------------------------ pub/sub across processes


@pytest.mark.parametrize("scheme", ["ipc", "tcp"])
def test_pubsub_across_processes_in_order(scheme: str, run_dir: Path, free_port: int,
                                          spawn: Any, mp_ctx: Any, zmq_ctx: zmq.Context) -> None:
    eps = Endpoints.ipc(run_dir) if scheme == "ipc" else Endpoints.tcp("127.0.0.1", free_port)
    ready, done = mp_ctx.Event(), mp_ctx.Event()
    proc = spawn(publisher_main, eps.capture, N_IN_ORDER, ready, done)
    try:
        with Subscriber([eps.capture], [topics.FRAME, topics.STATS], ctx=zmq_ctx) as sub:
            _sync_subscribe(sub, ready)
            seqs = []
            deadline = time.monotonic() + WAIT_S
            while len(seqs) < N_IN_ORDER and time.monotonic() < deadline:
                got = sub.recv(timeout_ms=1000)
                if got is not None and got[0] == topics.FRAME:
                    seqs.append(got[1]["seq"])
            assert seqs == list(range(N_IN_ORDER))
            assert sub.gaps == 0 and sub.decode_errors == 0
    finally:
        done.set()
    proc.join(WAIT_S)
    assert proc.exitcode == 0


@pytest.mark.parametrize("scheme", ["ipc", "tcp"])
def test_stalled_subscriber_never_blocks_publisher(scheme: str, run_dir: Path, free_port: int,
                                                   spawn: Any, mp_ctx: Any,
                                                   zmq_ctx: zmq.Context) -> None:
    eps = Endpoints.ipc(run_dir) if scheme == "ipc" else Endpoints.tcp("127.0.0.1", free_port)
    n, size = 300, 256 * 1024  # 75 MiB against HWMs of 2 messages: most must be dropped
    ready, sent_all, drained = mp_ctx.Event(), mp_ctx.Event(), mp_ctx.Event()
    out = mp_ctx.Queue()
    pixels = np.full(size, 7, np.uint8)
    with Publisher(eps.capture, hwm=2, ctx=zmq_ctx) as pub:
        pub.sock.setsockopt(zmq.SNDBUF, 64 * 1024)
        proc = spawn(stalled_subscriber_main, eps.capture, ready, sent_all, drained, out)
        _sync_publish(pub, ready)
        slowest = 0.0
        t0 = time.perf_counter()
        for seq in range(n):
            frames = wire.pack(topics.FRAME, _frame(seq, pixels))
            t = time.perf_counter()
            pub.send_frames(frames)
            slowest = max(slowest, time.perf_counter() - t)
        send_s = time.perf_counter() - t0
        sent_all.set()
        assert drained.wait(WAIT_S), "subscriber never drained its queue"
        # the final frame (seq n, no pixels) goes to an empty queue; repeat until it lands
        deadline = time.monotonic() + WAIT_S
        while proc.is_alive() and out.empty() and time.monotonic() < deadline:
            pub.send(topics.FRAME, _frame(n))
            time.sleep(0.05)
        report = out.get(timeout=WAIT_S)
    proc.join(WAIT_S)
    assert proc.exitcode == 0
    seqs = report["seqs"]
    # a blocking send would never return while the subscriber stalls; these bounds are loose
    assert slowest < 2.0 and send_s < 20.0, (slowest, send_s)
    assert seqs == sorted(set(seqs)), "frames arrived out of order or twice"
    assert seqs[-1] == n
    assert 0 < report["gaps"] < n
    assert len(seqs) + report["gaps"] == n + 1  # received + gaps == sent
    assert report["decode_errors"] == 0


# ------------------------------------------------------------------ malformed frames


def test_malformed_frames_counted_and_skipped(run_dir: Path, zmq_ctx: zmq.Context) -> None:
    eps = Endpoints.ipc(run_dir)
    raw_pub = zmq_ctx.socket(zmq.PUB)
    raw_pub.setsockopt(zmq.LINGER, 0)
    raw_pub.bind(eps.capture)
    good_stats = wire.pack(topics.STATS, _stats())
    bad = [
        [b"iwm.frame", b"\xc1garbage"],
        [b"iwm.frame", os.urandom(64)],
        [b"iwm.frame"],
        [b"iwm.frame", b"x", b"y"],
        [b"iwm.frame", good_stats[1]],  # a stats message on the frame topic
        [b"iwm.frame", wire.pack(topics.FRAME, _frame(0))[1][:-3]],  # truncated
    ]
    with Subscriber([eps.capture], [topics.FRAME, topics.STATS], ctx=zmq_ctx) as sub:
        deadline = time.monotonic() + WAIT_S
        while sub.recv(timeout_ms=20) is None:  # slow joiner: wait for the first stats
            assert time.monotonic() < deadline, "subscriber never connected"
            raw_pub.send_multipart(good_stats)
        while sub.recv(timeout_ms=200) is not None:  # drain duplicate sync messages
            pass
        for frames in bad:
            raw_pub.send_multipart(frames)
        # prefix-matches, a topic this side does not know: a newer publisher's, passed over
        raw_pub.send_multipart([b"iwm.framez", wire.pack(topics.FRAME, _frame(0))[1]])
        raw_pub.send_multipart(wire.pack(topics.FRAME, _frame(5)))
        got = sub.recv(timeout_ms=int(WAIT_S * 1000))
        assert got is not None, "subscriber stopped after malformed frames"
        assert got[0] == topics.FRAME and got[1]["seq"] == 5
        assert sub.decode_errors == len(bad) and sub.unknown.kinds == 1
        # decode() on raw frames counts the same way (used by asyncio callers)
        assert sub.decode([b"iwm.frame", b"\x00"]) is None
        assert sub.decode_errors == len(bad) + 1
    raw_pub.close(linger=0)


def test_gap_counting_per_topic_and_source(zmq_ctx: zmq.Context, run_dir: Path) -> None:
    with Subscriber([Endpoints.ipc(run_dir).worker], [topics.FRAME], ctx=zmq_ctx) as sub:
        for seq in (0, 1, 4, 3, 5):  # 2 missing; 3 late (not a new gap)
            assert sub.decode(wire.pack(topics.FRAME, _frame(seq))) is not None
        other = {**_frame(10), "source": "other"}  # another source has its own seq
        assert sub.decode(wire.pack(topics.FRAME, other)) is not None
        assert sub.gaps == 2 and sub.received == 6


def test_send_frames_delivers_every_part_intact(run_dir: Path, zmq_ctx: zmq.Context) -> None:
    """Small parts are copied, payloads of 64 KiB and more go zero-copy; either way a
    message arrives whole, as one multipart message, in order."""
    eps = Endpoints.ipc(run_dir)
    raw_sub = zmq_ctx.socket(zmq.SUB)
    raw_sub.setsockopt(zmq.LINGER, 0)
    raw_sub.setsockopt(zmq.SUBSCRIBE, b"iwm.")
    big = np.random.default_rng(0).integers(0, 256, 300_000, np.uint8).tobytes()
    messages = [[b"iwm.a", b"small"], [b"iwm.b", big], [b"iwm.c", b"x", big, b"tail"],
                [b"iwm.d"]]
    with Publisher(eps.capture, ctx=zmq_ctx) as pub:
        raw_sub.connect(eps.capture)
        deadline = time.monotonic() + WAIT_S
        while not raw_sub.poll(20):  # slow joiner: wait for the first sync message
            assert time.monotonic() < deadline, "subscriber never connected"
            assert pub.send_frames([b"iwm.sync", b""])
        while raw_sub.poll(200):
            raw_sub.recv_multipart()
        for parts in messages:
            assert pub.send_frames(parts)
        got = [raw_sub.recv_multipart() for _ in messages if raw_sub.poll(WAIT_S * 1000)]
        assert got == messages
        assert pub.dropped == 0 and pub.sent >= len(messages) + 1
    raw_sub.close(linger=0)


# ------------------------------------------------------------------ endpoints and files


def test_ipc_socket_files_are_owner_only(run_dir: Path, zmq_ctx: zmq.Context) -> None:
    eps = Endpoints.ipc(run_dir)
    with Publisher(eps.capture, ctx=zmq_ctx), Publisher(eps.worker, ctx=zmq_ctx):
        for path in eps.socket_files()[:2]:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == 0o600, f"{path} has mode {oct(mode)}"


def test_bind_conflict_is_a_clear_error(free_port: int, zmq_ctx: zmq.Context) -> None:
    ep = Endpoints.tcp("127.0.0.1", free_port).capture
    with Publisher(ep, ctx=zmq_ctx):
        with pytest.raises(OSError, match=f"cannot bind {ep}"):
            Publisher(ep, ctx=zmq_ctx)


def test_ipc_path_too_long(tmp_path: Path) -> None:
    long_dir = Path("/tmp") / ("d" * (MAX_IPC_PATH - len("/tmp/") - len("capture.sock")))
    with pytest.raises(ValueError, match="too long"):
        Endpoints.ipc(long_dir)
    eps = Endpoints.ipc("/tmp/x")
    assert eps.capture == "ipc:///tmp/x/capture.sock"
    assert [p.name for p in eps.socket_files()] == ["capture.sock", "worker.sock", "rpc.sock",
                                                    "agent.sock"]


def test_parse_tcp_and_ipc_specs(run_dir: Path) -> None:
    eps = Endpoints.parse("tcp://127.0.0.1:6000")
    assert (eps.capture, eps.worker, eps.rpc, eps.agent) == tuple(
        f"tcp://127.0.0.1:{p}" for p in range(6000, 6004))
    assert eps.socket_files() == []
    assert Endpoints.parse("tcp://host.lan:7000").agent == "tcp://host.lan:7003"
    assert Endpoints.parse(run_dir) == Endpoints.ipc(run_dir)
    for bad in ["tcp://127.0.0.1", "tcp://:6000", "tcp://h:port", "tcp://h:"]:
        with pytest.raises(ValueError, match="tcp://HOST:PORT"):
            Endpoints.parse(bad)
    for port in (0, 65533, 70000):
        with pytest.raises(ValueError, match="base_port"):
            Endpoints.parse(f"tcp://127.0.0.1:{port}")


def test_bind_refuses_a_live_ipc_path_and_replaces_a_stale_one():
    import socket as pysocket

    d = tempfile.mkdtemp(dir="/tmp")
    ep = Endpoints.ipc(d).agent
    path = ep[len("ipc://"):]
    first = Publisher(ep)
    try:
        with pytest.raises(OSError, match="in use by a running process"):
            Publisher(ep)
    finally:
        first.close()
    assert not os.path.exists(path), "close removes the socket file it bound"
    stale = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    stale.bind(path)  # a file nobody listens on, as a SIGKILLed process leaves it
    stale.close()
    with Publisher(ep):
        assert os.path.exists(path)
    assert not os.path.exists(path)
