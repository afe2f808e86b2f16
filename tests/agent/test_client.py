"""IWMClient / AsyncIWMClient against a real spawned encoder worker (vit_tiny, 32 px), checked
against the same model run locally; timeouts, dead services, stale replies, bad arguments.

    .venv/bin/python -m pytest tests/test_client.py -q
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from agent_bridge import AsyncIWMClient, IWMClient
from agent_bridge.planner import (
    ActionSpace,
    CEMPlanner,
    PlannerConfig,
    RandomShootingPlanner,
    client_rollout_fn,
)
from iwm_bus.bus import topics, wire
from iwm_bus.bus.transport import Endpoints, bind
from iwm_bus.config import WorkerConfig
from iwm_bus.errors import ServiceError, ServiceTimeout

WAIT_S = 120.0  # the worker loads torch and its model first, on a possibly busy machine
ENCODER, IMG = "vit_tiny_patch16_224", 32
ATOL = 2e-4


@pytest.fixture(scope="module")
def worker() -> Iterator[Path]:
    """A real encoder worker process; no capture (the RPC needs none)."""
    from workers.encoder import run_worker

    path = Path(tempfile.mkdtemp(prefix="iwmcl", dir="/tmp"))
    eps = Endpoints.ipc(path)
    cfg = WorkerConfig(untrained=True, encoder=ENCODER, img_size=IMG)
    proc = mp.get_context("spawn").Process(
        target=run_worker, args=(cfg, eps, f"iwmcl_{secrets.token_hex(4)}"), daemon=True)
    proc.start()
    try:
        with IWMClient(path, timeout_s=WAIT_S) as client:
            client.health()  # waits (bounded) until the worker answers
        yield path
    finally:
        proc.terminate()
        proc.join(20)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def local_model() -> Any:
    """The worker's model, built here by the worker's own loader (same seed: same weights)."""
    from workers.encoder import load_model

    return load_model(WorkerConfig(untrained=True, encoder=ENCODER, img_size=IMG))


@pytest.fixture
def client(worker: Path) -> Iterator[IWMClient]:
    with IWMClient(worker, timeout_s=60) as c:
        yield c


def _frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 48, 40, 3), dtype=np.uint8)


def _np(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy()


# ----------------------------------------------------------------------------- shapes + agreement


def test_health_describes_the_model(client: IWMClient) -> None:
    info = client.health()
    assert (info["embed_dim"], info["cond_dim"], info["num_patches"]) == (192, 16, 4)
    assert info["variant"] == "core" and info["encoder"] == ENCODER and not info["trained"]
    assert client.info is info


def test_encode_matches_local_model(client: IWMClient, local_model: Any) -> None:
    frames = _frames(3)
    one = client.encode_image(frames[0])
    assert one.z_cls.shape == (192,) and one.patches is None and one.z_cls.dtype == np.float32
    assert one.t_ns > 0 and one.timestamp == one.t_ns / 1e9
    batch = client.encode_image(frames, patches=True)
    assert batch.z_cls.shape == (3, 192) and batch.patches.shape == (3, 4, 192)
    z, p = local_model.encode(frames)
    np.testing.assert_allclose(batch.z_cls, _np(z), atol=ATOL, rtol=1e-4)
    np.testing.assert_allclose(batch.patches, _np(p), atol=ATOL, rtol=1e-4)
    np.testing.assert_allclose(one.z_cls, batch.z_cls[0], atol=ATOL)


def test_predict_and_rollout_match_local_model(client: IWMClient, local_model: Any) -> None:
    from iwm_bus.model import pad_cond

    z = client.encode_image(_frames(1)[0]).z_cls.copy()
    pred = client.predict_next(z, aug_params=[0.5, 0.3, 0.0])
    assert pred.z_cls_pred.shape == (192,) and isinstance(pred.uncertainty, float)
    ref = local_model.predict(z[None], cond=pad_cond([[0.5, 0.3, 0.0]], 16))
    np.testing.assert_allclose(pred.z_cls_pred, _np(ref.z_cls)[0], atol=ATOL, rtol=1e-4)
    assert pred.uncertainty == pytest.approx(float(_np(ref.uncertainty)[0]), abs=1e-4)

    seq = [[0.5, 0.3], [0.4, 0.4], [0.3, 0.5]]
    roll = client.rollout(z, aug_seq=seq)
    assert roll.z_cls_seq.shape == (3, 192) and roll.mrr_seq.shape == (3,)
    assert roll.uncertainty_seq.shape == (3,)
    ref_roll = local_model.rollout(z[None], cond_seq=pad_cond([seq], 16))
    np.testing.assert_allclose(roll.z_cls_seq, _np(ref_roll.z_cls_seq)[0], atol=ATOL, rtol=1e-4)
    np.testing.assert_allclose(roll.uncertainty_seq, _np(ref_roll.uncertainty_seq)[0],
                               atol=1e-4)
    # k steps of no action
    assert client.rollout(z, k=2).z_cls_seq.shape == (2, 192)

    cands = np.random.default_rng(1).uniform(-1, 1, (7, 5, 3)).astype(np.float32)
    many = client.rollout_batch(z, aug_seqs=cands)
    assert many.z_cls_seq.shape == (7, 5, 192) and many.uncertainty_seq.shape == (7, 5)
    assert many.mrr_seq.shape == (5,)
    ref_many = local_model.rollout(z[None], cond_seq=pad_cond(cands, 16))
    np.testing.assert_allclose(many.z_cls_seq, _np(ref_many.z_cls_seq), atol=ATOL, rtol=1e-4)


def test_discrete_actions_match_local_model(client: IWMClient, local_model: Any) -> None:
    n_act = client.health()["num_actions"]
    if n_act == 0:
        pytest.skip("this worker's model has no discrete action tokens")
    z = client.encode_image(_frames(1, seed=2)[0]).z_cls.copy()
    pred = client.predict_next(z, action=n_act - 1)
    ref = local_model.predict(z[None], action_id=np.array([n_act - 1]))
    np.testing.assert_allclose(pred.z_cls_pred, _np(ref.z_cls)[0], atol=ATOL, rtol=1e-4)
    ids = np.random.default_rng(4).integers(0, n_act, (6, 4))
    many = client.rollout_batch(z, action_seqs=ids)
    assert many.z_cls_seq.shape == (6, 4, 192)
    ref_many = local_model.rollout(z[None], action_seq=ids)
    np.testing.assert_allclose(many.z_cls_seq, _np(ref_many.z_cls_seq), atol=ATOL, rtol=1e-4)
    one = client.rollout(z, action_seq=ids[2], aug_seq=np.zeros((4, 2)))  # both kinds at once
    np.testing.assert_allclose(one.z_cls_seq, many.z_cls_seq[2], atol=ATOL)


def test_async_client_agrees_with_sync(client: IWMClient, worker: Path) -> None:
    frame = _frames(1, seed=5)[0]
    sync_z = client.encode_image(frame).z_cls
    sync_roll = client.rollout(sync_z, aug_seq=[[0.1], [0.2]])

    async def main() -> tuple[Any, Any, Any, Any]:
        async with AsyncIWMClient(worker, timeout_s=60) as iwm:
            info = await iwm.health()
            res = await iwm.encode_image(frame)
            # two concurrent calls on one client queue on its lock and both succeed
            pred, roll = await asyncio.gather(
                iwm.predict_next(res.z_cls, aug_params=[0.5, 0.3, 0.0]),
                iwm.rollout(res.z_cls, aug_seq=[[0.1], [0.2]]))
            many = await iwm.rollout_batch(res.z_cls, aug_seqs=np.zeros((4, 2, 1), np.float32))
            return info, res, (pred, roll), many

    info, res, (pred, roll), many = asyncio.run(main())
    assert info["embed_dim"] == 192
    np.testing.assert_allclose(res.z_cls, sync_z, atol=ATOL)
    assert pred.z_cls_pred.shape == (192,)
    np.testing.assert_allclose(roll.z_cls_seq, sync_roll.z_cls_seq, atol=ATOL)
    assert many.z_cls_seq.shape == (4, 2, 192)


# ----------------------------------------------------------------------------- bad input


def test_bad_arguments_fail_before_sending(client: IWMClient) -> None:
    n_act = client.health()["num_actions"]
    before = sum(client.calls.values())
    z = np.zeros(192, np.float32)
    cases = [
        (lambda: client.predict_next(np.zeros(100, np.float32)), "z_cls"),
        (lambda: client.predict_next(z, aug_params=np.zeros(17)), "aug_params"),
        (lambda: client.predict_next(z, action=n_act), "action"),  # ids are 0..n-1
        (lambda: client.rollout(z, action_seq=[[1, 2]]), "action_seq"),
        (lambda: client.rollout(z, aug_seq=np.zeros((3, 20))), "aug_seq"),
        (lambda: client.rollout(z, aug_seq=np.zeros(3)), "aug_seq"),
        (lambda: client.rollout(z, aug_seq=np.zeros((65, 2))), "steps"),
        (lambda: client.rollout(z), "k"),
        (lambda: client.rollout_batch(z, aug_seqs=np.zeros((2, 3))), "aug_seqs"),
        (lambda: client.rollout_batch(z), "aug_seqs"),
        (lambda: client.encode_image(np.zeros((8, 8, 3), np.float32)), "frames"),
        (lambda: client.encode_image(np.zeros((8, 8), np.uint8)), "frames"),
        (lambda: client.predict_next(np.full(192, np.nan)), "z_cls"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()
    assert sum(client.calls.values()) == before  # nothing was sent


def test_error_reply_is_service_error(client: IWMClient) -> None:
    client.health()
    with pytest.raises(ServiceError, match="z_cls"):  # bypasses the client-side check
        client.call("predict", {"z_cls": np.zeros((1, 7), np.float32)})
    assert client.health()["embed_dim"] == 192  # and the client still works


# ----------------------------------------------------------------------------- timeouts


@pytest.mark.parametrize("kind", ["missing_ipc", "silent_tcp"])
def test_no_service_times_out_in_bounded_time(kind: str, run_dir: Path,
                                              free_port: int) -> None:
    target = run_dir if kind == "missing_ipc" else f"tcp://127.0.0.1:{free_port}"
    with IWMClient(target, timeout_s=0.5) as client:
        t0 = time.monotonic()
        with pytest.raises(ServiceTimeout, match="health.*0.5 s"):
            client.health()
        assert time.monotonic() - t0 < 2.5
        assert client.timeouts == 1

    async def main() -> float:
        async with AsyncIWMClient(target, timeout_s=0.5) as iwm:
            t1 = time.monotonic()
            with pytest.raises(ServiceTimeout):
                await iwm.encode_image(np.zeros((8, 8, 3), np.uint8))
            return time.monotonic() - t1

    assert asyncio.run(main()) < 2.5


def test_timeout_then_next_call_gets_its_own_reply(client: IWMClient) -> None:
    """A request that timed out must not have its late reply returned for the next call."""
    z = client.encode_image(_frames(1)[0]).z_cls
    big = np.zeros((128, 8, 16), np.float32)  # takes the worker well over 1 ms
    with pytest.raises(ServiceTimeout, match="rollout"):
        client.rollout_batch(z, aug_seqs=big, timeout_s=0.001)
    info = client.health()
    assert "embed_dim" in info and "z_cls_seq" not in info
    small = client.rollout(z, k=1)
    assert small.z_cls_seq.shape == (1, 192)


def _fake_router(endpoint: str, ready: threading.Event, done: threading.Event) -> None:
    """Answers each request first with junk and a wrong id, then a reply to an older id,
    then the real reply; the second request is answered late (after the client gave up)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    bind(sock, endpoint)
    ready.set()
    held: list[tuple[bytes, int]] = []
    try:
        while not done.is_set():
            if not sock.poll(50):
                continue
            ident, *body = sock.recv_multipart()
            _, req = wire.unpack(body)
            rid = req["id"]

            def reply(i: int, result: dict[str, Any], ident: bytes = ident) -> None:
                sock.send_multipart([ident, *wire.pack(topics.RPC, {
                    "kind": "rpc_reply", "id": i, "ok": True, "result": result,
                    "error": None})])

            sock.send_multipart([ident, b"iwm.rpc", b"\xc1garbage"])
            reply(rid + 1000, {"who": "wrong id"})
            for old_ident, old_id in held:  # late replies to requests that timed out
                reply(old_id, {"who": f"late {old_id}"}, old_ident)
            held.clear()
            if req["params"].get("k") == 99:  # "slow": answer on the next request
                held.append((ident, rid))
                continue
            reply(rid, {"who": f"answer {rid}"})
    finally:
        sock.close(linger=0)
        ctx.term()


