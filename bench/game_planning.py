"""Planning with the trained world model on a real game: reach a goal paddle position.

Task (ALE Breakout, the shared 18-action vocabulary): from a state reached by exploration,
the goal is the frame reached by ``--horizon`` exploration actions from that state (so it is
reachable); the planner sees the current frame and the goal frame only, plans ``--horizon``
action ids with the world model, and the plan is executed open loop from the cloned state.
Success: the executed paddle ends within ``--tol`` pixels of the goal's paddle. Episodes
whose goal paddle equals the start paddle (nothing to do) are skipped and redrawn.

Methods, same start states and goals: CEM (``--iterations`` batched rollouts of
``--samples`` candidates), random shooting (the same number of model-scored candidates, no
refit), random actions (no model) and the goal-oracle (the goal's own action sequence, an
upper bound that shows the task is solvable in ``--horizon`` steps). The cost is the CLS
distance plus the patch distance weighted towards the patches where the goal differs from now
(``PlannerConfig.patch_focus``); ``--plain`` adds CEM with the plain patch mean beside it.

    python bench/game_planning.py --model iwm_bus/weights/default.pt --episodes 50
    python bench/game_planning.py --episodes 5 --samples 32        # seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agent_bridge.planner import (  # noqa: E402
    ActionSpace,
    CEMPlanner,
    PlannerConfig,
    RandomShootingPlanner,
    model_rollout_fn,
)
from train.explore import ExplorationPolicy, ExploreConfig  # noqa: E402

PADDLE_ROWS = slice(189, 193)  # Breakout's paddle, in the native 210 x 160 frame


def paddle_x(frame: np.ndarray) -> float | None:
    """Centroid column of the paddle's red pixels, None when it is not on screen."""
    band = frame[PADDLE_ROWS].astype(int)
    red = (band[..., 0] > 150) & (band[..., 1] < 100) & (band[..., 2] < 100)
    cols = np.nonzero(red.any(0))[0]
    return float(cols.mean()) if len(cols) else None


def run_actions(src: object, state: object, actions: list[int]) -> np.ndarray:
    env = src.env.unwrapped
    env.ale.restoreState(state)
    frame = None
    for a in actions:
        env.step(int(a))
        frame = env.render()
    return frame


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    ap.add_argument("--game", default="ALE/Breakout-v5")
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--horizon", type=int, default=4)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--elites", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--tol", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=2000)
    ap.add_argument("--plain", action="store_true",
                    help="also CEM with every patch weighed equally (patch_focus off)")
    args = ap.parse_args()

    import torch

    from iwm_bus.default_model import default_checkpoint
    from iwm_bus.model import load_iwm
    from workers.sources import open_source

    torch.manual_seed(0)
    path = args.model or default_checkpoint()
    model = load_iwm(path, "cpu")
    policy = ExplorationPolicy(ExploreConfig(seed=args.seed))
    rng = np.random.default_rng(args.seed)
    space = ActionSpace(num_actions=model.config.num_actions)
    cfg = PlannerConfig(horizon=args.horizon, samples=args.samples, elites=args.elites,
                        iterations=args.iterations, distance="surprise", patch_weight=1.0,
                        patch_focus=True, seed=args.seed)
    planners = {"CEM": (CEMPlanner, cfg), "random shooting": (RandomShootingPlanner, cfg)}
    if args.plain:
        planners["CEM, plain patch mean"] = (CEMPlanner, replace(cfg, patch_focus=False))
    wins = dict.fromkeys([*planners, "random actions", "goal actions (oracle)"], 0)
    errs = {k: [] for k in wins}
    t_plan = {k: [] for k in planners}
    done = 0
    with open_source(f"gym:{args.game}", seed=args.seed) as src:
        ale = src.env.unwrapped.ale
        frame = src.reset().pixels
        while done < args.episodes:
            for _ in range(int(rng.integers(5, 30))):
                frame = src.step({"action_id": policy.act()}).pixels
            if ale.game_over() or paddle_x(frame) is None:
                frame = src.reset().pixels
                continue
            state = ale.cloneState(include_rng=True)
            goal_actions = [int(rng.integers(0, 18)) for _ in range(args.horizon)]
            goal = run_actions(src, state, goal_actions)
            gx, x0 = paddle_x(goal), paddle_x(frame)
            ale.restoreState(state)
            if gx is None or abs(gx - x0) <= args.tol:
                continue  # nothing to plan for
            z0, p0 = (t[0].numpy() for t in model.encode(frame))
            zg, pg = (t[0].numpy() for t in model.encode(goal))
            fn = model_rollout_fn(model, p0[None])
            plans = {}
            for name, (cls, c) in planners.items():
                t = time.perf_counter()
                plans[name] = list(cls(fn, space, c).plan(z0, zg, pg, start_patches=p0)
                                   .action_ids)
                t_plan[name].append(time.perf_counter() - t)
            plans["random actions"] = [int(a) for a in rng.integers(0, 18, args.horizon)]
            plans["goal actions (oracle)"] = goal_actions
            for name, acts in plans.items():
                x = paddle_x(run_actions(src, state, acts))
                err = abs(x - gx) if x is not None else 160.0
                errs[name].append(err)
                wins[name] += err <= args.tol
            ale.restoreState(state)
            done += 1
    print(f"{args.game}: reach the goal paddle position in {args.horizon} steps, "
          f"{done} episodes, tol {args.tol} px; model {path}")
    print("| method | success | median paddle error (px) | plan time (s) |")
    print("|---|---:|---:|---:|")
    for name in wins:
        tp = f"{np.median(t_plan[name]):.2f}" if name in t_plan else "-"
        print(f"| {name} | {wins[name] / done:.2f} | {np.median(errs[name]):.1f} | {tp} |")


if __name__ == "__main__":
    main()
