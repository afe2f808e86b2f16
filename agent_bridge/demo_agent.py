"""A small demo agent: reads BeingState, applies the arbiter hooks, publishes actions.

It plays the game the sidecar captures (``gym:`` envs, the synthetic square) with a sticky
random policy (an action is repeated for a few steps), and lets the vision state steer it
the way the seed's ActionArbiter does: high surprise -> slow down and prefer the wait action;
low MRR -> escalate (here: a log line); stale vision -> wait. Actions go out on
``agent.action`` (discrete ids for ``gym:ALE/...``, vectors for box action spaces), where the
capture applies them to the game and the worker conditions its predictions on them; each
step's arbiter decision goes out just before its action on ``agent.decision``
(``iwm_bus.bus.wire.make_decision``), where the live viewer (``iwm-launch --viewer``) shows it.
Both leave on the agent's socket (``Endpoints.agent``) through its ``VisionBridge``.

    iwm-launch --source gym:ALE/Pong-v5 --agent demo --encoder vit_tiny_patch16_224 --duration 30
    python -m agent_bridge.demo_agent --run-dir /tmp/iwm-1000 --duration 20
    python -m agent_bridge.demo_agent --run-dir /tmp/iwm-1000 --num-actions 6 --wait-action 0

The action space comes from ``--num-actions`` / ``--box-dim``, else from the manifest's
``action_space`` (``sidecar.json``, written by ``iwm-launch``).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger

from agent_bridge.arbiter import ArbiterConfig, ArbiterDecision, ArbiterHooks
from agent_bridge.bridge import VisionBridge
from iwm_bus.bus import topics
from iwm_bus.bus.ring import clock_ns
from iwm_bus.bus.rundir import RunDir
from iwm_bus.bus.wire import make_decision
from iwm_bus.config import check, fail

__all__ = ["DemoAgent", "DemoConfig", "DemoStats", "main", "run_demo_agent"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


@dataclass
class DemoConfig:
    # discrete actions of the game (None: from the manifest's action_space)
    num_actions: int | None = None
    # length of a continuous action vector for box action spaces (None: from the manifest)
    box_dim: int | None = None
    # bounds of box actions
    box_low: float = -1.0
    box_high: float = 1.0
    # the game's "do nothing" action id (ALE: 0 = NOOP)
    wait_action_id: int = 0
    # seconds between actions (the arbiter's delay comes on top)
    period_s: float = 0.1
    # a random action is repeated this many steps
    repeat: int = 4
    # stop after this many actions / seconds (None = until stopped)
    steps: int | None = None
    duration_s: float | None = None
    # how long to wait for the sidecar's manifest at start
    manifest_timeout_s: float = 30.0
    # seed of the random policy
    seed: int = 0
    # arbiter thresholds; max_age_ms is how old vision may be before the agent waits
    arbiter: ArbiterConfig = field(default_factory=lambda: ArbiterConfig(max_age_ms=1000.0))

    def __post_init__(self) -> None:
        for name in ("num_actions", "box_dim", "steps"):
            check(self, name, int, 1, optional=True)
        check(self, "box_low", float)
        check(self, "box_high", float)
        if not self.box_low < self.box_high:
            fail(self, "box_low", f"must be < box_high={self.box_high}")
        check(self, "wait_action_id", int, 0)
        check(self, "period_s", float, 0.001, 60)
        check(self, "repeat", int, 1)
        check(self, "duration_s", float, 0, open_low=True, optional=True)
        check(self, "manifest_timeout_s", float, 0, open_low=True)
        check(self, "seed", int, 0)
        check(self, "arbiter", ArbiterConfig)


@dataclass
class DemoStats:
    """What one run did."""

    actions: int = 0
    waits: int = 0
    slowdowns: int = 0
    stale: int = 0
    escalations: int = 0
    # decisions published on agent.decision, and those the socket could not take
    decisions: int = 0
    decisions_dropped: int = 0
    last_decision: ArbiterDecision | None = None
    bridge: dict[str, Any] = field(default_factory=dict)


def wait_manifest(run_dir: str | Path, timeout_s: float,
                  stop: threading.Event | None = None) -> dict[str, Any]:
    """The run dir's manifest, waiting for the launcher to write it (bounded)."""
    rd = RunDir(run_dir)
    deadline = time.monotonic() + timeout_s
    while True:
        manifest = rd.read_manifest(missing_ok=True)
        if manifest is not None:
            return manifest
        if time.monotonic() > deadline or (stop is not None and stop.is_set()):
            raise FileNotFoundError(f"no sidecar manifest in {rd.path} after {timeout_s} s; "
                                    "is iwm-launch running with this --run-dir?")
        time.sleep(0.1)


def resolve_action_space(cfg: DemoConfig, manifest: Mapping[str, Any]) -> tuple[int, int]:
    """``(num_actions, box_dim)`` (0 = none) from the config, else the manifest."""
    n, dim = cfg.num_actions or 0, cfg.box_dim or 0
    if n or dim:
        return n, dim
    space = manifest.get("action_space")
    if not isinstance(space, Mapping):
        raise ValueError("the game's action space is unknown: pass --num-actions N (discrete) "
                         "or --box-dim C (vectors); the manifest has no 'action_space'")
    kind = str(space.get("type", ""))
    if "discrete" in kind and isinstance(space.get("n"), int):
        n = space["n"]
    if "box" in kind and isinstance(space.get("shape"), list) and len(space["shape"]) == 1:
        dim = int(space["shape"][0])
    if not n and not dim:
        raise ValueError(f"action space {dict(space)} is not supported by the demo agent "
                         "(discrete or 1-D box); pass --num-actions or --box-dim")
    return n, dim