def test_stale_and_garbled_replies_are_dropped(run_dir: Path) -> None:
    eps = Endpoints.ipc(run_dir)
    ready, done = threading.Event(), threading.Event()
    server = threading.Thread(target=_fake_router, args=(eps.rpc, ready, done), daemon=True)
    server.start()
    try:
        assert ready.wait(10)
        with IWMClient(run_dir, timeout_s=5) as client:
            assert client.call("health", {}) == {"who": "answer 1"}
            assert client.stale_replies == 1
            with pytest.raises(ServiceTimeout):
                client.call("rollout", {"k": 99}, timeout_s=0.3)
            # the socket was recreated after the timeout: the late reply to 2 never shows up
            assert client.call("health", {}) == {"who": "answer 3"}
            assert client.stale_replies == 3 and client.timeouts == 1
    finally:
        done.set()
        server.join(10)


def test_stale_reply_on_the_same_socket_is_dropped(run_dir: Path) -> None:
    """Requests 1 and 2 on one DEALER; the reply to 1 arrives while waiting for 2."""
    eps = Endpoints.ipc(run_dir)
    ready, done = threading.Event(), threading.Event()
    server = threading.Thread(target=_fake_router, args=(eps.rpc, ready, done), daemon=True)
    server.start()
    try:
        assert ready.wait(10)
        client = IWMClient(run_dir, timeout_s=5)
        sock = client._socket()
        deadline = time.monotonic() + 10
        while not sock.poll(100, zmq.POLLOUT):
            assert time.monotonic() < deadline
        # request 1 "slow": held by the server, sent by hand so the socket is kept
        sock.send_multipart(wire.pack(topics.RPC, {"kind": "rpc_request", "id": 1,
                                                   "method": "rollout", "params": {"k": 99}}))
        time.sleep(0.2)
        client._core._ids = iter(range(2, 100))
        # request 2 gets: junk, wrong id, LATE reply to 1, then its own answer
        assert client.call("health", {}) == {"who": "answer 2"}
        assert client.stale_replies == 3  # ids 1001, 1002 and the late 1
        client.close()
    finally:
        done.set()
        server.join(10)


