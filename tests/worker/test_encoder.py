"""Encoder worker: a real worker process (and in-process workers), real ring, real sockets.

The test plays the capture (a FrameRing + a PUB on ``endpoints.capture``), the agent (a PUB
on ``endpoints.agent``), a subscriber of the worker's topics and an RPC client (a plain
DEALER), against a tiny model (ViT-Ti/16 at 32 px, 2-layer predictor) saved as a checkpoint
that the worker process loads. The process tests share one worker (module fixture); the
last of them stops it with SIGTERM.

    .venv/bin/python -m pytest tests/test_encoder.py -q
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zmq
from fuzz import mutated
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loguru import logger

from iwm_bus import metrics
from iwm_bus.bus import topics, wire
from iwm_bus.bus.ring import FrameRing, clock_ns
from iwm_bus.bus.transport import Endpoints, Publisher, Subscriber
from iwm_bus.config import WorkerConfig
from iwm_bus.model import IWM, create_iwm_model, pad_cond, save_checkpoint
from workers import encoder as encoder_mod
from workers.encoder import EncoderWorker, load_model, run_worker
from workers.model_stream import MAX_GAP
from workers.stream import HORIZON, HORIZON_EVERY, frame_key

ENCODER, IMG = "vit_tiny_patch16_224", 32
H, W, SLOTS = 40, 48, 8
NUM_ACTIONS = 4
pytestmark = pytest.mark.timeout(90)


def tiny_model(device: str = "cpu") -> IWM:
    m = create_iwm_model("custom", encoder_name=ENCODER, img_size=IMG, pred_depth=2,
                         pred_dim=64, pred_heads=2, num_actions=NUM_ACTIONS, seed=1,
                         device=device)
    with torch.no_grad():  # untrained conditioning is tiny (init std 0.02): make it visible
        m.predictor.action_embed.weight.mul_(50)
        m.predictor.cond_embed[-1].weight.mul_(50)
        for head in m.predictor.heads:  # and the predicted change itself
            head[-1].weight.mul_(20)
    return m


def frame_for(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, (H, W, 3), dtype=np.uint8)


def short_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="iwt", dir="/tmp"))


# ----------------------------------------------------------------------------- test peers


class Producer:
    """The capture side: writes frames into a ring and publishes iwm.frame notices."""

    def __init__(self, eps: Endpoints, ring_name: str) -> None:
        self.ring = FrameRing.create(ring_name, SLOTS, H, W)
        self.pub = Publisher(eps.capture)
        self.frames: dict[int, np.ndarray] = {}
        self.times: dict[int, int] = {}

    def write(self, frame: np.ndarray, action: dict[str, Any] | None = None,
              notify: bool = True) -> int:
        """Write a frame into the ring and (``notify``) publish its notice."""
        t = clock_ns()
        seq = self.ring.write(frame, t)
        self.times[seq] = t
        if notify:
            self.notify(seq, action)
        self.frames[seq] = frame
        return seq

    def notify(self, seq: int, action: dict[str, Any] | None = None) -> None:
        self.pub.send(topics.FRAME, {"seq": seq, "slot": self.ring.slot_of(seq),
                                     "t_capture_ns": self.times[seq], "height": H, "width": W,
                                     "channels": 3, "action": action, "source": "test",
                                     "ring_id": self.ring.ring_id})

    def new_ring(self) -> None:
        """A restarted capture: the ring gone and created again under its name."""
        self.ring.unlink()
        self.ring.close()
        self.ring = FrameRing.create(self.ring.name, SLOTS, H, W)
        self.frames, self.times = {}, {}

    def close(self) -> None:
        self.pub.close()
        self.ring.unlink()
        self.ring.close()


class Collector:
    """Subscribes to the worker's topics and keeps everything it receives."""

    def __init__(self, eps: Endpoints) -> None:
        self.sub = Subscriber([eps.worker], topics.WORKER_TOPICS)
        self.msgs: dict[str, list[dict[str, Any]]] = {t: [] for t in topics.WORKER_TOPICS}

    def pump(self, timeout_ms: int = 50) -> None:
        got = self.sub.recv(timeout_ms)
        while got is not None:
            self.msgs[topics.base_topic(got[0])].append(got[1])
            got = self.sub.recv(0)

    def wait(self, cond: Callable[[], bool], what: str, timeout: float = 40.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; last stats: "
                                     f"{self.stats()}")
            self.pump()

    def seqs(self, topic: str) -> list[int]:
        return [m["seq"] for m in self.msgs[topic]]

    def by_seq(self, topic: str) -> dict[int, dict[str, Any]]:
        return {m["seq"]: m for m in self.msgs[topic]}

    def max_seq(self) -> int:
        """Newest seq whose messages all arrived (iwm.latent is published last)."""
        return max(self.seqs(topics.LATENT), default=-1)

    def stats(self) -> dict[str, Any]:
        return self.msgs[topics.STATS][-1]["values"] if self.msgs[topics.STATS] else {}

    def fresh_stats(self, pred: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        """Wait for a stats message sent after this call that satisfies ``pred``."""
        n = len(self.msgs[topics.STATS])
        self.wait(lambda: any(pred(m["values"]) for m in self.msgs[topics.STATS][n:]), what)
        return self.stats()

    def close(self) -> None:
        self.sub.close()


class Client:
    """A plain DEALER speaking the worker's RPC protocol."""

    def __init__(self, eps: Endpoints) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(eps.rpc)
        self.next_id = 0

    def send_raw(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout: float = 30.0) -> dict[str, Any]:
        assert self.sock.poll(int(timeout * 1000)), "no RPC reply in time"
        topic, msg = wire.unpack(self.sock.recv_multipart())
        assert topic == topics.RPC and msg["kind"] == "rpc_reply"
        return msg

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.send_raw(wire.pack(topics.RPC, {"kind": "rpc_request", "id": self.next_id,
                                             "method": method, "params": params}))
        reply = self.recv()
        assert reply["id"] == self.next_id
        return reply

    def result(self, method: str, **params: Any) -> dict[str, Any]:
        reply = self.call(method, **params)
        assert reply["ok"], reply["error"]
        return reply["result"]

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def write_paced(prod: Producer, col: Collector, frames: list[np.ndarray],
                actions: list[dict[str, Any] | None] | None = None) -> list[int]:
    """Lossless pacing: keep at most SLOTS // 2 frames ahead of the worker's latents."""
    seqs = []
    for i, frame in enumerate(frames):
        nxt = prod.ring.latest_seq + 1
        col.wait(lambda n=nxt: col.max_seq() >= n - SLOTS // 2, f"credit for seq {nxt}")
        seqs.append(prod.write(frame, actions[i] if actions else None))
    col.wait(lambda: col.max_seq() >= seqs[-1], f"messages of seq {seqs[-1]}")
    return seqs


def close_to(a: Any, b: Any, tol: float = 1e-4) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=tol, atol=tol))


