"""Today's recorder and worker fed by a newer peer: the wire's compatibility rule
(docs/wire.md) replayed through real sockets and a real ring.

A "future" writer (tests/future.py) sends schema v1.x messages with fields, an action-map
key and a kind this side does not know, and messages of another major version. The
recorder and the worker must take every message they know as they would today's (frames
recorded and processed, events kept, actions used), count the rest, and refuse the other
major; none of it may count as malformed.

    .venv/bin/pytest tests/worker/test_newer_peers.py -q
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from future import NEW_ACTION_KEY, future, future_kind, other_major
from test_encoder import Client, Collector, Producer, frame_for, serving, short_dir, tiny_model

from iwm_bus.bus import topics, wire
from iwm_bus.bus.ring import FrameRing, clock_ns
from iwm_bus.bus.transport import Endpoints, Publisher
from iwm_bus.config import WorkerConfig
from iwm_bus.session import SessionReader
from workers.encoder import EncoderWorker
from workers.recorder import Recorder, RecorderConfig

pytestmark = pytest.mark.timeout(120)
WAIT_S = 40.0


def _until(cond: Callable[[], bool], what: str, pump: Callable[[], Any]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {WAIT_S} s waiting for {what}"
        pump()


def _stamped(seq: int) -> dict[str, Any]:
    t = clock_ns()
    return {"seq": seq, "t_capture_ns": t, "t_publish_ns": t + 1, "variant": "core"}


def test_the_recorder_records_a_newer_writers_messages(tmp_path: Path) -> None:
    d = short_dir()
    eps, name = Endpoints.ipc(d), f"iwmt_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    ring = FrameRing.create(name, 8, 24, 32)
    pubs = {ep: Publisher(ep) for ep in (eps.capture, eps.agent, eps.worker)}
    cfg = RecorderConfig(path=tmp_path / "s.mcap", record_stats=True, frame_encoding="zstd-raw")
    rec = Recorder(cfg, eps, name)
    try:
        def sync() -> None:  # PUB/SUB: send until every subscriber has one
            stats = {"t_ns": clock_ns(), "source": "sync", "values": {}}
            pubs[eps.capture].send(topics.STATS, stats)
            pubs[eps.worker].send(topics.STATS, stats)
            pubs[eps.agent].send(topics.ACTION, {"seq": 0, "t_ns": clock_ns(), "action_id": 0,
                                                 "source": "sync"})
            rec.poll_once(20)

        _until(lambda: all(s.received for s in rec.subs), "the recorder's subscriptions", sync)
        # the sync messages still in flight are recorded too: take them all before counting
        events = -1
        while events != rec.counts["events"]:
            events = rec.counts["events"]
            for _ in range(5):
                rec.poll_once(20)
        frames = [np.full((24, 32, 3), 40 * i, np.uint8) for i in range(3)]
        for i, px in enumerate(frames):
            t = clock_ns()
            seq = ring.write(px, t)
            pubs[eps.capture].send_frames(future(topics.FRAME, {
                "seq": seq, "slot": ring.slot_of(seq), "t_capture_ns": t, "height": 24,
                "width": 32, "channels": 3, "action": wire.make_action(action_id=i),
                "source": "future", "ring_id": ring.ring_id}))
        pubs[eps.capture].send_frames(future_kind(topics.FRAME))
        pubs[eps.agent].send_frames(future(topics.ACTION, {
            "seq": 1, "t_ns": clock_ns(), "frame_seq": 2, "action_id": 3, "source": "future"}))
        pubs[eps.agent].send_frames(future(topics.DECISION, wire.make_decision(
            1, clock_ns(), slow_down=True, prefer_wait=False, escalate=False, frame_seq=2,
            surprise=0.5, reasons=["surprise 0.5"])))
        pubs[eps.agent].send_frames(future_kind(topics.DECISION))
        pubs[eps.worker].send_frames(future(topics.SURPRISE, {
            **_stamped(2), "surprise": 0.5, "surprise_z": 2.0, "pred_seq": 1,
            "action": wire.make_action(action_id=1)}))
        pubs[eps.worker].send_frames(future(topics.LATENT, {
            **_stamped(2), "z_cls": np.ones(8, np.float32), "patches": None}))
        pubs[eps.worker].send_frames(other_major(topics.MRR, {
            **_stamped(2), "rr": 1.0, "mrr": 1.0, "k": 4}))
        _until(lambda: rec.counts["frames"] == 3 and rec.counts["events"] == events + 4
               and rec.stats()["unknown_kinds"] == 2 and rec.stats()["other_major"] == 1,
               "the newer writer's messages", lambda: rec.poll_once(20))
        stats = rec.stats()
    finally:
        rec.close()
        for pub in pubs.values():
            pub.close()
        ring.unlink()
        ring.close()
        shutil.rmtree(d, ignore_errors=True)
    assert stats["decode_errors"] == 0 and stats["unknown_fields"] == 7
    with SessionReader(cfg.path) as reader:
        got = list(reader.frames())
        assert [f.seq for f in got] == [0, 1, 2]
        for i, f in enumerate(got):
            np.testing.assert_array_equal(f.pixels, frames[i])
            assert f.action == {"action_id": i}  # without the newer action key
        action = [a for a in reader.actions() if a["source"] == "future"]
        assert len(action) == 1 and action[0]["action_id"] == 3
        assert [m["reasons"] for m in reader.events(topics.DECISION)] == ["surprise 0.5"]
        assert [m["surprise_z"] for m in reader.events(topics.SURPRISE)] == [2.0]
        assert len(list(reader.events(topics.LATENT))) == 1
        assert not list(reader.events(topics.MRR))  # the other major's
        assert reader.unknown == wire.Unknowns()  # what it wrote is today's schema


def test_the_worker_takes_a_newer_captures_notices_and_a_newer_clients_requests() -> None:
    d = short_dir()
    eps, name = Endpoints.ipc(d), f"iwmt_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    cfg = WorkerConfig(mode="lossless", stats_interval_s=0.2, mrr_bank=4)
    prod = Producer(eps, name)
    col = Collector(eps)
    client = Client(eps)
    n = 4
    try:
        with EncoderWorker(cfg, eps, name, model=tiny_model()) as w, serving(w):
            col.wait(lambda: col.stats().get("ready") == 1, "ready")
            for i in range(n):
                seq = prod.write(frame_for(i), notify=False)
                prod.pub.send_frames(future(topics.FRAME, {
                    "seq": seq, "slot": prod.ring.slot_of(seq), "t_capture_ns": prod.times[seq],
                    "height": frame_for(i).shape[0], "width": frame_for(i).shape[1],
                    "channels": 3, "action": wire.make_action(action_id=2), "source": "future",
                    "ring_id": prod.ring.ring_id}))
                col.wait(lambda s=seq: col.max_seq() >= s, f"the latent of seq {seq}")
            prod.pub.send_frames(future_kind(topics.FRAME))
            prod.pub.send_frames(other_major(topics.FRAME, {
                "seq": n, "slot": 0, "t_capture_ns": clock_ns(), "height": 1, "width": 1,
                "channels": 3}))
            stats = col.fresh_stats(lambda v: v["unknown_kinds"] == 1 and v["other_major"] == 1,
                                    "the newer capture's kind and the other major counted")

            # RPC: a newer client's request field and param are left out, the param named
            frames = np.stack([frame_for(10)])
            client.next_id += 1
            client.send_raw(future(topics.RPC, {
                "kind": "rpc_request", "id": client.next_id, "method": "encode",
                "params": {"frames": frames}}, deadline_ns_q=5))
            plain = client.recv()
            client.next_id += 1
            topic, payload = wire.pack(topics.RPC, {
                "kind": "rpc_request", "id": client.next_id, "method": "encode",
                "params": {"frames": frames}})
            body = msgpack.unpackb(payload, raw=False)
            body["params"]["layer_q"] = 3  # a param a newer client may pass
            client.send_raw([topic, msgpack.packb(body, use_bin_type=True)])
            with_param = client.recv()
            client.send_raw(other_major(topics.RPC, {
                "kind": "rpc_request", "id": 99, "method": "health", "params": {}}))
            refused = client.recv()
    finally:
        client.close()
        col.close()
        prod.close()
        shutil.rmtree(d, ignore_errors=True)
    assert col.seqs(topics.LATENT) == list(range(n))
    # the notice's action, without its newer key, is what the predictions were made with
    assert [m["action"] for m in col.msgs[topics.SURPRISE][1:]] == [{"action_id": 2}] * (n - 1)
    assert NEW_ACTION_KEY not in str(col.msgs[topics.SURPRISE])
    assert stats["decode_errors"] == 0 and stats["unknown_fields"] >= n
    assert plain["ok"] and plain["result"]["z_cls"].shape[0] == 1
    assert "ignored_params" not in plain["result"]
    assert with_param["ok"] and with_param["result"]["ignored_params"] == ["layer_q"]
    assert not refused["ok"] and refused["id"] == 99
    assert f"v{wire.VERSION + 1}" in refused["error"] and f"v{wire.version_text()}" in \
        refused["error"]
