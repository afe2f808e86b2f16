"""Arbiter hooks (the seed's ActionArbiter examples) and the CEM planner on toy dynamics
where the answer is known (local rollout_fn, no worker needed).

    .venv/bin/python -m pytest tests/test_arbiter_planner.py -q
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from agent_bridge import BeingState
from agent_bridge.arbiter import ArbiterConfig, ArbiterDecision, ArbiterHooks, TemporalCoherence
from agent_bridge.planner import (
    ActionSpace,
    CEMPlanner,
    PlannerConfig,
    RandomShootingPlanner,
    latent_cost,
    patch_focus_weights,
)
from iwm_bus import metrics
from iwm_bus.errors import StaleDataError


def _state(seq: int = 10, surprise: float | None = None, mrr: float | None = None,
           surprise_seq: int | None = None, mrr_seq: int | None = None,
           surprise_z: float | None = None) -> BeingState:
    st = BeingState()
    st.update_latent(np.ones(4, np.float32), seq=seq)
    st.vision_prediction_surprise = surprise
    st.vision_surprise_z = surprise_z
    st.surprise_seq = seq if surprise_seq is None else surprise_seq
    st.vision_mrr = mrr
    st.mrr_seq = seq if mrr_seq is None else mrr_seq
    return st


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# ----------------------------------------------------------------------------- arbiter


def test_config_validation_names_the_field() -> None:
    for kwargs, field in [({"slow_down_surprise": 3.0}, "slow_down_surprise"),
                          ({"escalate_mrr": 1.5}, "escalate_mrr"),
                          ({"coherence_penalty": -0.1}, "coherence_penalty"),
                          ({"min_delay_s": 2.0, "max_delay_s": 1.0}, "max_delay_s"),
                          ({"wait_action_id": -1}, "wait_action_id"),
                          ({"max_age_ms": 0}, "max_age_ms")]:
        with pytest.raises(ValueError, match=f"ArbiterConfig.{field}"):
            ArbiterConfig(**kwargs)


def test_high_surprise_slows_down_and_prefers_wait() -> None:
    hooks = ArbiterHooks(ArbiterConfig(wait_action_id=0, min_delay_s=0.1, max_delay_s=0.5,
                                       slow_down_surprise=1.0))
    calm = hooks.assess(_state(surprise=0.4, mrr=0.9))
    assert not calm.slow_down and calm.delay_s == 0 and not calm.prefer_wait
    assert hooks.choose_action(3, calm) == 3
    hot = hooks.assess(_state(seq=11, surprise=1.5, mrr=0.9))
    assert hot.slow_down and hot.prefer_wait and hot.reasons
    assert 0.1 < hot.delay_s < 0.5
    assert hooks.choose_action(3, hot) == 0
    top = hooks.assess(_state(seq=12, surprise=2.0))
    assert top.delay_s == pytest.approx(0.5)
    assert hooks.delay_s(_state(surprise=1.0)) == 0.0  # at the threshold: not above it
    # no action to wait with: the proposal stands
    assert ArbiterHooks().choose_action(3, hot) == 3
    # a surprise that belongs to a frame long ago is not evidence about now
    old = hooks.assess(_state(seq=50, surprise=1.9, surprise_seq=10))
    assert not old.slow_down and old.surprise is None
    # unknown surprise (first frame, after a gap) is no evidence either
    assert not hooks.assess(_state(seq=51, surprise=None)).slow_down


def test_low_mrr_escalates_with_cooldown_and_survives_a_bad_callback() -> None:
    clock = FakeClock()
    calls: list[ArbiterDecision] = []
    hooks = ArbiterHooks(ArbiterConfig(escalate_cooldown_s=5.0, escalate_mrr=0.5),
                         on_escalate=calls.append, clock=clock)
    assert not hooks.assess(_state(mrr=0.8)).escalate
    d = hooks.assess(_state(seq=11, mrr=0.3))
    assert d.escalate and len(calls) == 1 and calls[0].mrr == 0.3
    hooks.assess(_state(seq=12, mrr=0.2))
    assert len(calls) == 1  # cooldown
    clock.t = 6.0
    hooks.assess(_state(seq=13, mrr=0.2))
    assert len(calls) == 2 and hooks.escalations == 2

    def bad(decision: ArbiterDecision) -> None:
        raise RuntimeError("LLM down")

    hooks = ArbiterHooks(on_escalate=bad, clock=clock)
    assert hooks.assess(_state(mrr=0.1)).escalate  # below the default 0.2; nothing escapes
    assert hooks.escalate_errors == 1


def test_surprise_feeds_temporal_coherence_once_per_frame() -> None:
    hooks = ArbiterHooks(ArbiterConfig(coherence_surprise=1.2, coherence_penalty=0.1,
                                       coherence_recovery=0.05))
    st = _state(seq=1, surprise=1.5)
    assert hooks.assess(st).temporal_coherence == pytest.approx(0.9)
    assert hooks.assess(st).temporal_coherence == pytest.approx(0.9)  # same frame: once
    for seq in range(2, 6):
        hooks.assess(_state(seq=seq, surprise=1.9))
    assert hooks.coherence.value == pytest.approx(0.5) and hooks.coherence.drops == 5
    assert hooks.assess(_state(seq=6, surprise=0.2)).temporal_coherence == pytest.approx(0.55)
    tc = TemporalCoherence(1.0, penalty=0.4)
    for seq in range(5):
        tc.update(1.5, seq)
    assert tc.value == 0.0  # floored
    tc.reset()
    assert tc.value == 1.0


def test_stale_vision_is_a_decision() -> None:
    class DeadBridge:
        def read_latest(self, max_age_ms: float) -> BeingState:
            raise StaleDataError(f"vision data is 900 ms old (max_age_ms={max_age_ms:g})")

    class LiveBridge:
        def read_latest(self, max_age_ms: float) -> BeingState:
            return _state(surprise=1.6)

    hooks = ArbiterHooks(ArbiterConfig(wait_action_id=0, max_age_ms=250))
    d = hooks.assess_bridge(DeadBridge())
    assert d.stale and d.slow_down and d.prefer_wait and "max_age_ms=250" in d.reasons[0]
    assert not hooks.with_config(slow_down_when_stale=False).assess_bridge(DeadBridge()).slow_down
    live = hooks.assess_bridge(LiveBridge())
    assert not live.stale and live.slow_down


def test_calibrated_thresholds_follow_the_data() -> None:
    rng = np.random.default_rng(0)
    normal = rng.normal(0.3, 0.05, 2000).clip(0, 2)
    cfg = ArbiterConfig.calibrated(list(normal) + [None], wait_action_id=1)
    assert cfg.slow_down_surprise == pytest.approx(np.percentile(normal, 95), rel=1e-6)
    assert cfg.slow_down_surprise < cfg.coherence_surprise < 0.5 and cfg.wait_action_id == 1
    hooks = ArbiterHooks(cfg)
    rate = np.mean([hooks.slow_down(_state(surprise=s)) for s in normal])
    assert 0.03 < rate < 0.07
    with pytest.raises(ValueError, match="at least 20"):
        ArbiterConfig.calibrated([0.1] * 5)


def test_a_surprise_spike_escalates_at_once_and_ordinary_play_does_not() -> None:
    rng = np.random.default_rng(1)
    normal = rng.normal(0.3, 0.05, 5000).clip(0, 2)
    cfg = ArbiterConfig.calibrated(normal, escalate_pct=99.9, escalate_cooldown_s=0.0)
    assert cfg.escalate_surprise == pytest.approx(np.percentile(normal, 99.9), rel=1e-6)
    calls: list[ArbiterDecision] = []
    hooks = ArbiterHooks(cfg, on_escalate=calls.append, clock=FakeClock())
    fired = [hooks.assess(_state(seq=i, surprise=float(s), mrr=0.9)).escalate
             for i, s in enumerate(normal[:1000])]
    assert sum(fired) <= 3  # ~1 in 1000 ordinary frames
    spike = hooks.assess(_state(seq=2000, surprise=1.3, mrr=0.9))  # a cut; MRR still high
    assert spike.escalate and any("escalate" in r for r in spike.reasons)
    assert calls[-1].surprise == 1.3
    off = ArbiterConfig(escalate_surprise=None)  # off: only the running MRR escalates
    assert not ArbiterHooks(off).assess(_state(surprise=1.9, mrr=0.9)).escalate
    with pytest.raises(ValueError, match="escalate_surprise"):
        ArbiterConfig(escalate_surprise=2.5)


def test_standardised_surprise_escalates_in_every_game_with_one_threshold() -> None:
    """Two games, a calm one (raw surprise ~0.1) and a busy one (~0.8): a cut in the calm
    game has a lower raw surprise than the busy game's ordinary frames. With the default
    config (escalation on surprise_z) both cuts escalate and no ordinary frame does; an
    arbiter escalating on raw surprise calibrated on the pooled play cannot do both."""
    rng = np.random.default_rng(2)
    sz = {g: metrics.SurpriseZ() for g in ("calm", "busy")}
    level = {"calm": rng.uniform(0.05, 0.15, 16), "busy": rng.uniform(0.6, 1.0, 16)}
    raw, zs, cut_raw, cut_z = [], [], {}, {}
    for g, z in sz.items():
        for _ in range(300):
            e = np.abs(level[g] + rng.normal(0, 0.02, 16))
            zv = z(e)
            if not np.isnan(zv):
                raw.append(float(np.sqrt(np.mean(e ** 2))))
                zs.append(zv)
        cut = level[g].copy()
        cut[:8] += 0.8  # half the screen changed unpredictably
        cut_raw[g], cut_z[g] = float(np.sqrt(np.mean(cut ** 2))), z.score(cut)
    assert cut_raw["calm"] < np.percentile(raw, 75)  # raw: the calm cut looks ordinary
    hooks = ArbiterHooks(ArbiterConfig(escalate_cooldown_s=0.0), clock=FakeClock())
    ordinary = [hooks.assess(_state(seq=i, surprise=r, surprise_z=float(z), mrr=0.9)).escalate
                for i, (r, z) in enumerate(zip(raw, zs, strict=True))]
    assert sum(ordinary) == 0
    for g in sz:
        d = hooks.assess(_state(seq=1000, surprise=cut_raw[g], surprise_z=cut_z[g], mrr=0.9))
        assert d.escalate and d.surprise_z == cut_z[g], (g, d)
        assert any(r.startswith("surprise_z") for r in d.reasons)
    pooled = ArbiterConfig.calibrated(raw, escalate_pct=99.9)
    assert pooled.escalate_surprise_z is None and pooled.escalate_surprise is not None
    raw_hooks = ArbiterHooks(replace(pooled, escalate_cooldown_s=0.0), clock=FakeClock())
    assert not raw_hooks.assess(_state(surprise=cut_raw["calm"], mrr=0.9)).escalate
    cal = ArbiterConfig.calibrated(raw, escalate_pct=99.0, surprises_z=zs)
    assert cal.escalate_surprise_z == pytest.approx(np.percentile(zs, 99.0))
    assert cal.escalate_surprise is None
    with pytest.raises(ValueError, match="escalate_surprise_z"):
        ArbiterConfig(escalate_surprise_z=0)


# ----------------------------------------------------------------------------- toy worlds


def linear_world(seed: int, d: int = 16, c: int = 3, h: int = 5
                 ) -> tuple[Callable[..., Any], np.ndarray, np.ndarray, np.ndarray]:
    """z' = A z + B u with a known action sequence u* reaching the goal (cost 0)."""
    rng = np.random.default_rng(seed)
    a = np.linalg.qr(rng.standard_normal((d, d)))[0] * 0.95
    b = rng.standard_normal((d, c))

    def rollout(z0: np.ndarray, cond: np.ndarray | None, ids: np.ndarray | None) -> np.ndarray:
        z = np.broadcast_to(z0, (cond.shape[0], d)).astype(np.float64)
        out = []
        for t in range(cond.shape[1]):
            z = z @ a.T + cond[:, t] @ b.T
            out.append(z)
        return np.stack(out, 1)  # (N, H, D)

    z0 = rng.standard_normal(d)
    u_star = rng.uniform(-0.9, 0.9, (h, c))
    goal = rollout(z0, u_star[None], None)[0, -1]
    return rollout, z0, goal, u_star


