"""Tests of workers.capture with real processes (spawn), a real FrameRing and real sockets:
frame notices and ring pixels, lossless credits against a fake worker, agent actions driving
the source, recorded pacing, SIGTERM, and a frame larger than the ring."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from PIL import Image

from iwm_bus.bus import topics
from iwm_bus.bus.ring import FrameRing, clock_ns
from iwm_bus.bus.transport import Endpoints, Publisher, Subscriber
from iwm_bus.bus.wire import make_action
from iwm_bus.config import RingConfig
from workers.capture import CaptureConfig, run_capture
from workers.entry import exit_with
from workers.sources import SyntheticSource

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def ring_name() -> Iterator[str]:
    """A fresh ring name; a segment a failed test left behind is removed at teardown."""
    name = f"iwmtest_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    yield name
    FrameRing.unlink_stale(name)


def shm_exists(name: str) -> bool:
    return Path("/dev/shm", name).exists()


def square_x(pixels: np.ndarray) -> int:
    xs = np.nonzero(np.all(pixels == 255, axis=2))[1]
    assert xs.size, "no white square in the frame"
    return int(xs.min())


class Watcher:
    """A SUB on the capture endpoint that reads each noticed frame out of the ring."""

    def __init__(self, eps: Endpoints, ring_name: str, ctx: zmq.Context) -> None:
        self.sub = Subscriber([eps.capture], [topics.FRAME, topics.STATS, topics.ACTION],
                              ctx=ctx)
        self.ring_name = ring_name
        self.ring: FrameRing | None = None
        self.notices: list[dict[str, Any]] = []
        self.pixels: dict[int, np.ndarray] = {}
        self.stats: list[dict[str, Any]] = []
        self.actions: list[dict[str, Any]] = []  # agent.action re-published by a replay

    def poll(self, timeout_ms: int = 100) -> dict[str, Any] | None:
        """The next frame notice (its pixels read into ``self.pixels``), or None."""
        got = self.sub.recv(timeout_ms)
        if got is None:
            return None
        topic, msg = got
        if topic == topics.STATS:
            self.stats.append(msg["values"])
            return None
        if topic == topics.ACTION:
            self.actions.append(msg)
            return None
        if self.ring is None:
            self.ring = FrameRing.attach(self.ring_name)
        read = self.ring.read(msg["seq"], with_meta=True)
        if read is not None:
            frame, meta = read
            assert meta.t_capture_ns == msg["t_capture_ns"]
            self.pixels[msg["seq"]] = frame
        self.notices.append(msg)
        return msg

    def until(self, done: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, f"timed out; {len(self.notices)} notices"
            self.poll()

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
        self.sub.close()


@pytest.fixture
def watcher_factory(zmq_ctx: zmq.Context) -> Iterator[Callable[..., Watcher]]:
    made: list[Watcher] = []

    def make(eps: Endpoints, ring_name: str) -> Watcher:
        made.append(Watcher(eps, ring_name, zmq_ctx))
        return made[-1]

    yield make
    for watcher in made:
        watcher.close()


def expected_synthetic(width: int, height: int, seed: int, count: int) -> list[Any]:
    """Frames 0..count-1 of a synthetic source driven by its default policy alone."""
    src = SyntheticSource(width, height, seed=seed)
    return [src.reset()] + [src.step(None) for _ in range(count - 1)]


def test_frames_reach_a_subscriber_and_match_the_source(run_dir, spawn, ring_name,
                                                        watcher_factory) -> None:
    eps = Endpoints.ipc(run_dir)
    cfg = CaptureConfig(source="synthetic:32x24", fps=40, frames=60, seed=2,
                        ring=RingConfig(slots=16, max_height=64, max_width=64))
    watcher = watcher_factory(eps, ring_name)
    proc = spawn(exit_with, run_capture, cfg, eps, ring_name)
    watcher.until(lambda: bool(watcher.notices) and watcher.notices[-1]["seq"] == 59, 30)
    watcher.until(lambda: bool(watcher.stats) and watcher.stats[-1]["frames"] == 60, 10)
    proc.join(10)
    assert proc.exitcode == 0
    assert not shm_exists(ring_name)
    assert not Path(eps.capture[len("ipc://"):]).exists()
    seqs = [n["seq"] for n in watcher.notices]
    assert seqs == sorted(set(seqs)) and len(seqs) >= 30  # increasing; early ones may be missed
    expected = expected_synthetic(32, 24, 2, 60)
    for notice in watcher.notices:
        seq = notice["seq"]
        assert (notice["slot"], notice["height"], notice["width"], notice["channels"]) == (
            seq % 16, 24, 32, 3)
        assert notice["source"] == "synthetic:32x24"
        assert notice["action"] == expected[seq].action
        assert np.array_equal(watcher.pixels[seq], expected[seq].pixels), f"seq {seq}"


#: ring slots of the lossless captures below
LOSSLESS_SLOTS = 4


def _lossless_capture(run_dir, spawn, ring_name, watcher_factory, zmq_ctx, frames: int,
                      **cfg_kw):
    """A lossless synthetic 16x16 capture (``LOSSLESS_SLOTS`` ring slots) with a watcher and a fake worker
    (a PUB on the worker endpoint), started and heard from: (watcher, worker, proc)."""
    eps = Endpoints.ipc(run_dir)
    cfg = CaptureConfig(source="synthetic:16x16", fps=0, mode="lossless", frames=frames,
                        ring=RingConfig(slots=LOSSLESS_SLOTS, max_height=16, max_width=16),
                        **cfg_kw)
    watcher = watcher_factory(eps, ring_name)
    worker = Publisher(eps.worker, ctx=zmq_ctx)
    proc = spawn(exit_with, run_capture, cfg, eps, ring_name)
    watcher.until(lambda: bool(watcher.stats), 20)  # capture is up and waiting; we hear it
    return watcher, worker, proc


def test_lossless_never_runs_more_than_slots_minus_one_ahead(run_dir, spawn, ring_name,
                                                              watcher_factory,
                                                              zmq_ctx) -> None:
    slots, frames = LOSSLESS_SLOTS, 40
    watcher, worker, proc = _lossless_capture(run_dir, spawn, ring_name, watcher_factory,
                                              zmq_ctx, frames, drain_timeout_s=20)
    assert not watcher.notices  # nothing written before the worker spoke
    expected = expected_synthetic(16, 16, 0, frames)
    processed, next_hello = -1, 0.0
    deadline = time.monotonic() + 40
    while processed < frames - 1:
        assert time.monotonic() < deadline, f"stuck at processed seq {processed}"
        if time.monotonic() >= next_hello:
            worker.send(topics.READY, {"t_ns": clock_ns(), "notices": processed + 2,
                                       "restarts": 0})
            next_hello = time.monotonic() + 0.2
        notice = watcher.poll()
        if notice is None:
            continue
        seq = notice["seq"]
        assert seq == processed + 1  # every frame, in order
        assert np.array_equal(watcher.pixels[seq], expected[seq].pixels)
        time.sleep(0.01)  # a worker slower than the capture
        assert watcher.ring.latest_seq - processed <= slots - 1
        processed = seq
        worker.send(topics.SURPRISE, {
            "seq": seq, "t_capture_ns": notice["t_capture_ns"], "t_publish_ns": clock_ns(),
            "surprise": None, "pred_seq": None, "action": notice["action"], "variant": "core"})
    watcher.until(lambda: bool(watcher.stats) and watcher.stats[-1]["frames"] == frames, 10)
    proc.join(15)
    worker.close()
    assert proc.exitcode == 0
    assert not shm_exists(ring_name)
    assert len(watcher.pixels) == frames
    final = watcher.stats[-1]
    assert final["processed_seq"] == frames - 1  # it drained: the worker had every frame
    assert final["credit_wait_s"] > 0  # and it did have to wait for credits


def test_lossless_starts_on_the_workers_ready_not_on_any_stats(run_dir, spawn, ring_name,
                                                                watcher_factory,
                                                                zmq_ctx) -> None:
    """The worker's iwm.ready is the one message a lossless capture starts on: stats on the
    worker endpoint (a remote worker's gateway publishes its own there) are not it."""
    watcher, worker, proc = _lossless_capture(run_dir, spawn, ring_name, watcher_factory,
                                              zmq_ctx, 3)
    for source in ("gateway", "worker"):
        for _ in range(8):
            worker.send(topics.STATS, {"t_ns": clock_ns(), "source": source,
                                       "values": {"ready": 1, "notices": 0}})
            assert watcher.poll(100) is None or not watcher.notices
    assert not watcher.notices  # nothing written on stats alone
    deadline = time.monotonic() + 20
    while not watcher.notices:
        assert time.monotonic() < deadline, "the capture never started on iwm.ready"
        worker.send(topics.READY, {"t_ns": clock_ns(), "notices": 0, "restarts": 0})
        watcher.poll(100)
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(10)
    worker.close()
    assert proc.exitcode == 0


def test_lossless_sends_the_unprocessed_notices_again_to_a_worker_that_took_over(
        run_dir, spawn, ring_name, watcher_factory, zmq_ctx) -> None:
    """A new worker (iwm.ready with a higher restarts) lost the notices its dead predecessor
    got: the capture sends every unprocessed one again, as it was (action included)."""
    watcher, worker, proc = _lossless_capture(run_dir, spawn, ring_name, watcher_factory,
                                              zmq_ctx, 20)

    def ready(restarts: int, notices: int = 1) -> None:
        worker.send(topics.READY, {"t_ns": clock_ns(), "notices": notices,
                                   "restarts": restarts})

    deadline = time.monotonic() + 20
    while len(watcher.notices) < 3:  # 0..2: the credit window (slots - 1) is full
        assert time.monotonic() < deadline, "the capture never started"
        ready(0)
        watcher.poll(100)
    worker.send(topics.SURPRISE, {"seq": 0, "t_capture_ns": 0, "t_publish_ns": 0,
                                  "surprise": None, "pred_seq": None, "action": None,
                                  "variant": "core"})
    watcher.until(lambda: len(watcher.notices) >= 4, 10)  # seq 3 on the credit for 0
    first = {n["seq"]: n for n in watcher.notices}
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        watcher.poll(50)
    assert [n["seq"] for n in watcher.notices] == [0, 1, 2, 3]  # blocked: nothing is re-sent
    ready(1, notices=0)  # a worker took over (and has seen no notice yet)
    watcher.until(lambda: len(watcher.notices) >= 8, 10)
    end = time.monotonic() + 1.0  # once: its next iwm.ready (it has the notices now) is
    while time.monotonic() < end:  # no news
        ready(1, notices=4)
        watcher.poll(50)
    again = watcher.notices[4:]
    assert [n["seq"] for n in again] == [0, 1, 2, 3]  # all the ring holds, once
    for n in again:
        assert {k: v for k, v in n.items() if k != "action"} == \
            {k: v for k, v in first[n["seq"]].items() if k != "action"}
        assert n["action"] == first[n["seq"]]["action"]
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(10)
    worker.close()
    assert proc.exitcode == 0


def test_sigterm_exits_0_and_removes_the_ring(run_dir, spawn, ring_name,
                                              watcher_factory) -> None:
    eps = Endpoints.ipc(run_dir)
    cfg = CaptureConfig(source="synthetic:32x32", fps=100)
    watcher = watcher_factory(eps, ring_name)
    proc = spawn(exit_with, run_capture, cfg, eps, ring_name)
    watcher.until(lambda: len(watcher.notices) >= 5, 20)
    assert shm_exists(ring_name)
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(10)
    assert proc.exitcode == 0
    assert not shm_exists(ring_name)
    assert os.listdir(run_dir) == []


def test_sigterm_while_lossless_waits_for_a_worker(run_dir, spawn, ring_name,
                                                   watcher_factory) -> None:
    eps = Endpoints.ipc(run_dir)
    cfg = CaptureConfig(source="synthetic:16x16", mode="lossless",
                        ring=RingConfig(slots=4, max_height=16, max_width=16))
    watcher = watcher_factory(eps, ring_name)
    proc = spawn(exit_with, run_capture, cfg, eps, ring_name)
    watcher.until(lambda: bool(watcher.stats), 20)  # alive, waiting for a worker
    assert watcher.stats[-1]["frames"] == 0
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(10)
    assert proc.exitcode == 0
    assert not shm_exists(ring_name)


def test_frame_larger_than_the_ring_exits_2_creating_nothing(run_dir, spawn, ring_name,
                                                             capfd) -> None:
    eps = Endpoints.ipc(run_dir)
    cfg = CaptureConfig(source="synthetic:32x32",
                        ring=RingConfig(slots=4, max_height=16, max_width=16))
    proc = spawn(exit_with, run_capture, cfg, eps, ring_name)
    proc.join(20)
    assert proc.exitcode == 2
    assert not shm_exists(ring_name)
    assert os.listdir(run_dir) == []
    err = capfd.readouterr().err
    assert "32x32 frames (height x width), larger than the ring maximum 16x16" in err


def test_agent_actions_drive_the_source_and_appear_in_notices(run_dir, spawn, ring_name,
                                                              watcher_factory,
                                                              zmq_ctx) -> None:
    eps = Endpoints.ipc(run_dir)
    cfg = CaptureConfig(source="synthetic:64x64", fps=60,
                        ring=RingConfig(slots=32, max_height=64, max_width=64))
    watcher = watcher_factory(eps, ring_name)
    agent = Publisher(eps.agent, ctx=zmq_ctx)
    proc = spawn(exit_with, run_capture, cfg, eps, ring_name)
    action_seq = iter(range(10**6))

    def act_until(action: dict[str, Any], done: Callable[[dict], bool]) -> dict:
        deadline = time.monotonic() + 20
        while True:
            assert time.monotonic() < deadline, f"action {action} never took effect"
            agent.send(topics.ACTION, {"seq": next(action_seq), "t_ns": clock_ns(), **action})
            notice = watcher.poll(50)
            if notice is not None and notice["seq"] in watcher.pixels and done(notice):
                return notice

    right = act_until({"action_id": 4}, lambda n: n["action"] == {"action_id": 4}
                      and square_x(watcher.pixels[n["seq"]]) == 64 - 8)
    left = act_until({"vector": np.array([-1.0, 0.0], np.float32)},
                     lambda n: n["action"] is not None and "vector" in n["action"]
                     and square_x(watcher.pixels[n["seq"]]) == 0)
    np.testing.assert_array_equal(left["action"]["vector"], [-1.0, 0.0])
    # consecutive frames both driven by "right" moved the square 4 px (or hit the edge)
    moved = [(a, b) for a, b in zip(watcher.notices[:-1], watcher.notices[1:], strict=True)
             if b["seq"] == a["seq"] + 1 and b["action"] == {"action_id": 4}
             and a["seq"] in watcher.pixels and b["seq"] in watcher.pixels
             and b["seq"] <= right["seq"]]
    assert moved
    for a, b in moved:
        xa, xb = square_x(watcher.pixels[a["seq"]]), square_x(watcher.pixels[b["seq"]])
        assert xb == min(xa + 4, 56)
    # malformed actions are counted, never fatal
    agent.send(topics.ACTION, {"seq": next(action_seq), "t_ns": clock_ns(), "action_id": 99})
    agent.send(topics.ACTION, {"seq": next(action_seq), "t_ns": clock_ns()})
    agent.send_frames([topics.ACTION.encode(), b"\xc1 not msgpack"])
    watcher.until(lambda: bool(watcher.stats) and watcher.stats[-1]["bad_actions"] >= 2
                  and watcher.stats[-1]["action_decode_errors"] >= 1, 20)
    count = len(watcher.notices)
    watcher.until(lambda: len(watcher.notices) > count + 5, 10)  # still capturing
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(10)
    agent.close()
    assert proc.exitcode == 0


@pytest.mark.games
def test_agent_actions_step_a_real_game(run_dir, spawn, ring_name, watcher_factory,
                                        zmq_ctx) -> None:
    pytest.importorskip("ale_py", reason="install the games extra")
    eps = Endpoints.ipc(run_dir)
    cfg = CaptureConfig(source="gym:ALE/Pong-v5", fps=60,
                        ring=RingConfig(slots=16, max_height=256, max_width=256))
    watcher = watcher_factory(eps, ring_name)
    agent = Publisher(eps.agent, ctx=zmq_ctx)
    proc = spawn(exit_with, run_capture, cfg, eps, ring_name)
    deadline = time.monotonic() + 30
    driven: list[dict] = []
    while len(driven) < 10:
        assert time.monotonic() < deadline, "agent actions never reached the game"
        agent.send(topics.ACTION, {"seq": len(watcher.notices), "t_ns": clock_ns(),
                                   "action_id": 2})
        notice = watcher.poll(50)
        if notice is not None and notice["action"] == {"action_id": 2}:
            driven.append(notice)
    assert all((n["height"], n["width"], n["channels"]) == (210, 160, 3) for n in driven)
    assert all(watcher.pixels[n["seq"]].shape == (210, 160, 3) for n in driven
               if n["seq"] in watcher.pixels)
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(10)
    agent.close()
    assert proc.exitcode == 0
    assert not shm_exists(ring_name)


def write_gif(path: Path, count: int, duration_ms: int) -> None:
    images = []
    for i in range(count):
        frame = np.zeros((8, 8, 3), np.uint8)
        frame[:, : i + 1] = (200, 40, 40)
        images.append(Image.fromarray(frame))
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0)


