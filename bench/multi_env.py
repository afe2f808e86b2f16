"""Many games, one world model: vector env steps/s with surprise, memory and latency.

For each n, a gymnasium vector env of n games (SyncVectorEnv) stepped with random actions:

- ``none``: no world model (the env alone);
- ``per-env``: one IWMWrapper (one worker process, one model copy) per sub-env, the way the
  README showed before issue 30;
- ``batched``: IWMVectorWrapper, one worker for all n sub-envs, one batched round trip a
  vector step.

Columns: env steps/s (n x vector steps/s), start (s from construction to the first result),
total RSS of this process and its children (the workers), frame -> surprise p50 / p99 (ms:
the round trip from writing a frame to holding its surprise and MRR; per-env: each
sub-env's, batched: the batch's, which every frame of it waits for).

    python bench/multi_env.py                                  # Breakout, shipped model
    python bench/multi_env.py --ns 1 4 8 16 --steps 200
    python bench/multi_env.py --tiny --ns 1 4 --steps 50       # untrained ViT-Ti at 64 px
    python bench/multi_env.py --device cuda --ns 64 --modes none batched   # GPU lease
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gymnasium  # noqa: E402
import psutil  # noqa: E402

import agent_bridge.gym as iwm_gym  # noqa: E402
from iwm_bus.config import WorkerConfig  # noqa: E402

MODES = ("none", "per-env", "batched")


def total_rss_mib() -> float:
    """RSS of this process and all its descendants (the worker processes), MiB."""
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


class RoundTrips:
    """Times every _Sidecar.process call (a frame, or a batch of frames, to its results)."""

    def __init__(self) -> None:
        self.ms: list[float] = []
        self._orig = iwm_gym._Sidecar.process

    def __enter__(self) -> RoundTrips:
        orig = self._orig

        def timed(sidecar: Any, *args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            out = orig(sidecar, *args, **kwargs)
            self.ms.append((time.perf_counter() - t) * 1e3)
            return out

        iwm_gym._Sidecar.process = timed  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        iwm_gym._Sidecar.process = self._orig  # type: ignore[method-assign]


def make_vec(game: str, n: int, mode: str, worker: WorkerConfig) -> gymnasium.vector.VectorEnv:
    if mode == "per-env":
        def one() -> gymnasium.Env:
            return iwm_gym.IWMWrapper(gymnasium.make(game, render_mode="rgb_array"),
                                      intrinsic_reward=0.01, worker=worker)
        return gymnasium.vector.SyncVectorEnv([one] * n)
    venv = gymnasium.vector.SyncVectorEnv(
        [lambda: gymnasium.make(game, render_mode="rgb_array")] * n)
    if mode == "none":
        return venv
    return iwm_gym.IWMVectorWrapper(venv, intrinsic_reward=0.01, worker=worker)


def run(game: str, n: int, mode: str, steps: int, worker: WorkerConfig) -> dict[str, Any]:
    with RoundTrips() as trips:
        t0 = time.perf_counter()
        env = make_vec(game, n, mode, worker)
        try:
            env.reset(seed=list(range(n)))
            start_s = time.perf_counter() - t0
            rng = np.random.default_rng(0)
            space = env.single_action_space
            for _ in range(5):  # warm-up, not timed
                env.step(rng.integers(space.n, size=n))
            trips.ms.clear()
            t = time.perf_counter()
            for _ in range(steps):
                env.step(rng.integers(space.n, size=n))
            dt = time.perf_counter() - t
            rss = total_rss_mib()
        finally:
            env.close()
    lat = np.asarray(trips.ms)
    return {"n": n, "mode": mode, "steps_s": n * steps / dt, "start_s": start_s,
            "rss_mib": rss,
            "p50": float(np.percentile(lat, 50)) if lat.size else None,
            "p99": float(np.percentile(lat, 99)) if lat.size else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--game", default="ALE/Breakout-v5")
    ap.add_argument("--ns", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--steps", type=int, default=100, help="timed vector steps a row")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="worker torch threads (0: auto)")
    ap.add_argument("--tiny", action="store_true",
                    help="an untrained ViT-Ti at 64 px instead of the shipped model")
    ap.add_argument("--per-env-max", type=int, default=8,
                    help="skip per-env rows above this n (a model copy each)")
    args = ap.parse_args(argv)
    import ale_py

    gymnasium.register_envs(ale_py)
    extra = {"untrained": True, "encoder": "vit_tiny_patch16_224", "img_size": 64} \
        if args.tiny else {}
    worker = WorkerConfig(device=args.device, threads=args.threads, **extra)
    print(f"{args.game}, {'untrained ViT-Ti/64' if args.tiny else 'shipped model'}, "
          f"{args.device}, {args.steps} vector steps a row", flush=True)
    print("| n | world model | env steps/s | start s | total RSS MiB | frame→surprise p50 ms "
          "| p99 ms |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for n in args.ns:
        for mode in args.modes:
            if mode == "per-env" and n > args.per_env_max:
                continue
            r = run(args.game, n, mode, args.steps, worker)
            lat = ("–", "–") if r["p50"] is None else (f"{r['p50']:.1f}", f"{r['p99']:.1f}")
            print(f"| {n} | {mode} | {r['steps_s']:.1f} | {r['start_s']:.1f} | "
                  f"{r['rss_mib']:.0f} | {lat[0]} | {lat[1]} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