# ----------------------------------------------------------------------------- the rig


class Rig:
    """A worker process (lossless, tiny checkpoint) and the test's peers around it."""

    def __init__(self) -> None:
        self.dir = short_dir()
        self.eps = Endpoints.ipc(self.dir)
        self.ring_name = f"iwmt_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.ckpt = self.dir / "tiny.pt"
        self.parts: list[Any] = []
        self.proc: Any = None

    def start(self) -> None:
        self.model = tiny_model()
        save_checkpoint(self.model, self.ckpt)
        self.prod = Producer(self.eps, self.ring_name)
        self.parts.append(self.prod)
        self.col = Collector(self.eps)
        self.parts.append(self.col)
        self.client = Client(self.eps)
        self.parts.append(self.client)
        self.agent = Publisher(self.eps.agent)
        self.parts.append(self.agent)
        cfg = WorkerConfig(model_path=self.ckpt, mode="lossless", mrr_bank=6,
                           stats_interval_s=0.2)
        self.proc = mp.get_context("spawn").Process(
            target=run_worker, args=(cfg, self.eps, self.ring_name), kwargs={"restarts": 3},
            daemon=True)
        self.proc.start()
        self.col.wait(lambda: self.col.stats().get("ready") == 1 or not self.proc.is_alive(),
                      "the worker's ready stats", timeout=80)
        assert self.proc.is_alive(), f"worker exited with {self.proc.exitcode}"

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.is_alive():
                self.proc.kill()
            self.proc.join(10)
        for part in self.parts:
            part.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    r = Rig()
    try:
        r.start()
        yield r
    finally:
        r.close()


def local_surprise(model: IWM, p_prev: np.ndarray, p: np.ndarray, cond: np.ndarray | None,
                   action_id: int) -> float:
    """The worker's surprise, computed here: predicted vs observed patch latents (N, D)."""
    pred = model.predict(p_prev.mean(0)[None], p_prev[None],
                         cond=None if cond is None else cond[None],
                         action_id=np.array([action_id]))
    return metrics.patch_surprise(pred.patches[0].numpy(), p)


# ----------------------------------------------------------------------------- process tests


def test_a_standby_warms_up_every_shape_the_per_frame_path_uses() -> None:
    """issue 13: a standby warmed up with one encode at the model's input size and one
    single prediction took 3.5 s to serve after a SIGKILL on an H200 (0.4 s on CPU): each
    new input shape is a CUDA graph captured on first use. The warm-up must encode at the
    capture's frame size (read from the ring) and predict with rollout chains too."""
    model = tiny_model()
    encoded: list[tuple[int, ...]] = []
    starts: list[int] = []
    enc, pred = model.encode, model.predict
    model.encode = lambda f: encoded.append(np.shape(f)) or enc(f)  # type: ignore[method-assign]
    model.predict = lambda z, *a, **k: starts.append(len(z)) or pred(z, *a, **k)  # type: ignore
    name = f"iwm_t{uuid.uuid4().hex[:8]}"
    with FrameRing.create(name, slots=4, max_height=96, max_width=80) as ring:
        assert encoder_mod._ring_frame_shape(name) is None  # nothing written yet
        ring.write(np.zeros((90, 72, 3), np.uint8))
        shape = encoder_mod._ring_frame_shape(name)
    assert shape == (90, 72, 3)
    assert encoder_mod._ring_frame_shape(name) is None  # the ring is gone
    encoder_mod._warm_up(model, "plain", shape, 32)
    assert set(encoded) == {(90, 72, 3)}
    assert set(starts) == {1, 2}  # the next-frame prediction alone, and with a chain


