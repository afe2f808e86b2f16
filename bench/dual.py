"""Dual-stream cost: what the second world model costs per frame and in memory (issue 11).

Per-frame cost is the worker's own step, in this process, on frames of a real game (ALE
Pong, random actions): ring-sized frame -> (one shared preprocessing) -> each stream's
encode, prediction, surprise, MRR and rollout chains (``workers.model_stream``), the same
code the worker runs. Rows: each stream alone (a single-stream worker), the two together
(``--dual``: rollout chains for the horizon MRR in the equivariant stream only, the one RPC
``rollout`` reads them for), and the two with chains in both (what ``--dual`` ran before);
ratio = dual / the single equivariant stream (issue 11 target <= 1.6).
Memory is the RSS of a fresh process that loads the model(s) and runs 30 frames, and what
the models add to the same process without them. ``--precisions`` repeats the rows at each
inference precision (``iwm-launch --precision``; iwm_bus.model.precision), with the ratio to
the single stream at the same precision and to the first precision's single stream.

    python bench/dual.py                                   # the shipped pair, CPU
    python bench/dual.py --precisions fp32,int8,bf16       # what int8 / bf16 buy on a CPU
    python bench/dual.py --frames 300 --device cuda
    python bench/dual.py --semantic runs/invariant/last.pt --equivariant runs/equivariant/last.pt
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def game_frames(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n frames (n, 210, 160, 3) and the action ids that produced them, from ALE Pong."""
    import ale_py
    import gymnasium as gym

    from iwm_bus.actions import ALE_ENV_KWARGS

    gym.register_envs(ale_py)
    env = gym.make("ALE/Pong-v5", **ALE_ENV_KWARGS)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    frames, actions = [], []
    for _ in range(n):
        a = int(rng.integers(0, 18))
        obs, _, term, trunc, _ = env.step(a)
        frames.append(obs)
        actions.append(a)
        if term or trunc:
            obs, _ = env.reset()
    env.close()
    return np.stack(frames), np.array(actions)


def step_times(paths: dict[str, str], device: str, frames: np.ndarray, actions: np.ndarray,
               warmup: int, threads: int, precision: str = "auto",
               chains_everywhere: bool = False) -> np.ndarray:
    """Per-frame seconds of the worker's step with the given (name -> checkpoint) streams,
    each measuring the rollout horizons the worker gives it (``stream_horizons``: the first
    stream all, the others none), or all of them with ``chains_everywhere``."""
    import torch

    from iwm_bus.config import WorkerConfig
    from iwm_bus.model import load_iwm, set_precision
    from workers.encoder import stream_horizons
    from workers.model_stream import ModelStream, shared_input
    from workers.stream import HORIZON, Action

    torch.set_num_threads(threads)
    horizons = [HORIZON] * len(paths) if chains_everywhere else \
        stream_horizons(WorkerConfig(dual=len(paths) > 1), len(paths))
    streams = [ModelStream(set_precision(load_iwm(p, device).eval(), precision), name, 32, h)
               for (name, p), h in zip(paths.items(), horizons, strict=True)]
    cond_dim = streams[0].model.config.cond_dim
    times = []
    for i, (frame, a) in enumerate(zip(frames, actions, strict=True)):
        action = Action(np.zeros(cond_dim, np.float32), int(a))
        t0 = time.perf_counter()
        x = shared_input([s.model for s in streams], frame) if len(streams) > 1 else None
        for s in streams:
            s.step(i, frame, x, action)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return np.asarray(times)


def rss_mb(paths: dict[str, str], device: str, n: int, threads: int,
           precision: str = "auto", chains_everywhere: bool = False) -> float:
    """RSS (MB) of a fresh process after running ``n`` game frames through the streams (no
    streams: the same process without a model)."""
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); "
            "import torch; from bench.dual import game_frames, step_times; "
            f"paths = json.loads({json.dumps(json.dumps(paths))}); "
            f"f, a = game_frames({n}); "
            f"paths and step_times(paths, {device!r}, f, a, 0, {threads}, {precision!r}, "
            f"{chains_everywhere!r}); "
            "print([int(l.split()[1]) / 1024 for l in open('/proc/self/status') "
            "if l.startswith('VmRSS:')][0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from iwm_bus.default_model import dual_checkpoints

    sem, eq = dual_checkpoints()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--semantic", default=str(sem))
    p.add_argument("--equivariant", default=str(eq))
    p.add_argument("--device", default="cpu")
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the worker leaves "
                   "a core to the capture: 1 on this 2-core machine)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved passes per row")
    p.add_argument("--precisions", default="auto", help="comma-separated inference "
                   "precisions (auto, fp32, bf16, int8), each a set of rows")
    args = p.parse_args()
    precisions = [x for x in args.precisions.split(",") if x]
    frames, actions = game_frames(args.frames + args.warmup)
    pair = {"equivariant": args.equivariant, "semantic": args.semantic}
    # row -> (streams, rollout chains in every stream)
    streams = {"equivariant alone": ({"equivariant": args.equivariant}, False),
               "semantic alone": ({"semantic": args.semantic}, False),
               "dual (--dual)": (pair, False), "dual, chains in both": (pair, True)}
    rows = [(name, prec) for prec in precisions for name in streams]
    times: dict[tuple[str, str], list[np.ndarray]] = {r: [] for r in rows}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits all rows
        for name, prec in rows:
            paths, everywhere = streams[name]
            times[name, prec].append(step_times(paths, args.device, frames, actions,
                                                args.warmup, args.threads, prec, everywhere))
    p50 = {r: float(np.median(np.concatenate(t))) for r, t in times.items()}
    first = p50["equivariant alone", precisions[0]]
    print(f"# dual-stream cost per frame, {args.device}, {args.threads} thread(s), "
          f"{args.frames} ALE Pong frames (210x160) x {args.repeats} passes; target: dual "
          "<= 1.6x the single equivariant stream")
    head = (f"{'worker streams':<22}{'precision':>10}{'p50 ms':>8}{'p90 ms':>8}"
            f"{'vs single':>11}{f'vs {precisions[0]} single':>18}{'RSS MB':>9}{'+ models':>10}")
    print(head)
    print("-" * len(head))
    rss_none = rss_mb({}, args.device, 30, args.threads)
    for name, prec in rows:
        t = np.concatenate(times[name, prec]) * 1e3
        paths, everywhere = streams[name]
        rss = rss_mb(paths, args.device, 30, args.threads, prec, everywhere)
        same = p50["equivariant alone", prec]
        print(f"{name:<22}{prec:>10}{np.median(t):>8.2f}{np.percentile(t, 90):>8.2f}"
              f"{p50[name, prec] / same:>10.2f}x{p50[name, prec] / first:>17.2f}x"
              f"{rss:>9.0f}{rss - rss_none:>10.0f}")
    print(f"{'(no model)':<22}{'':>10}{'':>8}{'':>8}{'':>11}{'':>18}{rss_none:>9.0f}")


if __name__ == "__main__":
    main()
