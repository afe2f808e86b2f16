"""Planning with rollouts (seed Phase 3): cross-entropy method over action sequences.

Candidates are action sequences of ``horizon`` steps: continuous vectors (the model's cond /
augmentation vector, padded to cond_dim by the worker), discrete action ids, or both. Each
iteration scores ``samples`` candidates with **one batched rollout** (one RPC when the rollout
function is the client's), keeps the ``elites`` cheapest and refits the sampling distribution
(Gaussian per step and dimension; categorical per step). The cost of a candidate is the
distance of its predicted final latent to a goal latent (CLS; patches optional), optionally
plus the predicted uncertainty. With ``patch_focus`` the patch term weighs each patch by how far
the goal's patch lies from the start's, so the cost looks where the goal differs from now and
not at the parts of the scene the actions cannot reach (whose prediction errors otherwise
decide between candidates). ``act()`` is receding-horizon control: plan, execute the first
action, shift the plan one step and warm-start the next call from it. ``RandomShootingPlanner``
spends the same budget (same calls, same candidates) on samples from the initial distribution;
it is the baseline CEM must beat.

Any ``rollout_fn(z0 (D,), cond_seqs (N, H, C) | None, action_seqs (N, H) | None)`` works; it
returns the predicted latents ``(N, H, D)``, or an object with ``z_cls_seq`` (and optionally
``uncertainty_seq`` (N, H), ``patches_last`` (N, P, D)) such as the client's
``BatchRolloutResult``::

    from agent_bridge import IWMClient
    from agent_bridge.planner import ActionSpace, CEMPlanner, PlannerConfig, client_rollout_fn
    iwm = IWMClient(run_dir)
    planner = CEMPlanner(client_rollout_fn(iwm), ActionSpace(num_actions=6), PlannerConfig())
    plan = planner.act(z_now, goal_z)      # plan.action_ids (H,), plan.first_action_id

Anchors (issue 5): DINO-WM's CEM uses horizon 5, 300 samples, top 30, 30 iterations (53 s per
plan on an A6000); V-JEPA 2-AC takes 16 s per action on an RTX 4090. ``bench/planning_bench.py``
measures ours.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from iwm_bus.actions import pad_cond
from iwm_bus.config import check, fail

__all__ = ["ActionSpace", "CEMPlanner", "Plan", "PlannerConfig", "RandomShootingPlanner",
           "client_rollout_fn", "latent_cost", "model_rollout_fn", "patch_focus_weights"]

RolloutFn = Callable[[np.ndarray, np.ndarray | None, np.ndarray | None], Any]
DISTANCES = ("l2", "surprise", "cosine")


@dataclass
class ActionSpace:
    """What a plan is made of: a continuous vector per step, a discrete id per step, or both."""

    # length of the continuous action vector (0 = none); at most the model's cond_dim
    dim: int = 0
    # bounds of each continuous component (scalars apply to all)
    low: float = -1.0
    high: float = 1.0
    # number of discrete actions (0 = none); at most the model's num_actions
    num_actions: int = 0

    def __post_init__(self) -> None:
        for name in ("dim", "num_actions"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"ActionSpace.{name} must be an int >= 0, got {v!r}")
        if self.dim == 0 and self.num_actions == 0:
            raise ValueError("ActionSpace needs dim > 0 (continuous) and/or num_actions > 0 "
                             "(discrete)")
        if not np.isfinite([self.low, self.high]).all() or not self.low < self.high:
            raise ValueError(f"ActionSpace.low={self.low!r} must be < high={self.high!r}, "
                             "both finite")

    @property
    def center(self) -> float:
        return (self.low + self.high) / 2

    @property
    def half_range(self) -> float:
        return (self.high - self.low) / 2


@dataclass
class PlannerConfig:
    # steps per candidate sequence
    horizon: int = 5
    # candidates per iteration (one batched rollout each)
    samples: int = 300
    # cheapest candidates the distribution is refit to
    elites: int = 30
    # refits per plan
    iterations: int = 30
    # initial std of continuous actions, as a fraction of the half range
    init_std: float = 1.0
    # floor of the continuous std, same units
    min_std: float = 0.02
    # weight of the old distribution when refitting (0 = take the elites' fit as is)
    momentum: float = 0.1
    # floor on each discrete action's probability, so no action dies out early
    min_prob: float = 0.002
    # distance: l2 (RMS difference), surprise (metrics.surprise units), cosine (1 - cos)
    distance: str = "l2"
    # score the final predicted latent only, or the mean over all steps
    cost_on: str = "final"
    # + weight * mean predicted uncertainty (needs a rollout_fn that returns it)
    uncertainty_weight: float = 0.0
    # + weight * patch distance to goal patches (needs patches_last from the rollout_fn)
    patch_weight: float = 0.0
    # weigh each patch by its start-to-goal distance instead of equally (needs start_patches)
    patch_focus: bool = False
    # random seed (None = fresh entropy)
    seed: int | None = 0

    def __post_init__(self) -> None:
        check(self, "horizon", int, 1, 64)  # 64: the rollout limit
        check(self, "samples", int, 2)
        check(self, "elites", int, 1)
        if self.elites > self.samples:
            fail(self, "elites", f"must be <= samples ({self.samples})")
        check(self, "iterations", int, 1)
        check(self, "init_std", float, 0, open_low=True)
        check(self, "min_std", float, 0, open_low=True)
        if self.min_std > self.init_std:
            fail(self, "min_std", f"must be <= init_std ({self.init_std})")
        check(self, "momentum", float, 0, 1, open_high=True)
        check(self, "min_prob", float, 0, 0.5, open_high=True)
        check(self, "distance", str, choices=DISTANCES)
        check(self, "cost_on", str, choices=("final", "all"))
        for name in ("uncertainty_weight", "patch_weight"):
            check(self, name, float, 0)
        check(self, "patch_focus", bool)
        if self.patch_focus and not self.patch_weight:
            fail(self, "patch_focus", "needs patch_weight > 0 (it weighs the patch term)")
        check(self, "seed", int, 0, optional=True)


@dataclass
class Plan:
    """The best sequence found, its cost and what finding it took."""

    vectors: np.ndarray | None  # (H, dim) continuous actions, or None
    action_ids: np.ndarray | None  # (H,) discrete actions, or None
    cost: float
    cost_history: list[float] = field(default_factory=list)  # best cost after each iteration
    rollouts: int = 0  # candidate sequences evaluated
    calls: int = 0  # rollout_fn calls (= RPCs with the client)
    elapsed_s: float = 0.0

    @property
    def first_vector(self) -> np.ndarray | None:
        return None if self.vectors is None else self.vectors[0]

    @property
    def first_action_id(self) -> int | None:
        return None if self.action_ids is None else int(self.action_ids[0])


# ----------------------------------------------------------------------------- rollout fns


def client_rollout_fn(client: Any, patches: Any = None, timeout_s: float | None = None
                      ) -> RolloutFn:
    """A rollout_fn that makes one ``client.rollout_batch`` RPC per call (sync IWMClient)."""
    def fn(z0: np.ndarray, cond_seqs: np.ndarray | None, action_seqs: np.ndarray | None) -> Any:
        return client.rollout_batch(z0, aug_seqs=cond_seqs, action_seqs=action_seqs,
                                    patches=patches, timeout_s=timeout_s)
    return fn


def model_rollout_fn(model: Any, patches: Any = None) -> RolloutFn:
    """A rollout_fn on a local ``iwm_bus.model.IWM`` (the caller imported torch, not us).

    Continuous vectors are zero-padded to the model's cond_dim.
    """
    cond_dim = model.config.cond_dim

    def fn(z0: np.ndarray, cond_seqs: np.ndarray | None, action_seqs: np.ndarray | None) -> Any:
        if cond_seqs is not None:
            cond_seqs = pad_cond(cond_seqs, cond_dim)
        roll = model.rollout(np.array(z0, np.float32)[None], patches, cond_seqs, action_seqs)
        p = roll.patches_seq
        return _Rolled(roll.z_cls_seq.float().cpu().numpy(),
                       roll.uncertainty_seq.float().cpu().numpy(),
                       None if p is None else p[:, -1].float().cpu().numpy())
    return fn


@dataclass
class _Rolled:
    z_cls_seq: np.ndarray  # (N, H, D)
    uncertainty_seq: np.ndarray | None = None  # (N, H)
    patches_last: np.ndarray | None = None  # (N, P, D)


def _as_rolled(out: Any, n: int, h: int) -> _Rolled:
    if isinstance(out, np.ndarray):
        r = _Rolled(out)
    elif isinstance(out, tuple):
        r = _Rolled(*(np.asarray(x) if x is not None else None for x in out))
    else:
        r = _Rolled(np.asarray(out.z_cls_seq),
                    _opt(getattr(out, "uncertainty_seq", None)),
                    _opt(getattr(out, "patches_last", None)))
    if r.z_cls_seq.ndim != 3 or r.z_cls_seq.shape[:2] != (n, h):
        raise ValueError(f"rollout_fn returned latents of shape {r.z_cls_seq.shape}; expected "
                         f"({n}, {h}, D)")
    return r


def _opt(x: Any) -> np.ndarray | None:
    return None if x is None else np.asarray(x)


# ----------------------------------------------------------------------------- cost


def _distance(a: np.ndarray, b: np.ndarray, kind: str) -> np.ndarray:
    """Distance along the last axis with broadcasting."""
    a, b = a.astype(np.float64, copy=False), b.astype(np.float64, copy=False)
    if kind == "cosine":
        na = np.linalg.norm(a, axis=-1)
        nb = np.linalg.norm(b, axis=-1)
        return 1.0 - (a * b).sum(-1) / np.maximum(na * nb, 1e-12)
    if kind == "surprise":
        a = (a - a.mean(-1, keepdims=True)) / np.sqrt(a.var(-1, keepdims=True) + 1e-6)
        b = (b - b.mean(-1, keepdims=True)) / np.sqrt(b.var(-1, keepdims=True) + 1e-6)
    return np.sqrt(((a - b) ** 2).mean(-1))


def patch_focus_weights(start_patches: np.ndarray, goal_patches: np.ndarray, kind: str
                        ) -> np.ndarray:
    """Weights (P,) summing to 1: each patch's start-to-goal distance (``kind``), so patches
    the goal leaves as they are count for nothing; equal weights when start equals goal."""
    start, goal = np.asarray(start_patches), np.asarray(goal_patches)
    if start.ndim != 2 or start.shape != goal.shape:
        raise ValueError(f"start_patches {start.shape} and goal_patches {goal.shape} must "
                         "both be (P, D)")
    d = _distance(start, goal, kind)
    total = d.sum()
    return d / total if total > 0 else np.full_like(d, 1.0 / len(d))


def latent_cost(z_seq: np.ndarray, goal: np.ndarray, cfg: PlannerConfig,
                uncertainty: np.ndarray | None = None, patches_last: np.ndarray | None = None,
                goal_patches: np.ndarray | None = None, patch_weights: np.ndarray | None = None
                ) -> np.ndarray:
    """Cost (N,) of predicted latents (N, H, D) against a goal (D,) under ``cfg``;
    ``patch_weights`` (P,) replaces the patch term's plain mean (:func:`patch_focus_weights`)."""
    if cfg.cost_on == "final":
        cost = _distance(z_seq[:, -1], goal, cfg.distance)
    else:
        cost = _distance(z_seq, goal, cfg.distance).mean(1)
    if cfg.uncertainty_weight > 0:
        if uncertainty is None:
            raise ValueError("uncertainty_weight > 0 but the rollout_fn returned no "
                             "uncertainty_seq")
        cost = cost + cfg.uncertainty_weight * np.asarray(uncertainty, np.float64).mean(1)
    if cfg.patch_weight > 0:
        if patches_last is None or goal_patches is None:
            raise ValueError("patch_weight > 0 needs goal_patches and a rollout_fn that "
                             "returns patches_last (pass patches to the rollout_fn)")
        d = _distance(patches_last, goal_patches, cfg.distance)  # (N, P)
        if patch_weights is not None and patch_weights.shape != d.shape[1:]:
            raise ValueError(f"patch_weights {patch_weights.shape} do not match the "
                             f"{d.shape[1]} predicted patches")
        term = d.mean(1) if patch_weights is None else d @ patch_weights
        cost = cost + cfg.patch_weight * term
    return cost