def test_lossless_publishes_every_seq_once_and_matches_local_model(rig: Rig) -> None:
    n = 16
    first = rig.prod.ring.latest_seq + 1
    seqs = write_paced(rig.prod, rig.col, [frame_for(i) for i in range(first, first + n)])
    assert seqs == list(range(first, first + n))
    time.sleep(0.3)  # a duplicate, if there were one, would be here by now
    rig.col.pump()
    for topic in (topics.LATENT, topics.SURPRISE, topics.MRR):
        got = [s for s in rig.col.seqs(topic) if s >= first]
        assert got == seqs, f"{topic}: {got}"
    lat, sur, mrr = (rig.col.by_seq(t) for t in (topics.LATENT, topics.SURPRISE, topics.MRR))
    enc = {s: rig.model.encode(rig.prod.frames[s]) for s in range(max(first - 1, 0), first + n)}
    z = {s: e[0][0].numpy() for s, e in enc.items()}
    p = {s: e[1][0].numpy() for s, e in enc.items()}
    rrs = []
    for s in seqs:
        assert lat[s]["z_cls"].shape == (rig.model.embed_dim,) and lat[s]["patches"] is None
        assert close_to(lat[s]["z_cls"], z[s]), f"latent of seq {s} differs from local encode"
        assert lat[s]["t_publish_ns"] >= lat[s]["t_capture_ns"] > 0
        if s == 0:
            assert sur[s]["surprise"] is None and mrr[s]["rr"] is None and mrr[s]["k"] == 0
            continue
        assert sur[s]["pred_seq"] == s - 1 and sur[s]["action"] is None
        want = local_surprise(rig.model, p[s - 1], p[s], None, -1)
        assert math.isfinite(sur[s]["surprise"]) and abs(sur[s]["surprise"] - want) < 1e-4
        assert 0 < mrr[s]["rr"] <= 1 and mrr[s]["k"] == min(s, 6)
        rrs.append(mrr[s]["rr"])
    stats = rig.col.fresh_stats(lambda v: v["frames"] >= first + n, "stats after the stream")
    if first == 0:  # a fresh stream: replay the worker's running state here
        assert abs(mrr[seqs[-1]]["mrr"] - np.mean(rrs)) < 1e-9
        # surprise_z: each frame's per-patch errors standardised against the frames before
        sz = metrics.SurpriseZ()
        for s in seqs[1:]:
            pred = rig.model.predict(p[s - 1].mean(0)[None], p[s - 1][None],
                                     action_id=np.array([-1])).patches[0].numpy()
            want = sz(metrics.patch_errors(pred, p[s]))
            got = sur[s]["surprise_z"]
            assert (got is None) if math.isnan(want) else abs(got - want) < 1e-3, (s, got, want)
        assert sum(sur[s]["surprise_z"] is not None for s in seqs) == n - 1 - sz.warmup
        # horizon h > 1: one chain started at the HORIZON_EVERY-th predicted frame and was
        # ranked h - 1 frames later among the bank of 6 frames before that one
        start = HORIZON_EVERY - 1  # the chain rolls out from this frame's observed latent
        ids = np.full((1, HORIZON), -1)
        roll = rig.model.rollout(p[start].mean(0)[None], p[start][None], action_seq=ids)
        for h in range(2, HORIZON + 1):
            t = start + h
            bank = np.stack([frame_key(p[b]) for b in range(max(0, t - 6), t)])
            want = metrics.reciprocal_rank(frame_key(roll.patches_seq[0, h - 1].numpy()),
                                           frame_key(p[t]), bank, ties="truth")
            assert abs(stats["mrr_horizon"][h - 1] - want) < 1e-6, (h, stats["mrr_horizon"])
        assert abs(stats["mrr_horizon"][0] - stats["mrr"]) < 1e-6  # horizon 1 = per frame
    assert stats["ready"] == 1 and stats["restarts"] == 3 and stats["mode"] == "lossless"
    assert stats["dropped_overwritten"] == stats["torn"] == stats["skipped"] == 0
    # 16 frames: the horizon MRR was measured for all 5 horizons
    roll = rig.client.result("rollout", z_cls=z[seqs[-1]], k=7)
    assert roll["mrr_seq"].shape == (7,)
    assert all(0 < v <= 1 for v in roll["mrr_seq"][:5]) and np.isnan(roll["mrr_seq"][5:]).all()
    assert close_to(stats["mrr_horizon"], roll["mrr_seq"][:5], 1e-6)


