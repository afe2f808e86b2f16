"""A remote worker's frames over a real loopback tcp link, with each codec (issue 26, item 3).

In one process, as the launcher would run them on two machines: a capture side (a ring and
its notices), the real gateway reading the ring and sending each frame with the link's
codec, and a remote worker that decodes them. The worker's latents must be those of the
frames it was sent (raw, zstd: the captured frames; jpeg: the frames the JPEG decodes to),
its health and stats must say how the frames travelled and whether that was lossy, and a
pixel part that does not match its header must be counted and dropped, never stop it.

    .venv/bin/pytest tests/worker/test_remote_frames.py -q
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import zmq
from conftest import find_free_port
from test_encoder import (
    Client,
    Collector,
    Producer,
    close_to,
    frame_for,
    serving,
    short_dir,
    tiny_model,
    write_paced,
)

from iwm_bus.bus import topics, wire
from iwm_bus.bus.link import Link
from iwm_bus.bus.link_frames import (
    FrameDecoder,
    FrameEncoder,
    LinkCodec,
    LinkFrameSubscriber,
    send_parts,
)
from iwm_bus.bus.ring import clock_ns
from iwm_bus.bus.transport import Endpoints, Publisher
from iwm_bus.config import WorkerConfig
from iwm_bus.model import IWM
from workers.encoder import EncoderWorker
from workers.entry import StopFlag
from workers.gateway import Gateway

pytestmark = pytest.mark.timeout(120)
H, W = 40, 48  # test_encoder's ring


@pytest.fixture(scope="module")
def model() -> IWM:
    return tiny_model()


def _stats(col: Collector, source: str) -> dict[str, Any]:
    got = [m["values"] for m in col.msgs[topics.STATS] if m["source"] == source]
    return got[-1] if got else {}


def _sent_as(spec: str, frame: np.ndarray) -> np.ndarray:
    """The frame a worker gets when ``frame`` travels with codec ``spec``."""
    parts = FrameEncoder(LinkCodec.parse(spec)).pack(
        {"seq": 0, "slot": 0, "t_capture_ns": 1}, frame)
    return FrameDecoder().decode(wire.unpack(parts[:2])[1], bytes(memoryview(parts[2])))


@contextmanager
def _gateway(link: Link, eps: Endpoints, ring_name: str) -> Iterator[Gateway]:
    stop = StopFlag()
    gw = Gateway(link, eps, ring_name)
    t = threading.Thread(target=gw.serve, args=(stop,), daemon=True)
    t.start()
    try:
        yield gw
    finally:
        stop.set()
        t.join(30)
        gw.close()
        assert not t.is_alive(), "the gateway did not stop"


@pytest.mark.parametrize("spec", ["raw", "zstd", "jpeg:75"])
def test_a_remote_worker_gets_every_frame_through_the_gateway_with_each_codec(
        spec: str, model: IWM) -> None:
    codec = LinkCodec.parse(spec)
    d = short_dir()
    eps, name = Endpoints.ipc(d), f"iwmt_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    link = Link("127.0.0.1", find_free_port(3), codec=codec)
    cfg = WorkerConfig(mode="lossless", stats_interval_s=0.2, mrr_bank=4)
    prod = Producer(eps, name)
    parts: list[Any] = [prod]
    try:
        with _gateway(link, eps, name) as gw, \
                EncoderWorker(cfg, link.worker_endpoints(), "", model=model, link=link) as w, \
                serving(w):
            col, client = Collector(eps), Client(eps)
            parts += [col, client]
            col.wait(lambda: _stats(col, "worker").get("ready") == 1, "the worker, via tcp")
            n = 10
            frames = [frame_for(i) for i in range(n)]
            seqs = write_paced(prod, col, frames)
            health = client.result("health")
            worker = col.fresh_stats(lambda v: v.get("link_frames", 0) >= n, "worker stats")
            col.wait(lambda: _stats(col, "gateway").get("frames", 0) >= n, "gateway stats")
            gateway = _stats(col, "gateway")
            assert gw.encoder.frames >= n
    finally:
        for part in parts:
            part.close()
        shutil.rmtree(d, ignore_errors=True)
    lat = col.by_seq(topics.LATENT)
    assert sorted(lat) == seqs == list(range(n))
    for s in seqs:
        want = model.encode(_sent_as(spec, frames[s]))[0][0].numpy()
        assert close_to(lat[s]["z_cls"], want), f"{spec}: seq {s} is not the frame sent"
        if codec.lossy:  # and not the captured one: the worker saw what the JPEG decodes to
            assert not close_to(lat[s]["z_cls"], model.encode(frames[s])[0][0].numpy())
    assert health["link"] == {"codec": codec.spec, "lossy": codec.lossy, "frames": n,
                              "lossy_frames": n if codec.lossy else 0, "bad_pixels": 0}
    assert worker["link_codec"] == codec.spec and worker["lossy"] == int(codec.lossy)
    assert worker["remote"] == 1 and worker["bad_pixels"] == worker["decode_errors"] == 0
    assert worker["dropped_overwritten"] == 0 and worker["frames_without_pixels"] == 0
    assert gateway["codec"] == codec.spec and gateway["lossy"] == int(codec.lossy)
    assert gateway["raw_bytes"] == n * H * W * 3 and gateway["link_bytes"] > 0
    if codec.lossy:
        assert gateway["link_bytes"] < gateway["raw_bytes"] / 2


def test_a_remote_worker_counts_and_drops_bad_pixel_parts(model: IWM) -> None:
    """The test plays the gateway: good frames with bad pixel parts between them. The bad
    ones are counted (``bad_pixels``, and as lost frames in lossless), the good ones
    processed, and the worker goes on."""
    link = Link("127.0.0.1", find_free_port(3))
    ctx = zmq.Context()
    frames_out = ctx.socket(zmq.XPUB)  # XPUB: it hears the worker's subscription arrive
    results_in = ctx.socket(zmq.SUB)
    cfg = WorkerConfig(mode="lossless", stats_interval_s=0.2, mrr_bank=4)
    for sock in (frames_out, results_in):
        sock.setsockopt(zmq.LINGER, 0)
    results_in.setsockopt(zmq.SUBSCRIBE, b"")
    frames_out.bind(link.frames)
    results_in.bind(link.results)
    got: dict[str, list[dict[str, Any]]] = {}

    def pump(until: Any, what: str) -> None:
        deadline = time.monotonic() + 40
        while not until():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            if results_in.poll(50):
                topic, msg = wire.unpack(results_in.recv_multipart())
                got.setdefault(topics.base_topic(topic), []).append(msg)

    def stats() -> dict[str, Any]:
        return got[topics.STATS][-1]["values"] if got.get(topics.STATS) else {}

    enc = FrameEncoder(LinkCodec("zstd"))
    bad = {1: ("raw", b"short"), 3: ("zstd:1", b"not zstd"), 4: ("jpeg:90", b"\xff\xd8 no"),
           6: ("webp", b"\0" * 64)}
    n = 8
    try:
        with EncoderWorker(cfg, link.worker_endpoints(), "", model=model, link=link) as w, \
                serving(w) as stop:
            assert frames_out.poll(20_000), "the worker never subscribed"
            assert frames_out.recv() == b"\x01" + topics.FRAME.encode()
            for seq in range(n):
                note = {"seq": seq, "slot": seq, "t_capture_ns": clock_ns(), "ring_id": 5}
                if seq in bad:
                    spec, part = bad[seq]
                    frames_out.send_multipart([*wire.pack(topics.FRAME, {
                        **note, "height": H, "width": W, "channels": 3, "codec": spec}),
                        part])
                else:
                    send_parts(frames_out, enc.pack(note, frame_for(seq)))
            pump(lambda: stats().get("frames", 0) >= n - len(bad)
                 and stats().get("bad_pixels") == len(bad), "the good frames")
            assert not stop.is_set()
            health = w._health()
    finally:
        frames_out.close()
        results_in.close()
        ctx.term()
    done = sorted(m["seq"] for m in got[topics.LATENT])
    assert done == [s for s in range(n) if s not in bad]
    values = stats()
    assert values["bad_pixels"] == len(bad) and values["decode_errors"] == 0
    assert values["dropped_overwritten"] == len(bad)  # lossless: each one a frame lost
    assert health["link"]["bad_pixels"] == len(bad) and health["link"]["codec"] == "zstd:1"


# ----------------------------------------------------------------------------- exactly once


class FakeWorker:
    """A remote worker's sockets without a model: takes frames, publishes results."""

    def __init__(self, link: Link, ctx: zmq.Context) -> None:
        self.frames = LinkFrameSubscriber([link.frames], [topics.FRAME], ctx=ctx)
        self.pub = Publisher(link.results, connect=True, ctx=ctx)

    def sync(self, col: Collector) -> None:
        """Until its results reach ``col`` through the gateway (PUB/SUB: the subscription
        travels up to this PUB first)."""
        deadline = time.monotonic() + 20
        n = len(col.msgs[topics.STATS])
        while len(col.msgs[topics.STATS]) == n:
            assert time.monotonic() < deadline, "no stats through the gateway"
            self.pub.send(topics.STATS, {"t_ns": clock_ns(), "source": "sync", "values": {}})
            col.pump(50)

    def take(self, n: int) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        while len(got) < n:
            msg = self.frames.recv(10_000)
            assert msg is not None, f"got {[m['seq'] for m in got]} of {n} frames"
            got.append(msg[1])
        return got

    def answer(self, notice: dict[str, Any], *which: str) -> None:
        base = {"seq": notice["seq"], "t_capture_ns": notice["t_capture_ns"],
                "t_publish_ns": clock_ns(), "variant": "core"}
        parts = {topics.SURPRISE: {**base, "surprise": 0.5},
                 topics.MRR: {**base, "rr": 1.0, "mrr": 1.0, "k": 1},
                 topics.LATENT: {**base, "z_cls": np.zeros(4, np.float32)}}
        for topic in which or (topics.SURPRISE, topics.MRR, topics.LATENT):
            self.pub.send(topic, parts[topic])

    def close(self) -> None:
        self.frames.close()
        self.pub.close()


