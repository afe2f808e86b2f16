"""The dual-stream worker (issue 11): two models in one worker, through the real launcher.

A semantic (invariant) and an equivariant checkpoint, small and untrained but with the
eval summary an exported checkpoint carries, run by ``iwm-launch --dual`` on a real game
(ALE Pong). Every check compares against something that differs between the streams, so a
worker that swapped them, published one model twice or dropped a stream fails.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_launch import ROOT, Sidecar

from agent_bridge import ArbiterConfig, ArbiterHooks, BeingState, VisionBridge
from agent_bridge.client import AsyncIWMClient, IWMClient
from iwm_bus import metrics
from iwm_bus.bus import topics
from iwm_bus.model import create_iwm_model, load_iwm, save_checkpoint

SMALL = {"encoder_name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8,
         "encoder_depth": 2, "pred_dim": 96, "pred_heads": 3, "num_actions": 18}
#: the augmentation MRR each test checkpoint's "eval" says it measured (bank 256)
AUG = {"semantic": 0.03, "equivariant": 0.61}
CHANCE = 0.0239


def _checkpoint(path: Path, variant: str, seed: int, aug_mrr: float, **overrides) -> Path:
    model = create_iwm_model(variant, seed=seed, **{**SMALL, **overrides})
    save_checkpoint(model, path, info={
        "name": f"test-{variant}", "action_vocab": "iwm-18",
        "run_config": {"train": {"phase": 3}, "objective": {"views_weight": 1.0}},
        "eval": {"augmentation_mrr": {"model": aug_mrr, "chance": CHANCE}}})
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("dual")
    return (_checkpoint(d / "inv.pt", "invariant", 1, AUG["semantic"]),
            _checkpoint(d / "eq.pt", "equivariant", 2, AUG["equivariant"]))


def test_dual_worker_on_a_real_game_publishes_both_streams_serves_encode_dual_and_fills_state(
        pair):
    inv, eq = pair
    sc = Sidecar("--dual", "--semantic-model", str(inv), "--model", str(eq),
                 "--source", "gym:ALE/Pong-v5", "--fps", "15", "--duration", "120",
                 "--no-standby", "--agent", "none",
                 sub_topics=(topics.LATENT, topics.SURPRISE, topics.MRR, topics.STATS))
    try:
        sc.manifest()
        with VisionBridge(sc.run_dir) as bridge:
            seen: dict[str, dict[int, dict]] = {}
            stats: list[dict] = []
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                got = sc.sub.recv(200)
                if got is None:
                    continue
                topic, msg = got
                if topic == topics.STATS:
                    if msg["source"] == "worker":
                        stats.append(msg["values"])
                    continue
                seen.setdefault(topic, {})[msg["seq"]] = msg
                if len(seen.get(topics.MRR, {})) >= 12 and stats:
                    break
            plain = {t: seen.get(t, {}) for t in (topics.LATENT, topics.SURPRISE, topics.MRR)}
            sem = {t: seen.get(t + ".semantic", {}) for t in plain}
            # both streams, for the same frames, each from its own model
            assert len(plain[topics.MRR]) >= 12, sc.output()[-3000:]
            common = set(plain[topics.LATENT]) & set(sem[topics.LATENT])
            assert len(common) >= 10
            for t in plain:  # a frame's semantic messages go out before its plain ones
                assert set(plain[t]) <= set(sem[t]) and len(set(sem[t]) - set(plain[t])) <= 1
                assert {m["variant"] for m in plain[t].values()} == {"equivariant"}
                assert {m["variant"] for m in sem[t].values()} == {"invariant"}
            seq = max(common)
            z_eq, z_sem = plain[topics.LATENT][seq]["z_cls"], sem[topics.LATENT][seq]["z_cls"]
            assert z_eq.shape == z_sem.shape and not np.allclose(z_eq, z_sem, atol=1e-3)
            assert any(m["surprise"] is not None for m in sem[topics.SURPRISE].values())

            # the abstraction index of each stream, from its checkpoint's augmentation MRR
            want = {k: metrics.abstraction_index(v, CHANCE) for k, v in AUG.items()}
            assert want["semantic"] > 0.95 and want["equivariant"] < 0.45
            last = stats[-1]
            assert last["abstraction_index"] == pytest.approx(want["equivariant"])
            assert {k: v["abstraction_index"] for k, v in last["streams"].items()} == \
                pytest.approx(want)
            # rollout chains only where RPC rollout reads them: the equivariant stream
            horizons = {k: v["mrr_horizon"] for k, v in last["streams"].items()}
            assert len(horizons["equivariant"]) == 5 and horizons["equivariant"] == \
                last["mrr_horizon"]
            assert len(horizons["semantic"]) == 1  # horizon 1: its one-step predictions

            # encode_dual over RPC, sync and asyncio: each stream is its own model's latent
            frame = np.random.default_rng(0).integers(0, 255, (210, 160, 3), np.uint8)
            local = {name: load_iwm(p, "cpu") for name, p in (("semantic", inv),
                                                              ("equivariant", eq))}
            expect = {name: m.encode(frame)[0][0].numpy() for name, m in local.items()}
            with IWMClient(sc.run_dir) as client:
                health = client.health()
                got_sync = client.encode_dual(frame, patches=True)
            assert {k: v["abstraction_index"] for k, v in health["streams"].items()} == \
                pytest.approx(want)
            assert health["abstraction_index"] == pytest.approx(want["equivariant"])

            async def via_asyncio():
                async with AsyncIWMClient(sc.run_dir) as aclient:
                    return await aclient.encode_dual(frame)

            got_async = asyncio.run(via_asyncio())
            for res in (got_sync, got_async):
                np.testing.assert_allclose(res.semantic.z_cls, expect["semantic"], atol=1e-4)
                np.testing.assert_allclose(res.equivariant.z_cls, expect["equivariant"],
                                           atol=1e-4)
            assert got_sync.semantic.patches.shape == (16, 192)

            # BeingState: both latents and the semantic stream's numbers
            st = bridge.wait_update(timeout_s=10)
            deadline = time.monotonic() + 10
            while st.vision_semantic_surprise is None and time.monotonic() < deadline:
                st = bridge.wait_update(timeout_s=10)
            assert st.vision_equivariant is not None and st.vision_semantic is not None
            assert not np.allclose(st.vision_equivariant, st.vision_semantic, atol=1e-3)
            assert st.vision_semantic_surprise is not None and st.semantic_seq is not None
            assert st.vision_semantic_mrr is not None
    finally:
        sc.close()


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), "--source", "synthetic",
                           "--duration", "2", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_dual_bad_input_exits_2_naming_the_stream(pair, tmp_path):
    inv, eq = pair
    other = _checkpoint(tmp_path / "inv64.pt", "invariant", 3, 0.05, img_size=64)
    cases = [
        (("--dual", "--model", str(eq), "--semantic-model", str(other)),
         "must share one encoder input"),
        (("--dual", "--model", str(eq), "--semantic-model", str(tmp_path / "none.pt")),
         "semantic stream checkpoint"),
        (("--dual", "--model", str(tmp_path / "none.pt"), "--semantic-model", str(inv)),
         "equivariant stream checkpoint"),
        (("--semantic-model", str(inv)), "needs --dual"),
        (("--dual", "--model", str(eq), "--semantic-model",
          str(_checkpoint(tmp_path / "inv5.pt", "invariant", 4, 0.05, num_actions=5))),
         "one action format"),
        (("--dual", "--variant", "core"), "--variant does not apply"),
    ]
    for args, needle in cases:
        out = _launch("--run-dir", str(tmp_path / "run"), *args)
        assert out.returncode == 2, (args, out.stderr[-2000:])
        assert needle in out.stderr + out.stdout, (args, out.stderr[-2000:])
        assert "worker ready" not in out.stderr + out.stdout  # nothing started


def test_escalation_reads_the_semantic_stream_and_slowing_down_the_equivariant_one():
    hooks = ArbiterHooks(ArbiterConfig(escalate_surprise_z=5.0, slow_down_surprise=0.7,
                                       escalate_mrr=0.0))
    calm_core = BeingState(vision_prediction_surprise=0.2, vision_surprise_z=1.0,
                           frame_seq=10, surprise_seq=10)
    # a single-stream worker: the core stream's z escalates
    assert not hooks.surprising(calm_core)
    single_spike = BeingState(vision_prediction_surprise=0.2, vision_surprise_z=9.0,
                              frame_seq=10, surprise_seq=10)
    assert hooks.surprising(single_spike)
    # dual: the semantic stream decides escalation, whatever the equivariant stream says
    dual_sem_spike = BeingState(vision_prediction_surprise=0.2, vision_surprise_z=1.0,
                                vision_semantic_surprise_z=9.0, frame_seq=10, surprise_seq=10,
                                semantic_seq=10)
    dual_eq_spike = BeingState(vision_prediction_surprise=0.9, vision_surprise_z=9.0,
                               vision_semantic_surprise_z=1.0, frame_seq=10, surprise_seq=10,
                               semantic_seq=10)
    assert hooks.surprising(dual_sem_spike) == ["semantic surprise_z 9.0 > escalate 5"]
    decision = hooks.assess(dual_sem_spike)
    assert decision.escalate and decision.semantic_surprise_z == 9.0
    assert decision.surprise_z == 1.0
    assert not hooks.surprising(dual_eq_spike)
    assert hooks.slow_down(dual_eq_spike) and not hooks.slow_down(dual_sem_spike)
    # a semantic value from long ago does not count
    stale = BeingState(vision_surprise_z=1.0, vision_semantic_surprise_z=9.0, frame_seq=50,
                       surprise_seq=50, semantic_seq=10)
    assert not hooks.surprising(stale)


def test_a_model_never_trained_on_views_has_no_abstraction_index(tmp_path):
    from workers.model_stream import checkpoint_abstraction

    eval_only = {"eval": {"augmentation_mrr": {"model": CHANCE, "chance": CHANCE}}}
    for run, want in (({"train": {"phase": 3}, "objective": {"views_weight": 0.0}}, None),
                      ({"train": {"phase": 1}}, 1.0),
                      ({"train": {"phase": 3}, "objective": {"views_weight": 1.0}}, 1.0)):
        model = create_iwm_model("invariant", **SMALL)
        save_checkpoint(model, tmp_path / "m.pt", info={**eval_only, "run_config": run})
        assert checkpoint_abstraction(load_iwm(tmp_path / "m.pt", "cpu")) == want, run


def test_only_the_stream_that_answers_rollout_measures_rollout_horizons():
    """The primary stream's model answers RPC rollout with its horizon MRR as confidence;
    the semantic stream's, and a named stream's worker (no RPC), would be read by nothing."""
    from iwm_bus.config import WorkerConfig
    from workers.encoder import stream_horizons
    from workers.stream import HORIZON

    assert stream_horizons(WorkerConfig(), 1) == [HORIZON]
    assert stream_horizons(WorkerConfig(dual=True), 2) == [HORIZON, 1]
    assert stream_horizons(WorkerConfig(stream="semantic"), 1) == [1]


@pytest.mark.timeout(240)  # its own waits: the manifest (60 s) and the worker's load (90 s)
def test_the_shipped_pair_answers_health_encode_dual_and_rollout():
    """``iwm-launch --dual`` with its default checkpoints (iwm_bus/weights), as a new user runs
    it. Their provenance (run config, eval summary) is deeper than the tiny pair's above:
    health once carried it whole, deeper than the wire allows, and the worker could not send
    its reply ("message nests deeper than 8 levels")."""
    sc = Sidecar("--dual", "--source", "gym:ALE/Breakout-v5", "--fps", "10",
                 "--duration", "150", "--no-standby", "--agent", "none")
    try:
        sc.manifest(timeout=60)
        frame = np.random.default_rng(2).integers(0, 255, (210, 160, 3), np.uint8)
        # the manifest comes before the worker has loaded: wait as long as it may take
        with IWMClient(sc.run_dir, timeout_s=90) as client:
            health = client.health()
            dual = client.encode_dual(frame)
            roll = client.rollout(dual.equivariant.z_cls, action_seq=[1, 2, 3])
        streams = health["streams"]
        assert {k: v["variant"] for k, v in streams.items()} == \
            {"semantic": "invariant", "equivariant": "equivariant"}
        # a summary of each checkpoint: its name, step and headline eval numbers
        names = {k: v["checkpoint"]["name"] for k, v in streams.items()}
        assert names == {"semantic": "iwm-invariant-v1", "equivariant": "iwm-equivariant-v1"}
        for stream in streams.values():
            assert stream["checkpoint"]["step"] > 0
            assert 0 < stream["checkpoint"]["eval"]["next_latent_mrr.model"] <= 1
        assert health["checkpoint"]["name"] == "iwm-equivariant-v1"
        d = health["embed_dim"]
        assert dual.semantic.z_cls.shape == dual.equivariant.z_cls.shape == (d,)
        assert not np.allclose(dual.semantic.z_cls, dual.equivariant.z_cls, atol=1e-3)
        assert roll.z_cls_seq.shape == (3, d) and np.isfinite(roll.z_cls_seq).all()
    finally:
        sc.close()