def test_rpc_methods_match_local_model(rig: Rig) -> None:
    m, d = rig.model, rig.model.embed_dim
    health = rig.client.result("health")
    assert health["variant"] == "custom" and health["encoder"] == ENCODER
    assert (health["embed_dim"], health["num_patches"], health["cond_dim"],
            health["num_actions"]) == (d, m.num_patches, 16, NUM_ACTIONS)
    assert health["trained"] is True and health["model_path"] == str(rig.ckpt)
    assert health["mode"] == "lossless" and health["ready"] is True
    assert health["device"] == "cpu" and health["uptime_s"] > 0 and health["version"]

    frames = np.stack([frame_for(100), frame_for(101)])
    enc = rig.client.result("encode", frames=frames, patches=True)
    z_loc, p_loc = m.encode(frames)
    assert enc["z_cls"].shape == (2, d) and enc["patches"].shape == (2, m.num_patches, d)
    assert close_to(enc["z_cls"], z_loc) and close_to(enc["patches"], p_loc)
    assert enc["t_ns"] > 0 and "mrr" in enc
    assert "patches" not in rig.client.result("encode", frames=frames[0])

    cond = np.array([[0.5, 0.3, 0.0], [-1.0, 0.2, 0.9]], np.float32)
    ids = np.array([1, -1])
    pred = rig.client.result("predict", z_cls=enc["z_cls"], cond=cond, action_id=ids)
    loc = m.predict(z_loc, cond=pad_cond(cond, 16), action_id=ids)
    assert close_to(pred["z_cls_pred"], loc.z_cls) and close_to(pred["uncertainty"],
                                                                 loc.uncertainty)
    pred_p = rig.client.result("predict", z_cls=enc["z_cls"], patches=enc["patches"])
    assert pred_p["patches_pred"].shape == (2, m.num_patches, d)

    cond_seq = np.random.default_rng(0).normal(size=(3, 4, 16)).astype(np.float32)
    acts = np.array([[0, 1, 2, 3]] * 3)
    start = np.repeat(enc["z_cls"][:1], 3, axis=0)  # check_params wants one start per row
    roll = rig.client.result("rollout", z_cls=start, cond_seq=cond_seq, action_seq=acts)
    loc_r = m.rollout(z_loc[:1], cond_seq=cond_seq, action_seq=acts)
    assert roll["z_cls_seq"].shape == (3, 4, d) and roll["uncertainty_seq"].shape == (3, 4)
    assert close_to(roll["z_cls_seq"], loc_r.z_cls_seq)
    assert roll["mrr_seq"].shape == (4,) and roll["mrr_seq"].dtype == np.float32
    assert all(np.isnan(v) or 0 < v <= 1 for v in roll["mrr_seq"])


def test_actions_change_predictions(rig: Rig) -> None:
    a, b = frame_for(200), frame_for(201)
    act_a = wire.make_action([0.9, -0.4, 0.1], 2)
    act_b = wire.make_action([-0.7, 0.8], 0)
    s = write_paced(rig.prod, rig.col, [a, b, a, b], [None, act_a, None, act_b])
    sur = rig.col.by_seq(topics.SURPRISE)
    za, zb = (rig.model.encode(f)[1][0].numpy() for f in (a, b))  # patch latents (N, D)
    want_a = local_surprise(rig.model, za, zb, pad_cond([0.9, -0.4, 0.1], 16), 2)
    want_b = local_surprise(rig.model, za, zb, pad_cond([-0.7, 0.8], 16), 0)
    assert abs(sur[s[1]]["surprise"] - want_a) < 1e-4
    assert abs(sur[s[3]]["surprise"] - want_b) < 1e-4
    assert abs(want_a - want_b) > 1e-4, "different actions must give different predictions"
    assert sur[s[1]]["action"]["action_id"] == 2
    assert np.allclose(sur[s[1]]["action"]["vector"], [0.9, -0.4, 0.1])

    # the notice is the one way an action comes: an agent.action sent to the worker is not
    # used (the capture puts the agent's action on its notices), no action is no action
    for i in range(3):
        rig.agent.send(topics.ACTION, {"seq": i, "t_ns": clock_ns(),
                                       "vector": np.float32([0.3, 0.3]), "action_id": 3})
    time.sleep(0.2)
    s2 = write_paced(rig.prod, rig.col, [a, b])
    got = rig.col.by_seq(topics.SURPRISE)[s2[1]]
    assert got["action"] is None
    want = local_surprise(rig.model, za, zb, np.zeros(16, np.float32), -1)
    assert abs(got["surprise"] - want) < 1e-4