def rotation_world(seed: int, d: int = 16, a: int = 8, h: int = 6
                   ) -> tuple[Callable[..., Any], np.ndarray, np.ndarray, np.ndarray]:
    """z' = R z + E[a]: order matters, one discrete sequence of 8^6 reaches the goal."""
    rng = np.random.default_rng(seed)
    r = np.linalg.qr(rng.standard_normal((d, d)))[0]
    e = rng.standard_normal((a, d))

    def rollout(z0: np.ndarray, cond: np.ndarray | None, ids: np.ndarray | None
                ) -> tuple[np.ndarray, np.ndarray]:
        z = np.broadcast_to(z0, (ids.shape[0], d)).astype(np.float64)
        out = []
        for t in range(ids.shape[1]):
            z = z @ r.T + e[ids[:, t]]
            out.append(z)
        return np.stack(out, 1), np.zeros(ids.shape)

    z0 = rng.standard_normal(d)
    ids_star = rng.integers(0, a, h)
    goal = rollout(z0, None, ids_star[None])[0][0, -1]
    return rollout, z0, goal, ids_star


def test_cem_beats_random_shooting_continuous() -> None:
    cem_costs, rnd_costs = [], []
    for seed in range(5):
        rollout, z0, goal, _ = linear_world(seed)
        cfg = PlannerConfig(horizon=5, samples=300, elites=30, iterations=30, seed=seed)
        cem = CEMPlanner(rollout, ActionSpace(dim=3), cfg).plan(z0, goal)
        rnd = RandomShootingPlanner(rollout, ActionSpace(dim=3), cfg).plan(z0, goal)
        assert (cem.calls, cem.rollouts) == (rnd.calls, rnd.rollouts) == (30, 9000)
        assert cem.vectors.shape == (5, 3) and cem.action_ids is None
        assert np.all(np.abs(cem.vectors) <= 1.0)
        assert cem.cost < rnd.cost
        cem_costs.append(cem.cost)
        rnd_costs.append(rnd.cost)
    assert np.mean(cem_costs) < 0.3 * np.mean(rnd_costs)