def test_recorded_timestamps_pace_the_footage_at_rate(run_dir, spawn, ring_name,
                                                      watcher_factory, tmp_path) -> None:
    gif = tmp_path / "clip.gif"
    write_gif(gif, 4, 200)  # a frame every 200 ms of recorded time; looped
    eps = Endpoints.ipc(run_dir)
    intervals = {}
    for rate in (1.0, 4.0):
        name = f"{ring_name}_{int(rate)}"
        cfg = CaptureConfig(source=f"video:{gif}", rate=rate, fps=1000, loop=True,
                            ring=RingConfig(slots=8, max_height=8, max_width=8))
        watcher = watcher_factory(eps, name)
        proc = spawn(exit_with, run_capture, cfg, eps, name)
        watcher.until(lambda w=watcher: len(w.notices) >= 8, 30)  # noqa: B023
        os.kill(proc.pid, signal.SIGTERM)
        proc.join(10)
        assert proc.exitcode == 0
        FrameRing.unlink_stale(name)  # (only if the capture failed to)
        notices = watcher.notices
        intervals[rate] = float(np.median([  # the median shrugs off one late wake-up
            (b["t_capture_ns"] - a["t_capture_ns"]) / 1e9
            for a, b in zip(notices[:-1], notices[1:], strict=True)
            if b["seq"] == a["seq"] + 1]))
        watcher.close()
    assert 0.17 <= intervals[1.0] <= 0.4  # 200 ms recorded
    assert 0.04 <= intervals[4.0] <= 0.1  # 50 ms at rate 4