class DemoAgent:
    """The loop of the demo agent, usable in a thread (tests) or a process (launch)."""

    def __init__(self, run_dir: str | Path, config: DemoConfig | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.config = config or DemoConfig()
        self.stats = DemoStats()
        self.stop_event = threading.Event()
        self._rng = np.random.default_rng(self.config.seed)
        self._current: tuple[int | None, np.ndarray | None] = (None, None)
        self._left = 0

    def stop(self) -> None:
        self.stop_event.set()

    def _escalate(self, decision: ArbiterDecision) -> None:
        self.stats.escalations += 1
        logger.info("demo agent: would escalate to the planner/LLM ({})",
                    "; ".join(decision.reasons))

    def _propose(self, n: int, dim: int) -> tuple[int | None, np.ndarray | None]:
        if self._left <= 0:
            cfg = self.config
            aid = int(self._rng.integers(0, n)) if n else None
            vec = self._rng.uniform(cfg.box_low, cfg.box_high, dim).astype(np.float32) \
                if dim else None
            self._current, self._left = (aid, vec), cfg.repeat
        self._left -= 1
        return self._current

    def run(self) -> DemoStats:
        """Act until stopped, ``steps`` or ``duration_s``; returns the stats."""
        cfg = self.config
        manifest = wait_manifest(self.run_dir, cfg.manifest_timeout_s, self.stop_event)
        n, dim = resolve_action_space(cfg, manifest)
        if n and cfg.wait_action_id >= n:
            raise ValueError(f"wait_action_id {cfg.wait_action_id} is not one of the game's "
                             f"{n} actions")
        hooks = ArbiterHooks(cfg.arbiter, on_escalate=self._escalate)
        end = None if cfg.duration_s is None else time.monotonic() + cfg.duration_s
        logger.info("demo agent on {}: {} discrete actions, box dim {}", self.run_dir, n, dim)
        with VisionBridge(self.run_dir, source="demo_agent") as bridge:
            bridge.open_actions()
            while not self.stop_event.is_set():
                if cfg.steps is not None and self.stats.actions >= cfg.steps:
                    break
                if end is not None and time.monotonic() >= end:
                    break
                decision = hooks.assess_bridge(bridge)
                self._act(bridge, hooks, decision, n, dim)
                self.stop_event.wait(cfg.period_s + decision.delay_s)
            self.stats.bridge = vars(bridge.stats)
        logger.info("demo agent done: {} actions, {} waits, {} slow-downs, {} stale reads",
                    self.stats.actions, self.stats.waits, self.stats.slowdowns, self.stats.stale)
        return self.stats

    def _act(self, bridge: VisionBridge, hooks: ArbiterHooks, decision: ArbiterDecision,
             n: int, dim: int) -> None:
        st = self.stats
        st.last_decision = decision
        st.slowdowns += decision.slow_down
        st.stale += decision.stale
        aid, vec = self._propose(n, dim)
        if decision.prefer_wait:
            st.waits += 1
            aid = hooks.choose_action(aid, decision) if n else None
            vec = np.zeros(dim, np.float32) if dim else None
        self._decide(bridge, decision)
        bridge.publish_action(vector=vec, action_id=aid, frame_seq=decision.frame_seq)
        st.actions += 1

    def _decide(self, bridge: VisionBridge, d: ArbiterDecision, plan_costs: Any = None,
                plan_choice: int | None = None) -> None:
        """Publish the step's decision on ``agent.decision`` (the live viewer shows it)."""
        msg = make_decision(
            self.stats.decisions, clock_ns(), slow_down=d.slow_down, prefer_wait=d.prefer_wait,
            escalate=d.escalate, stale=d.stale, delay_s=d.delay_s,
            temporal_coherence=d.temporal_coherence, frame_seq=d.frame_seq,
            surprise=d.surprise, surprise_z=d.surprise_z, mrr=d.mrr, reasons=d.reasons,
            plan_costs=plan_costs, plan_choice=plan_choice, source=bridge.source)
        self.stats.decisions += 1
        self.stats.decisions_dropped += not bridge.publish(topics.DECISION, msg)


def run_demo_agent(run_dir: str | Path, config: DemoConfig | None = None, **overrides: Any
                   ) -> int:
    """Process entry (spawn-safe): run the demo agent until SIGTERM/SIGINT or its limits.

    Returns 0 on a clean stop, 2 on bad input (no action space, bad config), 1 on failure.
    """
    try:
        cfg = config or DemoConfig(**overrides)
        agent = DemoAgent(run_dir, cfg)
    except ValueError as e:
        logger.error("demo agent: {}", e)
        return EXIT_BAD_INPUT
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: agent.stop())
    try:
        agent.run()
        return EXIT_OK
    except (ValueError, FileNotFoundError) as e:
        logger.error("demo agent: {}", e)
        return EXIT_BAD_INPUT
    except Exception:
        logger.exception("demo agent failed")
        return EXIT_FAILED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agent_bridge.demo_agent",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", required=True, type=Path, help="the sidecar's run directory")
    ap.add_argument("--num-actions", type=int, help="discrete actions of the game")
    ap.add_argument("--box-dim", type=int, help="length of continuous action vectors")
    ap.add_argument("--wait-action", type=int, default=0, help="the do-nothing action id")
    ap.add_argument("--period", type=float, default=0.1, help="seconds between actions")
    ap.add_argument("--steps", type=int, help="stop after N actions")
    ap.add_argument("--duration", type=float, help="stop after S seconds")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        cfg = DemoConfig(num_actions=args.num_actions, box_dim=args.box_dim,
                         wait_action_id=args.wait_action, period_s=args.period,
                         steps=args.steps, duration_s=args.duration, seed=args.seed)
    except ValueError as e:
        ap.error(str(e))
    return run_demo_agent(args.run_dir, cfg)


if __name__ == "__main__":
    sys.exit(main())