def test_a_worker_that_takes_over_gets_the_unanswered_frames_and_results_pass_once() -> None:
    """issue 26, item 4, at the gateway: a worker answers frames 0..2 and dies halfway
    through frame 3; the next one to subscribe gets 3..5 (and only those) without the
    capture sending anything, and what it publishes again of 2 and 3 is dropped: the game
    machine sees each frame's three results once."""
    d = short_dir()
    eps, name = Endpoints.ipc(d), f"iwmt_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    link = Link("127.0.0.1", find_free_port(3), codec=LinkCodec("zstd"))
    ctx = zmq.Context()
    prod = Producer(eps, name)
    col = Collector(eps)
    parts: list[Any] = [col, prod]
    try:
        with _gateway(link, eps, name) as gw:
            first = FakeWorker(link, ctx)
            parts.append(first)
            first.sync(col)
            time.sleep(0.3)  # the worker's subscription to the frames
            for i in range(6):
                prod.write(frame_for(i))
            got = first.take(6)
            assert [m["seq"] for m in got] == list(range(6))
            for m in got[:3]:
                first.answer(m)
            first.answer(got[3], topics.SURPRISE)  # killed after its surprise of frame 3
            col.wait(lambda: col.max_seq() == 2 and 3 in col.seqs(topics.SURPRISE), "0..3")
            first.close()
            parts.remove(first)
            second = FakeWorker(link, ctx)
            parts.append(second)
            again = second.take(3)
            assert [m["seq"] for m in again] == [3, 4, 5]
            for m in again:
                np.testing.assert_array_equal(m["pixels"], prod.frames[m["seq"]])
            second.sync(col)
            second.answer(got[2])  # at least once: its rewind publishes 2 again
            for m in again:
                second.answer(m)
            col.wait(lambda: col.max_seq() == 5, "the frames of the second worker")
            for seq in (1, 5):  # the capture re-sends notices: answered frames stay home
                prod.notify(seq)
            assert second.frames.recv(500) is None
            col.wait(lambda: _stats(col, "gateway").get("already_answered") == 2,
                     "the gateway's stats")
            stats = _stats(col, "gateway")
            assert gw.inflight.duplicates == 4 and len(gw.inflight) == 0
    finally:
        for part in parts:
            part.close()
        ctx.term()
        shutil.rmtree(d, ignore_errors=True)
    for topic in (topics.SURPRISE, topics.MRR, topics.LATENT):
        assert col.seqs(topic) == list(range(6)), (topic, col.seqs(topic))
    assert stats["duplicates"] == 4 and stats["resent"] >= 3
    assert stats["unanswered_evicted"] == 0 and stats["in_flight"] == 0