def test_a_source_that_knows_no_actions_gets_the_agents_on_its_notices(
        run_dir, spawn, ring_name, watcher_factory, zmq_ctx, tmp_path) -> None:
    """The notice is the one way an action reaches the worker: for footage that does not
    know what produced it, the capture puts the agent's latest action on each notice."""
    gif = tmp_path / "clip.gif"
    write_gif(gif, 4, 20)
    eps = Endpoints.ipc(run_dir)
    cfg = CaptureConfig(source=f"video:{gif}", rate=0, fps=50, loop=True,
                        ring=RingConfig(slots=8, max_height=8, max_width=8))
    watcher = watcher_factory(eps, ring_name)
    agent = Publisher(eps.agent, ctx=zmq_ctx)
    proc = spawn(exit_with, run_capture, cfg, eps, ring_name)
    watcher.until(lambda: len(watcher.notices) >= 2, 30)
    assert all(n["action"] is None for n in watcher.notices)  # no agent has spoken
    deadline = time.monotonic() + 20
    while not any(n["action"] == {"action_id": 2} for n in watcher.notices):
        assert time.monotonic() < deadline, "the agent's action never reached a notice"
        agent.send(topics.ACTION, {"seq": 0, "t_ns": clock_ns(), "action_id": 2})
        watcher.poll(50)
    n = len(watcher.notices)
    watcher.until(lambda: len(watcher.notices) >= n + 3, 20)
    assert all(x["action"] == {"action_id": 2} for x in watcher.notices[n:])  # it stays
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(10)
    agent.close()
    assert proc.exitcode == 0