def test_cem_finds_the_known_discrete_sequence() -> None:
    found_cem = found_rnd = 0
    for seed in range(8):
        rollout, z0, goal, ids_star = rotation_world(seed)
        cfg = PlannerConfig(horizon=6, seed=seed)
        cem = CEMPlanner(rollout, ActionSpace(num_actions=8), cfg).plan(z0, goal)
        rnd = RandomShootingPlanner(rollout, ActionSpace(num_actions=8), cfg).plan(z0, goal)
        assert cem.cost <= rnd.cost
        found_cem += bool(np.array_equal(cem.action_ids, ids_star))
        found_rnd += bool(np.array_equal(rnd.action_ids, ids_star))
        assert cem.cost_history == sorted(cem.cost_history, reverse=True)
    assert found_cem >= 5 and found_cem > found_rnd


def test_receding_horizon_reaches_and_holds_the_goal() -> None:
    """Integrator z' = z + 0.3 u: the goal is several steps away; act() one step at a time."""
    def rollout(z0: np.ndarray, cond: np.ndarray | None, ids: np.ndarray | None) -> np.ndarray:
        return z0 + 0.3 * np.cumsum(cond.astype(np.float64), axis=1)

    goal = np.array([1.5, -1.2])
    z = np.zeros(2)
    planner = CEMPlanner(rollout, ActionSpace(dim=2),
                         PlannerConfig(horizon=4, samples=100, elites=10, iterations=8,
                                       cost_on="all", seed=0))
    start = np.linalg.norm(z - goal)
    for _ in range(10):
        plan = planner.act(z, goal)
        z = z + 0.3 * plan.first_vector
    assert np.linalg.norm(z - goal) < 0.1 * start


