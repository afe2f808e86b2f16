"""One worker for many games (issue 30): a batched multi-stream worker gives each stream the
numbers it gets alone, and a stream that stops, restarts or sends bad notices leaves the
others alone.

The test plays N captures (one FrameRing each, notices carrying ``env``) against an
in-process :class:`EncoderWorker` driven step by step (``_on_frame`` / ``_step``: no timing,
so the batches are the same on every run), then replays each stream's frames, notices and
actions alone against a single-stream worker of the same model and compares. The streams
see different frames and different actions at the same seq, so a worker that used one
stream's previous latent, bank or action for another fails.

    .venv/bin/python -m pytest tests/worker/test_multi_env.py -q
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from test_encoder import NUM_ACTIONS, H, W, short_dir, tiny_model

from iwm_bus.bus import wire
from iwm_bus.bus.ring import FrameRing, env_ring_names
from iwm_bus.bus.transport import Endpoints
from iwm_bus.config import ConfigError, WorkerConfig
from iwm_bus.model import IWM
from workers.encoder import EncoderWorker
from workers.model_stream import StreamResult

pytestmark = pytest.mark.timeout(600)
SLOTS = 8


@pytest.fixture(scope="module")
def model() -> IWM:
    return tiny_model()


def frame_of(env: int, i: int, gen: int = 0) -> np.ndarray:
    return np.random.default_rng(10_000 * env + 100 * gen + i).integers(
        0, 256, (H, W, 3), dtype=np.uint8)


def action_of(env: int, i: int) -> dict[str, Any]:
    # differs between the streams at the same seq
    return wire.make_action(None, (i + env) % NUM_ACTIONS)


@dataclass
class Published:
    """What a worker published, per env in order: (seq, result, action map)."""

    got: dict[int | None, list[tuple[int, StreamResult, Any]]] = field(default_factory=dict)

    def __call__(self, seq: int, t: int, action: Any, results: list[StreamResult],
                 env: int | None = None) -> None:
        self.got.setdefault(env, []).append((seq, results[0], action.wire))


class Captures:
    """The capture side of N streams: a ring each, written as a schedule says."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.rings = {e: FrameRing.create(n, SLOTS, H, W) for e, n in enumerate(names)}
        self.gen = dict.fromkeys(self.rings, 0)

    def write(self, env: int, i: int) -> dict[str, Any]:
        """Frame i of stream env into its ring; its notice (with env)."""
        ring = self.rings[env]
        seq = ring.write(frame_of(env, i, self.gen[env]))
        return {"seq": seq, "slot": ring.slot_of(seq), "t_capture_ns": 1000 + seq,
                "height": H, "width": W, "channels": 3, "action": action_of(env, i),
                "source": "test", "ring_id": ring.ring_id, "env": env}

    def beyond(self, env: int) -> dict[str, Any]:
        """A well-formed notice of stream env naming a seq its ring has not written."""
        ring = self.rings[env]
        return {"seq": ring.latest_seq + 10**6, "slot": 0, "t_capture_ns": 5, "height": H,
                "width": W, "channels": 3, "ring_id": ring.ring_id, "env": env}

    def restart(self, env: int) -> None:
        """Stream env's capture restarts: a new ring under its name, seqs from 0."""
        ring = self.rings[env]
        ring.unlink()
        ring.close()
        self.rings[env] = FrameRing.create(self.names[env], SLOTS, H, W)
        self.gen[env] += 1

    def close(self) -> None:
        for ring in self.rings.values():
            ring.unlink()
            ring.close()