# ----------------------------------------------------------------------------- planners


class _Sampler:
    """The sampling distribution of CEM: Gaussian (continuous) and categorical (discrete)."""

    def __init__(self, space: ActionSpace, cfg: PlannerConfig) -> None:
        self.space, self.cfg = space, cfg
        self.reset()

    def reset(self) -> None:
        h, s = self.cfg.horizon, self.space
        self.mean = np.full((h, s.dim), s.center)  # (H, C)
        self.std = np.full((h, s.dim), self.cfg.init_std * s.half_range)  # (H, C)
        self.probs = np.full((h, s.num_actions), 1.0 / max(s.num_actions, 1))  # (H, A)

    def shift(self) -> None:
        """Receding horizon: drop the executed step, append a fresh one, widen again."""
        s, cfg = self.space, self.cfg
        self.mean = np.concatenate([self.mean[1:], np.full((1, s.dim), s.center)])
        self.std = np.full_like(self.std, cfg.init_std * s.half_range)
        fresh = np.full((1, s.num_actions), 1.0 / max(s.num_actions, 1))
        self.probs = np.concatenate([self.probs[1:], fresh])
        self.probs = self._floor(0.5 * self.probs + 0.5 / max(s.num_actions, 1))

    def sample(self, rng: np.random.Generator, n: int, include_mode: bool
               ) -> tuple[np.ndarray | None, np.ndarray | None]:
        s, h = self.space, self.cfg.horizon
        vec = ids = None
        if s.dim:
            vec = self.mean + self.std * rng.standard_normal((n, h, s.dim))  # (N, H, C)
            if include_mode:
                vec[0] = self.mean
            vec = np.clip(vec, s.low, s.high).astype(np.float32)
        if s.num_actions:
            cdf = np.cumsum(self.probs, axis=1)  # (H, A)
            u = rng.random((n, h, 1)) * cdf[:, -1:]  # (N, H, 1)
            ids = (u >= cdf[None]).sum(-1).clip(0, s.num_actions - 1)  # (N, H)
            if include_mode:
                ids[0] = self.probs.argmax(1)
            ids = ids.astype(np.int64)
        return vec, ids

    def refit(self, vec: np.ndarray | None, ids: np.ndarray | None, elite: np.ndarray) -> None:
        m, s = self.cfg.momentum, self.space
        if vec is not None:
            ev = vec[elite].astype(np.float64)  # (K, H, C)
            self.mean = m * self.mean + (1 - m) * ev.mean(0)
            std = m * self.std + (1 - m) * ev.std(0)
            self.std = np.maximum(std, self.cfg.min_std * s.half_range)
        if ids is not None:
            counts = np.stack([np.bincount(col, minlength=s.num_actions)
                               for col in ids[elite].T]).astype(np.float64)  # (H, A)
            freq = counts / len(elite)
            self.probs = self._floor(m * self.probs + (1 - m) * freq)

    def _floor(self, probs: np.ndarray) -> np.ndarray:
        a = probs.shape[1]
        if a == 0:
            return probs
        eps = min(self.cfg.min_prob, 1.0 / a)
        probs = np.maximum(probs, eps)
        return probs / probs.sum(1, keepdims=True)