def test_garbage_is_answered_counted_and_worker_keeps_publishing(rig: Rig) -> None:
    rng = np.random.default_rng(7)
    before = rig.col.fresh_stats(lambda v: True, "stats")
    # frame notices: random bytes, a wrong kind; actions: a vector too long, an unknown id
    junk = [[b"iwm.frame", rng.bytes(40)], [b"iwm.frame", rng.bytes(3), rng.bytes(5)],
            [b"iwm.frame", wire.pack(topics.STATS, {"t_ns": 1, "source": "x",
                                                    "values": {}})[1]]]
    too_long = wire.make_action(np.zeros(17, np.float32))
    bad_id = wire.make_action(None, 99)
    deadline = time.monotonic() + 30
    while True:
        for frames in junk:
            rig.prod.pub.sock.send_multipart(frames)
        write_paced(rig.prod, rig.col, [frame_for(400), frame_for(401)], [too_long, bad_id])
        v = rig.col.fresh_stats(lambda v: True, "stats")
        if (v["decode_errors"] >= before["decode_errors"] + 3
                and v["bad_actions"] >= before["bad_actions"] + 2):
            break
        assert time.monotonic() < deadline, f"garbage not counted: {v}"

    # RPC: random multipart bytes, a reply instead of a request, bad params, unknown method
    for parts in (1, 2, 3):
        rig.client.send_raw([rng.bytes(int(rng.integers(1, 64))) for _ in range(parts)])
        reply = rig.client.recv()
        assert reply["ok"] is False and reply["id"] == -1 and "malformed" in reply["error"]
    rig.client.send_raw(wire.pack(topics.RPC, {"kind": "rpc_reply", "id": 77, "ok": True,
                                               "result": None, "error": None}))
    reply = rig.client.recv()
    assert reply["ok"] is False and reply["id"] == 77 and "rpc_request" in reply["error"]
    reply = rig.client.call("predict", z_cls=np.zeros((1, 5), np.float32))
    assert reply["ok"] is False and "z_cls" in reply["error"]
    reply = rig.client.call("predict", z_cls=np.zeros((1, rig.model.embed_dim), np.float32),
                            action_id=np.array([NUM_ACTIONS]))
    assert reply["ok"] is False and "action_id" in reply["error"]
    assert rig.client.call("fly", x=1)["ok"] is False
    assert rig.client.call("health")["ok"] is True

    first = rig.prod.ring.latest_seq + 1
    s = write_paced(rig.prod, rig.col, [frame_for(300 + i) for i in range(3)])
    assert s == [first, first + 1, first + 2]
    v = rig.col.fresh_stats(lambda v: v["frames"] >= first + 3, "stats after garbage")
    assert v["rpc_errors"] >= before["rpc_errors"] + 7
    assert v["rpc_requests"] >= before["rpc_requests"] + 8