def test_replay_republishes_the_recorded_actions(run_dir, spawn, ring_name, watcher_factory,
                                                 tmp_path) -> None:
    from iwm_bus.session import SessionWriter

    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, (8, 12, 3), dtype=np.uint8) for _ in range(5)]
    recorded = [None, make_action(action_id=2), make_action(vector=[0.5, -0.25]),
                make_action(vector=[1.0], action_id=1), make_action(action_id=0)]
    path = tmp_path / "s.mcap"
    with SessionWriter(path, metadata={"source": {"spec": "test"}}) as writer:
        for i, (frame, action) in enumerate(zip(frames, recorded, strict=True)):
            writer.write_frame(i, 10**9 + i * 50_000_000, frame, action=action)
    eps = Endpoints.ipc(run_dir)
    cfg = CaptureConfig(source=f"replay:{path}", loop=True, rate=0, fps=100,
                        ring=RingConfig(slots=8, max_height=8, max_width=12))
    watcher = watcher_factory(eps, ring_name)
    proc = spawn(exit_with, run_capture, cfg, eps, ring_name)
    watcher.until(lambda: len(watcher.notices) >= 12, 30)
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(10)
    assert proc.exitcode == 0
    by_frame_seq = {a["frame_seq"]: a for a in watcher.actions}
    assert all(a["source"] == "replay" for a in watcher.actions)
    action_seqs = [a["seq"] for a in watcher.actions]
    assert action_seqs == sorted(set(action_seqs))
    checked = 0
    for notice in watcher.notices[1:]:  # (the first one's action may precede our connection)
        seq, index = notice["seq"], notice["seq"] % 5  # every pass replays all 5 frames
        assert np.array_equal(watcher.pixels[seq], frames[index])
        expected = recorded[index]
        if expected is None:
            assert notice["action"] is None and seq - 1 not in by_frame_seq
            continue
        assert notice["action"].get("action_id") == expected.get("action_id")
        replayed = by_frame_seq[seq - 1]  # taken on the frame before the one it produced
        assert replayed["action_id"] == expected.get("action_id")
        if "vector" in expected:
            np.testing.assert_array_equal(notice["action"]["vector"], expected["vector"])
            np.testing.assert_array_equal(replayed["vector"], expected["vector"])
        else:
            assert replayed["vector"] is None
        checked += 1
    assert checked >= 6


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="unknown source"):
        CaptureConfig(source="camera:0")
    for kwargs, field in [({"fps": -1}, "fps"), ({"mode": "fast"}, "mode"),
                          ({"frames": 0}, "frames"), ({"source": "nope"}, "source"),
                          ({"rate": "2"}, "rate"), ({"duration": 0}, "duration"),
                          ({"seed": -3}, "seed"), ({"options": {"seed": 1}}, "options")]:
        with pytest.raises(ValueError, match=f"CaptureConfig.{field}="):
            CaptureConfig(**kwargs)
    cfg = CaptureConfig(ring={"slots": 4, "max_height": 32, "max_width": 32})
    assert cfg.ring == RingConfig(slots=4, max_height=32, max_width=32)