class CEMPlanner:
    """Cross-entropy method over action sequences (module docstring)."""

    refit = True

    def __init__(self, rollout_fn: RolloutFn, space: ActionSpace,
                 config: PlannerConfig | None = None) -> None:
        self.rollout_fn, self.space = rollout_fn, space
        self.config = cfg = config or PlannerConfig()
        self.rng = np.random.default_rng(cfg.seed)
        self.sampler = _Sampler(space, cfg)
        self.calls = 0

    def reset(self) -> None:
        """Forget the warm start (e.g. a new episode or goal)."""
        self.sampler.reset()

    def plan(self, z0: Any, goal: Any, goal_patches: Any = None, *,
             start_patches: Any = None, warm_start: bool = False) -> Plan:
        """Best sequence from latent ``z0`` (D,) towards ``goal`` (D,): ``config.iterations``
        batched rollouts. Starts from the initial distribution unless ``warm_start``.
        ``start_patches`` (P, D), the patches of now, are needed by ``patch_focus``."""
        cfg = self.config
        if not warm_start:
            self.sampler.reset()
        z0, goal = _latent("z0", z0), _latent("goal", goal)
        if z0.shape != goal.shape:
            raise ValueError(f"z0 {z0.shape} and goal {goal.shape} must have the same shape")
        gp = None if goal_patches is None else np.asarray(goal_patches, np.float64)
        weights = None
        if cfg.patch_focus:
            if start_patches is None or gp is None:
                raise ValueError("patch_focus needs goal_patches and start_patches (the "
                                 "patches of now)")
            weights = patch_focus_weights(start_patches, gp, cfg.distance)
        t0 = time.perf_counter()
        best = Plan(None, None, np.inf)
        for _ in range(cfg.iterations):
            vec, ids = self.sampler.sample(self.rng, cfg.samples, include_mode=self.refit)
            out = _as_rolled(self.rollout_fn(z0, vec, ids), cfg.samples, cfg.horizon)
            self.calls += 1
            best.calls += 1
            best.rollouts += cfg.samples
            cost = latent_cost(out.z_cls_seq, goal, cfg, out.uncertainty_seq, out.patches_last,
                               gp, weights)
            i = int(np.argmin(cost))
            if cost[i] < best.cost:
                best.cost = float(cost[i])
                best.vectors = None if vec is None else vec[i].copy()
                best.action_ids = None if ids is None else ids[i].copy()
            best.cost_history.append(best.cost)
            if self.refit:
                self.sampler.refit(vec, ids, np.argsort(cost, kind="stable")[:cfg.elites])
        best.elapsed_s = time.perf_counter() - t0
        return best

    def act(self, z0: Any, goal: Any, goal_patches: Any = None, *,
            start_patches: Any = None) -> Plan:
        """Receding horizon: plan (warm-started), then shift so the next call continues."""
        plan = self.plan(z0, goal, goal_patches, start_patches=start_patches, warm_start=True)
        if self.refit:  # continue from the best plan, not from the last distribution's mean
            if plan.vectors is not None:
                self.sampler.mean = plan.vectors.astype(np.float64)
            if plan.action_ids is not None:
                onehot = np.eye(self.space.num_actions)[plan.action_ids]
                self.sampler.probs = self.sampler._floor(onehot)
        self.sampler.shift()
        return plan


class RandomShootingPlanner(CEMPlanner):
    """The baseline: the same calls and candidates, all drawn from the initial distribution."""

    refit = False


def _latent(name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float32)
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1 or arr.size == 0 or not np.isfinite(arr).all():
        raise ValueError(f"{name} must be a finite (D,) latent, got shape {arr.shape}")
    return arr