@pytest.fixture
def workdir() -> Iterator[Endpoints]:
    d = short_dir()
    try:
        yield Endpoints.ipc(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def drain(w: EncoderWorker, limit: int = 1000) -> None:
    for _ in range(limit):
        if not w._has_work():
            return
        w._step()
    raise AssertionError("the worker never ran out of work")


def run(model: IWM, eps: Endpoints, envs: list[int], schedule: list[tuple],
        batched: bool) -> tuple[Published, EncoderWorker]:
    """Play ``schedule`` (rounds of ("write", env, i) / ("restart", env) / ("beyond", env) /
    ("notice", msg) (the batched worker only),
    then the worker drains) for the streams ``envs``: all of them through one batched
    worker, or (``batched`` False, one env) through a single-stream worker, the notices
    without ``env``."""
    base = f"iwmt_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    names = env_ring_names(base, 3)
    caps = Captures(names)
    out = Published()
    cfg = WorkerConfig(mode="lossless", mrr_bank=4, envs=3 if batched else 1)
    try:
        with EncoderWorker(cfg, eps, names if batched else names[envs[0]], model=model) as w:
            w._publish = out  # type: ignore[method-assign]
            for rnd in schedule:
                for ev in rnd:
                    if ev[0] == "notice":
                        if batched:
                            w._on_frame(ev[1])
                        continue
                    if ev[1] not in envs:
                        continue
                    if ev[0] == "restart":
                        caps.restart(ev[1])
                        continue
                    msg = caps.write(ev[1], ev[2]) if ev[0] == "write" else caps.beyond(ev[1])
                    if not batched:
                        del msg["env"]
                    w._on_frame(msg)
                drain(w)
        return out, w
    finally:
        caps.close()


def assert_same(alone: list[tuple[int, StreamResult, Any]],
                together: list[tuple[int, StreamResult, Any]], env: int) -> None:
    assert [s for s, _, _ in together] == [s for s, _, _ in alone], env
    for (seq, a, act_a), (_, b, act_b) in zip(alone, together, strict=True):
        where = f"env {env} seq {seq}"
        assert act_b == act_a, where  # the action attributed to this stream's frame
        assert (b.pred_seq, b.k) == (a.pred_seq, a.k), where
        for name in ("surprise", "surprise_z", "rr", "mrr"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None), (where, name)
            if x is not None:
                assert y == pytest.approx(x, rel=1e-4, abs=1e-5), (where, name)
        np.testing.assert_allclose(b.z_cls, a.z_cls, rtol=1e-4, atol=1e-5, err_msg=where)


def test_each_stream_of_a_batched_worker_gets_the_numbers_it_gets_alone(
        model: IWM, workdir: Endpoints, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three games through one batched worker: each stream's surprise, surprise_z, rr, MRR,
    bank size and action equal a single-stream worker's on the same frames. The streams run
    ragged (stream 1 stops early, stream 2 starts late, stream 0 ends alone), so batches of
    1, 2 and 3 occur."""
    schedule = [[("write", 0, i), ("write", 1, i)] + ([("write", 2, i - 3)] if i >= 3 else [])
                for i in range(7)]
    schedule += [[("write", 0, i), ("write", 2, i - 3)] for i in range(7, 12)]
    schedule += [[("write", 0, i)] for i in range(12, 14)]
    batches: list[int] = []
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda f: batches.append(
        len(f) if np.ndim(f) == 4 else 1) or encode(f))
    together, w = run(model, workdir, [0, 1, 2], schedule, batched=True)
    assert set(batches) == {1, 2, 3}, batches  # one encoder call a batch of streams
    n_frames = sum(len(v) for v in together.got.values())
    assert len(batches) < n_frames
    monkeypatch.setattr(model, "encode", encode)
    for env in range(3):
        alone, _ = run(model, workdir, [env], schedule, batched=False)
        assert_same(alone.got[None], together.got[env], env)
    # the streams really differ at the same seq: mixing them would show
    pairs = list(zip(together.got[0], together.got[1], strict=False))
    assert all(a[0] == b[0] for a, b in pairs)
    assert all(a[2] != b[2] for a, b in pairs)  # another action
    assert all(a[1].surprise != pytest.approx(b[1].surprise) for a, b in pairs[1:])


def test_a_stream_that_restarts_stops_or_sends_bad_notices_leaves_the_others_alone(
        model: IWM, workdir: Endpoints) -> None:
    """Stream 1's capture restarts mid-run (a new ring, seqs from 0) and then stops; bad
    notices arrive (an env this worker does not serve, a seq beyond stream 2's ring). Streams
    0 and 2 go on with the numbers they get alone; stream 1 starts over (its first frame
    after the restart has no prediction) and nothing of its old state carries over."""
    schedule = [[("write", 0, i), ("write", 1, i), ("write", 2, i)] for i in range(5)]
    schedule += [[("restart", 1)]]
    bad_env = {"seq": 0, "slot": 0, "t_capture_ns": 5, "height": H, "width": W,
               "channels": 3, "env": 7}
    schedule += [[("write", 0, i), ("write", 1, i - 5), ("write", 2, i),
                  ("notice", {**bad_env, "env": 7 + i}), ("beyond", 2)] for i in range(5, 8)]
    schedule += [[("write", 0, i), ("write", 2, i)] for i in range(8, 11)]
    together, w = run(model, workdir, [0, 1, 2], schedule, batched=True)
    assert w.bad_envs == 3 and w.stats.stream_restarts == 1
    assert w.stats_values()["bad_notices"] == 3 + 3  # and 3 beyond stream 2's ring
    for env in (0, 2):
        alone, _ = run(model, workdir, [env], schedule, batched=False)
        assert_same(alone.got[None], together.got[env], env)
    one = together.got[1]
    assert [s for s, _, _ in one] == [0, 1, 2, 3, 4, 0, 1, 2]
    # the new capture's first frame is predicted from nothing, its bank empty
    assert one[5][1].pred_seq is None and one[5][1].k == 0 and one[5][1].surprise is None
    alone1, _ = run(model, workdir, [1], schedule, batched=False)
    assert_same(alone1.got[None], one, 1)


def test_envs_is_validated_and_names_one_ring_a_stream() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="envs"):
            WorkerConfig(envs=bad)
    with pytest.raises(ConfigError, match="stream"):
        WorkerConfig(envs=2, stream="semantic")
    assert env_ring_names("iwm_x", 1) == ["iwm_x"]
    assert env_ring_names("iwm_x", 3) == ["iwm_x.e0", "iwm_x.e1", "iwm_x.e2"]