def test_mixed_space_and_cost_terms() -> None:
    def rollout(z0: np.ndarray, cond: np.ndarray | None, ids: np.ndarray | None) -> Any:
        z = z0 + np.cumsum(cond, 1)[..., :2] + np.cumsum(ids, 1)[..., None] * 0.1
        unc = ids.astype(np.float64)  # higher ids are more uncertain

        class Out:
            z_cls_seq, uncertainty_seq, patches_last = z, unc, None
        return Out()

    goal = np.array([1.0, 1.0])
    plan = CEMPlanner(rollout, ActionSpace(dim=2, num_actions=3),
                      PlannerConfig(horizon=3, samples=64, elites=8, iterations=10,
                                    uncertainty_weight=1.0)).plan(np.zeros(2), goal)
    assert plan.vectors.shape == (3, 2) and plan.action_ids.shape == (3,)
    assert np.all(plan.action_ids == 0)  # uncertainty pushes to the certain action
    assert plan.first_action_id == 0 and plan.first_vector.shape == (2,)

    z = np.zeros((2, 3, 4))
    z[1] += 1.0
    cfg = PlannerConfig(distance="l2")
    np.testing.assert_allclose(latent_cost(z, np.zeros(4), cfg), [0.0, 1.0])
    cos = latent_cost(z + np.arange(4), np.arange(4.0), PlannerConfig(distance="cosine"))
    assert cos[0] == pytest.approx(0.0, abs=1e-9) and cos[1] > 0
    with pytest.raises(ValueError, match="uncertainty"):
        latent_cost(z, np.zeros(4), PlannerConfig(uncertainty_weight=1.0))
    with pytest.raises(ValueError, match="patches"):
        latent_cost(z, np.zeros(4), PlannerConfig(patch_weight=1.0))