def test_fuzzed_messages_never_stop_the_worker(rig: Rig) -> None:
    """issue 13: random and mutated frame notices and RPC requests; after
    each batch a good RPC request interleaved with them is answered, and after all of them
    the worker still publishes every new frame and has counted what it could not decode."""
    before = rig.col.fresh_stats(lambda v: True, "stats")
    seq = max(rig.prod.ring.latest_seq, 0)
    good = {
        "frame": wire.pack(topics.FRAME, {"seq": seq, "slot": rig.prod.ring.slot_of(seq),
                                          "t_capture_ns": clock_ns(), "height": H, "width": W,
                                          "channels": 3, "action": wire.make_action([0.5], 1),
                                          "source": "test"}),
        "rpc": wire.pack(topics.RPC, {"kind": "rpc_request", "id": 5, "method": "predict",
                                      "params": {"z_cls": np.zeros(rig.model.embed_dim,
                                                                   np.float32)}}),
    }
    sent = {"n": 0}

    @settings(max_examples=60, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def batch(data: st.DataObject) -> None:
        for _ in range(data.draw(st.integers(1, 4))):
            rig.prod.pub.send_frames(mutated(data, good["frame"]))
            rig.client.send_raw(mutated(data, good["rpc"]))
            sent["n"] += 1
        want = rig.client.next_id = rig.client.next_id + 1000
        rig.client.send_raw(wire.pack(topics.RPC, {"kind": "rpc_request", "id": want,
                                                   "method": "health", "params": {}}))
        deadline = time.monotonic() + 20
        while True:  # replies to the damaged requests that still carried an id come first
            reply = rig.client.recv(max(0.1, deadline - time.monotonic()))
            if reply["id"] == want:
                assert reply["ok"] and reply["result"]["ready"], reply
                break

    batch()
    assert rig.proc.is_alive()
    first = rig.prod.ring.latest_seq + 1
    seqs = write_paced(rig.prod, rig.col, [frame_for(900 + i) for i in range(4)])
    assert seqs == list(range(first, first + 4))
    after = rig.col.fresh_stats(lambda v: v["frames"] >= before["frames"] + 4, "stats")
    assert after["decode_errors"] > before["decode_errors"]
    assert after["rpc_errors"] > before["rpc_errors"]
    assert sent["n"] >= 60


def test_sigterm_exits_0_and_leaves_no_socket_files(rig: Rig) -> None:
    os.kill(rig.proc.pid, signal.SIGTERM)
    rig.proc.join(30)
    assert rig.proc.exitcode == 0
    for sock in (rig.eps.worker, rig.eps.rpc):
        assert not Path(sock[len("ipc://"):]).exists(), f"{sock} left behind"


# ----------------------------------------------------------------------------- in-process


@pytest.fixture(scope="module")
def model() -> IWM:
    return tiny_model()


@contextmanager
def serving(worker: EncoderWorker) -> Iterator[threading.Event]:
    """Run ``worker.serve`` in a thread; always stop and join it before leaving."""
    stop = threading.Event()
    t = threading.Thread(target=worker.serve, args=(stop,), daemon=True)
    t.start()
    try:
        yield stop
    finally:
        stop.set()
        t.join(30)
        assert not t.is_alive(), "serve() did not return after stop"


def test_realtime_processes_newest_and_counts_skips(model: IWM) -> None:
    d = short_dir()
    eps, name = Endpoints.ipc(d), f"iwmt_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    cfg = WorkerConfig(mode="realtime", stats_interval_s=0.2, mrr_bank=4)
    prod = Producer(eps, name)
    col = Collector(eps)
    n = 120
    try:
        with EncoderWorker(cfg, eps, name, model=model) as w:
            with serving(w):
                col.wait(lambda: col.stats().get("ready") == 1, "ready")
                for i in range(n):  # far faster than the worker encodes
                    prod.write(frame_for(i))
                col.wait(lambda: col.max_seq() == n - 1, "the newest frame")
            col.pump(200)  # the final stats
            seqs = col.seqs(topics.LATENT)
            assert seqs == sorted(set(seqs)) and seqs[-1] == n - 1
            assert col.seqs(topics.SURPRISE) == seqs == col.seqs(topics.MRR)
            st = w.stats
            assert st.skipped > 0 and len(seqs) < n
            assert len(seqs) + st.skipped + st.dropped_overwritten + st.torn == n
            sur = col.by_seq(topics.SURPRISE)
            # predicted through skipped frames up to MAX_GAP; beyond that no surprise
            for a, b in zip(seqs, seqs[1:], strict=False):
                near = b - a <= MAX_GAP
                assert sur[b]["pred_seq"] == (a if near else None), (a, b)
                assert (sur[b]["surprise"] is not None) == near
            assert col.stats()["skipped"] == st.skipped and col.stats()["fps_in"] >= 0
    finally:
        col.close()
        prod.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("mode", ["realtime", "lossless"])
def test_the_worker_processes_the_seqs_the_notices_name(model: IWM, mode: str) -> None:
    """Frames in the ring whose notice has not come are not processed (the notices say what
    to process, not the ring's newest seq), and a notice of a new capture (another ring id,
    though its seq goes on) starts a new stream read from the new ring."""
    d = short_dir()
    eps, name = Endpoints.ipc(d), f"iwmt_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    cfg = WorkerConfig(mode=mode, stats_interval_s=0.2, mrr_bank=4)
    prod = Producer(eps, name)
    col = Collector(eps)
    try:
        with EncoderWorker(cfg, eps, name, model=model) as w:
            with serving(w):
                col.wait(lambda: col.stats().get("ready") == 1, "ready")
                for i in range(3):
                    prod.write(frame_for(i))
                col.wait(lambda: col.max_seq() == 2, "the third frame")
                for i in range(3, 6):
                    prod.write(frame_for(i), notify=False)
                time.sleep(0.6)  # the old worker took the ring's newest (realtime) or waited
                col.pump(100)    # 250 ms for the notices (lossless), then went on without
                assert col.max_seq() == 2, "processed a frame no notice named"
                prod.notify(4)
                col.wait(lambda: col.max_seq() == 4, "the frame the notice named")
                time.sleep(0.3)
                col.pump(100)
                assert col.max_seq() == 4
                if mode == "lossless":  # the frame between, whose notice never came, too
                    assert col.seqs(topics.LATENT) == [0, 1, 2, 3, 4]
                n_before = len(col.msgs[topics.SURPRISE])
                prod.new_ring()
                for i in range(8):  # seqs 0..7 of the new capture, only the newest announced
                    prod.write(frame_for(100 + i), notify=i == 7)
                col.wait(lambda: 7 in col.seqs(topics.LATENT), "the new capture's frame")
            assert w.stats.stream_restarts == 1
            new = col.msgs[topics.SURPRISE][n_before:]
            assert new[0]["pred_seq"] is None  # nothing carried over from the old stream
            assert [m["seq"] for m in new] == ([7] if mode == "realtime" else list(range(8)))
            got = col.by_seq(topics.LATENT)[7]["z_cls"]
            want = model.encode(frame_for(107))[0][0].numpy()
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    finally:
        col.close()
        prod.close()
        shutil.rmtree(d, ignore_errors=True)


def test_a_restarted_lossless_worker_rewinds_without_false_losses_and_takes_resent_actions(
        model: IWM) -> None:
    """A worker taking over (restarts > 0) goes back slots - 1 frames from its first notice,
    but never below what the ring holds, and counts nothing lost for that; the notices the
    capture sends again (they went to the dead worker) give those frames their actions."""
    d = short_dir()
    eps, name = Endpoints.ipc(d), f"iwmt_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    prod = Producer(eps, name)
    try:
        for i in range(12):  # the ring (8 slots) holds 4..11; the dead worker published ..5
            prod.write(frame_for(i), notify=False)
        acts = {s: wire.make_action(None, s % NUM_ACTIONS) for s in range(6, 12)}

        def notice(seq: int) -> dict[str, Any]:
            return {"seq": seq, "slot": prod.ring.slot_of(seq), "t_capture_ns": prod.times[seq],
                    "height": H, "width": W, "channels": 3, "action": acts.get(seq),
                    "source": "test", "ring_id": prod.ring.ring_id}

        cfg = WorkerConfig(mode="lossless", mrr_bank=4)
        with EncoderWorker(cfg, eps, name, model=model, restarts=1) as w:
            got: dict[int, Any] = {}
            w._publish = lambda seq, t, action, results: got.setdefault(seq, action.wire)
            for seq in (9, 10, 11):  # live notices first
                w._on_frame(notice(seq))
            for _ in range(3):  # the rewind waits out its grace: the capture's re-sends of
                assert not w._step()  # the dead worker's notices are on their way
            for seq in (6, 7, 8):
                w._on_frame(notice(seq))
            deadline = time.monotonic() + 30
            while 11 not in got:
                assert time.monotonic() < deadline, f"stuck: {sorted(got)}"
                w._step()
            assert sorted(got) == list(range(4, 12))  # 9 - 7 = 2 is gone already: from 4 on
            assert w.stats.dropped_overwritten == 0  # nothing was lost
            assert got[4] is None and got[5] is None  # published by the dead worker
            for s in range(6, 12):
                assert got[s] == {"action_id": s % NUM_ACTIONS}, s
    finally:
        prod.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("mode", ["realtime", "lossless"])
def test_a_notice_beyond_the_ring_cannot_derail_the_worker(model: IWM, mode: str) -> None:
    """A well-formed notice naming a frame the ring has not written (a huge seq) is ignored
    and counted, first notice or not: the worker goes on with the real ones. (Taken as the
    newest, it would skip (realtime) or wait (lossless) for frames that never come.)"""
    d = short_dir()
    eps, name = Endpoints.ipc(d), f"iwmt_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    prod = Producer(eps, name)
    try:
        for i in range(6):
            prod.write(frame_for(i), notify=False)

        def notice(seq: int) -> dict[str, Any]:
            return {"seq": seq, "slot": 0, "t_capture_ns": clock_ns(), "height": H,
                    "width": W, "channels": 3, "action": None, "source": "test",
                    "ring_id": prod.ring.ring_id}

        with EncoderWorker(WorkerConfig(mode=mode, mrr_bank=4), eps, name, model=model) as w:
            got: list[int] = []
            w._publish = lambda seq, t, action, results: got.append(seq)
            for seq in (10**12, 2, 10**15, 3, 4, 5):
                w._on_frame(notice(seq))
                deadline = time.monotonic() + 30
                while w._has_work():
                    assert time.monotonic() < deadline
                    w._step()
            assert got[-1] == 5 and all(s <= 5 for s in got)
            assert w.stats_values()["bad_notices"] == 2
    finally:
        prod.close()
        shutil.rmtree(d, ignore_errors=True)


def test_missing_checkpoint_exits_2_before_binding(tmp_path: Path) -> None:
    d = short_dir()
    try:
        cfg = WorkerConfig(model_path=tmp_path / "missing.pt")
        assert run_worker(cfg, Endpoints.ipc(d), "iwmt_none") == 2
        assert list(d.iterdir()) == []
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_untrained_model_is_seeded_and_warns() -> None:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING")
    try:
        cfg = WorkerConfig(untrained=True, variant="invariant", encoder=ENCODER, img_size=IMG)
        m1, m2 = load_model(cfg), load_model(cfg)
    finally:
        logger.remove(sink)
    assert any("UNTRAINED" in line for line in lines)
    f = frame_for(5)
    z1, z2 = m1.encode(f)[0], m2.encode(f)[0]
    assert torch.equal(z1, z2)
    assert torch.equal(m1.predict(z1).z_cls, m2.predict(z2).z_cls)
    assert m1.config.pred_depth == 4 and m1.config.img_size == IMG


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_pinned_path_matches_cpu(model: IWM) -> None:
    d = short_dir()
    eps, name = Endpoints.ipc(d), f"iwmt_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    gpu_model = tiny_model("cuda")
    cfg = WorkerConfig(mode="lossless", device="cuda", stats_interval_s=0.2)
    prod = Producer(eps, name)
    col = Collector(eps)
    try:
        with EncoderWorker(cfg, eps, name, model=gpu_model) as w, serving(w):
            col.wait(lambda: col.stats().get("ready") == 1, "ready")
            seqs = write_paced(prod, col, [frame_for(i) for i in range(6)])
            assert w.reader._buf_t is not None and w.reader._buf_t.is_pinned()
            health = Client(eps)
            try:
                assert health.result("health")["device"].startswith("cuda")
            finally:
                health.close()
        lat = {m["seq"]: m["z_cls"] for m in col.msgs[topics.LATENT]}
        for s in seqs:  # bf16 autocast on the GPU: compare directions
            ref = model.encode(prod.frames[s])[0][0].numpy()
            cos = float(metrics.cosine_similarity(lat[s], ref))
            assert cos > 0.99, f"seq {s}: cosine {cos}"
        assert all(math.isfinite(m["surprise"]) for m in col.msgs[topics.SURPRISE][1:])
    finally:
        col.close()
        prod.close()
        shutil.rmtree(d, ignore_errors=True)


def test_latent_bank_ranks_as_the_metric_with_ties_for_the_truth() -> None:
    """The worker's one-pass ranking equals metrics.reciprocal_rank(ties="truth"), also
    when the bank holds copies of the observed frame (a static scene) and after wrapping."""
    from workers.stream import LatentBank

    rng = np.random.default_rng(0)
    bank = LatentBank(5, 12)
    keys: list[np.ndarray] = []
    for t in range(12):
        key = rng.normal(size=12) if t % 3 else (keys[-1] if keys else rng.normal(size=12))
        pred = key + rng.normal(0, 0.8, 12)
        if keys:
            want = metrics.reciprocal_rank(pred, key, np.stack(keys[-5:]), ties="truth")
            assert bank.rank(pred, key) == pytest.approx(want), t
        bank.add(key)
        keys.append(key)
    assert len(bank) == 5
    same = keys[-1]
    assert bank.rank(same, same) == 1.0  # a perfect prediction ranks first, copies or not


def test_model_stream_scores_the_prediction_under_the_action_not_the_answer(model: IWM) -> None:
    """ModelStream.step (the worker's per-frame step, in-process, in seconds) replayed here
    from its definition: each frame's surprise and reciprocal rank are those of the
    prediction made from the previous frame under the action that frame carries, ranked
    among the 6 frames before it (ties for the truth); the horizon-h MRR is that of an
    h-step rollout from the chain's start under the actions taken. Kills the mutants that
    query a rank with the observed latent (rr 1.0), rank a chain by the observed latent,
    score against the previous frame instead of the prediction, or drop the action."""
    from workers.model_stream import ModelStream
    from workers.stream import Action

    n, bank = 16, 6
    rng = np.random.default_rng(11)
    actions = [Action(pad_cond(rng.normal(size=3).astype(np.float32), 16), s % NUM_ACTIONS)
               for s in range(n)]
    stream = ModelStream(model.eval(), "test", mrr_bank=bank)
    got = [stream.step(s, frame_for(s), None, actions[s]) for s in range(n)]
    p = [model.encode(frame_for(s))[1][0].numpy() for s in range(n)]  # (N, D) each
    keys = [frame_key(x) for x in p]

    def rank(pred: np.ndarray, t: int) -> float:
        return metrics.reciprocal_rank(frame_key(pred), keys[t],
                                       np.stack(keys[max(0, t - bank):t]), ties="truth")

    assert got[0].surprise is None and got[0].rr is None
    rrs = []
    for s in range(1, n):
        a = actions[s]
        pred = model.predict(p[s - 1].mean(0)[None], p[s - 1][None], cond=a.cond[None],
                             action_id=np.array([a.action_id])).patches[0].numpy()
        assert got[s].pred_seq == s - 1 and got[s].k == min(s, bank)
        assert got[s].surprise == pytest.approx(metrics.patch_surprise(pred, p[s]), abs=1e-5), s
        rrs.append(rank(pred, s))
        assert got[s].rr == pytest.approx(rrs[-1]), s
    assert min(rrs) < 1.0  # a rank queried with the answer itself would be 1.0 everywhere
    horizon = stream.horizon.values()
    assert horizon[0] == pytest.approx(np.mean(rrs))
    # one chain: started from frame 7's observed latent at the HORIZON_EVERY-th prediction
    start = HORIZON_EVERY - 1
    steps = actions[start + 1:start + 1 + HORIZON]
    roll = model.rollout(p[start].mean(0)[None], p[start][None],
                         cond_seq=np.stack([a.cond for a in steps])[None],
                         action_seq=np.array([[a.action_id for a in steps]]))
    want = [rank(roll.patches_seq[0, h - 1].numpy(), start + h) for h in range(2, HORIZON + 1)]
    np.testing.assert_allclose(horizon[1:], want, atol=1e-6)
    assert min(want) < 1.0


def test_model_stream_predicts_through_skipped_frames_under_the_action(model: IWM) -> None:
    """Realtime skips frames: the prediction for a frame ``g`` frames after the last one is
    a g-step rollout under the frame's action (held), up to MAX_GAP; beyond that no
    surprise and no rank."""
    from workers.model_stream import ModelStream
    from workers.stream import Action

    action = Action(pad_cond(np.array([0.5, -1.0, 2.0], np.float32), 16), 2)
    seqs = [0, 1, 3, 6, 6 + MAX_GAP + 1]
    stream = ModelStream(model.eval(), "test", mrr_bank=6)
    got = {s: stream.step(s, frame_for(s), None, action) for s in seqs}
    p = {s: model.encode(frame_for(s))[1][0].numpy() for s in seqs}
    for prev, s in zip(seqs[:-2], seqs[1:-1], strict=True):
        g = s - prev
        roll = model.rollout(p[prev].mean(0)[None], p[prev][None],
                             cond_seq=np.repeat(action.cond[None, None], g, axis=1),
                             action_seq=np.full((1, g), action.action_id))
        want = metrics.patch_surprise(roll.patches_seq[0, -1].numpy(), p[s])
        assert got[s].pred_seq == prev
        assert got[s].surprise == pytest.approx(want, abs=1e-5), (prev, s)
    last = got[seqs[-1]]
    assert last.surprise is None and last.rr is None and last.pred_seq is None