# ----------------------------------------------------------------------------- planner via RPC


def test_cem_planner_over_rpc_one_call_per_iteration(client: IWMClient) -> None:
    z0 = client.encode_image(_frames(1, seed=3)[0]).z_cls
    true_seq = np.array([[0.8, -0.6], [0.5, 0.9], [-0.7, 0.2]], np.float32)
    goal = client.rollout(z0, aug_seq=true_seq).z_cls_seq[-1]
    cfg = PlannerConfig(horizon=3, samples=64, elites=8, iterations=6, seed=0)
    space = ActionSpace(dim=2)
    before = client.calls["rollout"]
    cem = CEMPlanner(client_rollout_fn(client), space, cfg).plan(z0, goal)
    assert client.calls["rollout"] - before == cfg.iterations == cem.calls
    rnd = RandomShootingPlanner(client_rollout_fn(client), space, cfg).plan(z0, goal)
    assert rnd.calls == cem.calls and rnd.rollouts == cem.rollouts == 64 * 6
    assert cem.vectors.shape == (3, 2) and np.isfinite(cem.cost)
    assert cem.cost <= rnd.cost
    assert cem.cost_history == sorted(cem.cost_history, reverse=True)


def test_encode_dual_from_a_single_stream_worker_says_it_needs_dual(client: IWMClient) -> None:
    from iwm_bus.errors import ServiceError

    with pytest.raises(ServiceError, match="dual worker"):
        client.encode_dual(_frames(1)[0])
    assert client.health()["abstraction_index"] is None  # untrained: nothing measured