def sprite_world(seed: int, patches: int = 8, d: int = 4, a: int = 6, h: int = 3
                 ) -> tuple[Callable[..., Any], np.ndarray, np.ndarray,
                            Callable[[np.ndarray], float]]:
    """Patch 0 is a sprite the actions move (the sum of their effects); the other patches are
    scenery the goal leaves as it is, which the model predicts with an error that depends on
    the actions (as a learned model's does). Returns the rollout, the start and goal patches
    and how far a plan really leaves the sprite from the goal."""
    rng = np.random.default_rng(seed)
    effect = rng.standard_normal((a, d))
    scenery = rng.standard_normal((patches - 1, d))
    model_error = 0.6 * rng.standard_normal((h, a, patches - 1, d))

    def rollout(z0: np.ndarray, cond: Any, ids: np.ndarray) -> tuple[Any, ...]:
        n = ids.shape[0]
        sprite = effect[ids].sum(1)  # (N, D)
        rest = scenery + model_error[np.arange(h), ids].sum(1)  # (N, P-1, D)
        return np.zeros((n, h, d)), None, np.concatenate([sprite[:, None], rest], 1)

    ids_star = rng.integers(0, a, h)
    start = np.concatenate([np.zeros((1, d)), scenery])
    goal = np.concatenate([effect[ids_star].sum(0)[None], scenery])

    def miss(ids: np.ndarray) -> float:
        return float(np.linalg.norm(effect[ids].sum(0) - goal[0]))
    return rollout, start, goal, miss


def test_patch_focus_looks_where_the_goal_differs() -> None:
    """Equal patch weights let the scenery's prediction errors pick the plan; focus weights
    put everything on the sprite the goal moved, and the plans reach it."""
    w = patch_focus_weights(np.zeros((3, 2)), np.array([[0, 0], [3, 4], [0, 1.0]]), "l2")
    np.testing.assert_allclose(w, [0.0, 3.5355339 / (3.5355339 + 0.7071068),
                                   0.7071068 / (3.5355339 + 0.7071068)], rtol=1e-6)
    np.testing.assert_allclose(patch_focus_weights(np.ones((4, 2)), np.ones((4, 2)), "l2"),
                               [0.25] * 4)
    reached = {False: 0, True: 0}
    for seed in range(8):
        rollout, start, goal, miss = sprite_world(seed)
        for focus in (False, True):
            cfg = PlannerConfig(horizon=3, samples=64, elites=8, iterations=4, distance="l2",
                                patch_weight=1.0, patch_focus=focus, seed=seed)
            plan = CEMPlanner(rollout, ActionSpace(num_actions=6), cfg).plan(
                np.zeros(4), np.zeros(4), goal, start_patches=start)
            reached[focus] += miss(plan.action_ids) < 1e-6
    assert reached[True] >= 7 and reached[False] <= 3, reached


def test_planner_input_validation() -> None:
    for kwargs, field in [({"elites": 400}, "elites"), ({"horizon": 0}, "horizon"),
                          ({"distance": "l1"}, "distance"), ({"momentum": 1.0}, "momentum"),
                          ({"horizon": 65}, "horizon"), ({"patch_focus": True}, "patch_focus")]:
        with pytest.raises(ValueError, match=f"PlannerConfig.{field}"):
            PlannerConfig(**kwargs)
    with pytest.raises(ValueError, match="ActionSpace needs"):
        ActionSpace()
    with pytest.raises(ValueError, match="ActionSpace.low"):
        ActionSpace(dim=1, low=1.0, high=-1.0)

    def wrong(z0: np.ndarray, cond: Any, ids: Any) -> np.ndarray:
        return np.zeros((3, 1, 4))

    planner = CEMPlanner(wrong, ActionSpace(dim=1), PlannerConfig(samples=10, elites=2))
    with pytest.raises(ValueError, match="rollout_fn returned latents of shape"):
        planner.plan(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="goal"):
        planner.plan(np.zeros(4), np.zeros((2, 4)))
    focused = CEMPlanner(wrong, ActionSpace(dim=1),
                         PlannerConfig(samples=10, elites=2, patch_weight=1.0, patch_focus=True))
    with pytest.raises(ValueError, match="start_patches"):
        focused.plan(np.zeros(4), np.zeros(4), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="do not match the 2 predicted patches"):
        latent_cost(np.zeros((1, 1, 4)), np.zeros(4), PlannerConfig(patch_weight=1.0),
                    patches_last=np.zeros((1, 2, 4)), goal_patches=np.zeros((2, 4)),
                    patch_weights=np.ones(3) / 3)
