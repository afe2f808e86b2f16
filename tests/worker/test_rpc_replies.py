"""Every RPC reply fits the wire: a reply the worker cannot send fails here, not at a user.

A worker in this process serves the shipped dual pair (iwm_bus/weights, the deepest
provenance we ship) on a real ROUTER socket; a plain DEALER calls every method in
``rpc.METHODS`` and reads the reply's bytes: ``ok``, nested no deeper than the wire allows,
and no larger than ``rpc.reply_bytes`` said (the bound ``check_params`` holds requests to, so
that a request whose reply would not fit is refused before it is sent).

    .venv/bin/pytest tests/worker/test_rpc_replies.py -q
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from iwm_bus.bus import rpc, topics, wire
from iwm_bus.bus.transport import Endpoints
from iwm_bus.config import WorkerConfig
from iwm_bus.provenance import checkpoint_summary
from workers.encoder import EncoderWorker, load_models

pytestmark = pytest.mark.timeout(120)
#: room in a reply for what is not an array (keys, scalars, each array's dtype and shape)
NON_ARRAY_BYTES = wire.MAX_MESSAGE_BYTES - rpc.MAX_REPLY_ARRAY_BYTES


def depth(value: Any) -> int:
    """How deep ``value`` (a msgpack body) nests, counted as ``wire`` counts it."""
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


class Worker:
    """The shipped dual pair served by an EncoderWorker thread, and a DEALER to call it."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="iwr", dir="/tmp"))
        self.eps = Endpoints.ipc(self.dir)
        cfg = WorkerConfig(dual=True)
        self.models = load_models(cfg)
        self.worker = EncoderWorker(cfg, self.eps, f"iwmt_{os.getpid()}_{uuid.uuid4().hex[:6]}",
                                    models=self.models)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.worker.serve, args=(self.stop,), daemon=True)
        self.thread.start()
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.eps.rpc)
        self.ids = 0

    def call(self, method: str, params: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        """The decoded reply and its raw payload."""
        self.ids += 1
        self.sock.send_multipart(wire.pack(topics.RPC, {
            "kind": "rpc_request", "id": self.ids, "method": method, "params": params}))
        assert self.sock.poll(60_000), f"no reply to {method} within 60 s"
        frames = self.sock.recv_multipart()
        _, msg = wire.unpack(frames)
        assert msg["id"] == self.ids
        return msg, frames[1]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.sock.close(linger=0)
        self.ctx.term()
        self.worker.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        assert not self.thread.is_alive(), "serve() did not return after stop"


@pytest.fixture(scope="module")
def shipped() -> Iterator[Worker]:
    w = Worker()
    try:
        yield w
    finally:
        w.close()


def _cases(w: Worker) -> dict[str, dict[str, Any]]:
    """A request of every method, with patches wherever a method takes them."""
    model = w.models[0][1]
    d, n = model.embed_dim, model.num_patches
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (2, 210, 160, 3), np.uint8)
    z = rng.normal(size=(3, d)).astype(np.float32)
    patches = rng.normal(size=(3, n, d)).astype(np.float32)
    return {
        "health": {},
        "encode": {"frames": frames, "patches": True},
        "encode_dual": {"frames": frames, "patches": True},
        "predict": {"z_cls": z, "patches": patches, "cond": z[:, :3], "action_id": [1, 2, 3]},
        "rollout": {"z_cls": z, "patches": patches, "action_seq": [[0, 1, 2, 3]] * 3},
    }


def test_every_method_replies_within_the_wire_limits(shipped: Worker) -> None:
    cases = _cases(shipped)
    assert set(cases) == set(rpc.METHODS), "a new method needs a case here"
    model = shipped.models[0][1]
    limits = {"embed_dim": model.embed_dim, "cond_dim": model.config.cond_dim,
              "num_actions": model.config.num_actions, "num_patches": model.num_patches}
    for method, params in cases.items():
        reply, payload = shipped.call(method, params)
        assert reply["ok"], f"{method}: {reply['error']}"
        assert depth(msgpack.unpackb(payload, raw=False)) <= wire.MAX_DEPTH, method
        checked = rpc.check_params(method, params, **limits)
        bound = rpc.reply_bytes(method, checked, model.embed_dim, model.num_patches)
        arrays = sum(v.nbytes for v in reply["result"].values() if isinstance(v, np.ndarray))
        assert arrays == bound, f"{method}: rpc.reply_bytes is {bound}, the reply {arrays}"
        assert len(payload) <= bound + NON_ARRAY_BYTES, method


def test_health_carries_each_checkpoint_as_a_flat_summary(shipped: Worker) -> None:
    health, payload = shipped.call("health", {})
    result = health["result"]
    for name, model in shipped.models:
        summary = result["streams"][name]["checkpoint"]
        assert summary == checkpoint_summary(model.provenance)
        assert summary["name"] == model.provenance["name"] and summary["step"] > 0
        assert all(not isinstance(v, (dict, list)) for v in summary["eval"].values())
    assert len(payload) < 32 * 1024


def test_health_stays_small_whatever_a_checkpoint_carries(shipped: Worker) -> None:
    """A provenance far deeper and larger than the wire carries: health still replies."""
    deep: Any = {"model": 0.5}
    for _ in range(40):
        deep = {"more": deep, "n": 1}
    model = shipped.models[1][1]
    saved = model.provenance
    model.provenance = {**saved, "eval": {**saved["eval"], "deep": deep},
                        "run_config": {**saved["run_config"], "blob": "x" * (8 << 20)},
                        "name": "n" * 100_000}
    try:
        reply, payload = shipped.call("health", {})
    finally:
        model.provenance = saved
    assert reply["ok"], reply["error"]
    assert len(payload) < 32 * 1024


def test_a_request_whose_reply_would_not_fit_is_refused_before_it_is_sent() -> None:
    """4096 candidates x 64 steps of a 192-wide latent: a reply three times what a
    message carries (193 MiB). The worker used to run it and then fail to send it."""
    d, n, k = 192, 64, 64
    limits = {"embed_dim": d, "cond_dim": 16, "num_actions": 18, "num_patches": n}

    def rollout(b: int) -> dict[str, Any]:
        return {"z_cls": np.zeros((b, d), np.float32), "action_seq": np.zeros((b, k), np.int64)}

    with pytest.raises(ValueError, match="reply would hold 193 MiB.*split the batch"):
        rpc.check_params("rollout", rollout(4096), **limits)
    # the largest batch accepted has a reply that packs
    per_row = 4 * (k * d + k)
    most = (rpc.MAX_REPLY_ARRAY_BYTES - 4 * k) // per_row
    rpc.check_params("rollout", rollout(most), **limits)
    with pytest.raises(ValueError, match="split the batch"):
        rpc.check_params("rollout", rollout(most + 1), **limits)
    result = {"z_cls_seq": np.zeros((most, k, d), np.float32),
              "uncertainty_seq": np.zeros((most, k), np.float32),
              "mrr_seq": np.zeros(k, np.float32)}
    wire.pack(topics.RPC, {"kind": "rpc_reply", "id": 1, "ok": True, "result": result,
                           "error": None})
    # encode: 256 frames with patches of a ViT-B/16 at 224 (196 x 768) do not fit either
    frames = np.zeros((256, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="split the batch"):
        rpc.check_params("encode", {"frames": frames, "patches": True}, embed_dim=768,
                         cond_dim=16, num_actions=18, num_patches=196)
