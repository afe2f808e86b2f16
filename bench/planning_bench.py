"""Planning through the sidecar: rollout round trips via IWMClient and whole CEM plans.

Starts one encoder worker process per device (spawned, untrained weights: latency does not
depend on training), then times through the RPC client, and prints one markdown table of
medians (``--repeats`` timed runs after one warm-up):

    python bench/planning_bench.py --quick                       # a smoke run, ~1 min on CPU
    python bench/planning_bench.py --device cpu                  # ViT-Ti at 224 px, full CEM
    python bench/planning_bench.py --device cuda --encoder vit_base_patch16_224   # H100 goal: plan <= 1 s
    python bench/planning_bench.py --device cpu,cuda --encoder vit_tiny_patch16_224,vit_base_patch16_224

Rows: ``rollout k=5`` = one start latent, 5 steps, one RPC round trip (the seed's
``/rollout`` took 30-40 ms over HTTP); ``rollout_batch 300x5`` = one CEM iteration's RPC;
``CEM plan (RPC)`` = 300 samples x horizon 5 x 30 iterations, top 30 (DINO-WM's setting: 53 s
on an A6000), i.e. 30 batched RPCs plus the planner's numpy; ``CEM plan (in-process)`` = the
same plan on a model in this process (``model_rollout_fn``), so the difference is the RPC and
serialisation cost; ``random shooting (RPC)`` = the same budget without refitting.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agent_bridge import IWMClient  # noqa: E402
from agent_bridge.planner import (  # noqa: E402
    ActionSpace,
    CEMPlanner,
    PlannerConfig,
    RandomShootingPlanner,
    client_rollout_fn,
    model_rollout_fn,
)
from iwm_bus.bus.transport import Endpoints  # noqa: E402
from iwm_bus.config import WorkerConfig  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None, help="comma list; default cpu (+ cuda if present)")
    ap.add_argument("--encoder", default="vit_tiny_patch16_224", help="comma list of timm ViTs")
    ap.add_argument("--img-size", type=int, default=224, help="encoder input size")
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--horizon", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--elites", type=int, default=30)
    ap.add_argument("--dim", type=int, default=2, help="continuous action length (<= 16)")
    ap.add_argument("--repeats", type=int, default=5, help="timed plans (rollouts: 10x this)")
    ap.add_argument("--no-local", action="store_true", help="skip the in-process plan")
    ap.add_argument("--compile", action="store_true", help="worker uses torch.compile")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: ViT-Ti at 32 px, CEM 64 x H5 x 5, 2 repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.img_size, args.repeats = 32, 2
        args.samples, args.elites, args.iterations = 64, 8, 5
    return args


def default_devices() -> list[str]:
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def timed(fn: Callable[[], Any], repeats: int, last: list | None = None) -> list[float]:
    """Milliseconds of ``repeats`` calls after one warm-up call (``last`` gets the result)."""
    result = fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        out.append((time.perf_counter() - t0) * 1000)
    if last is not None:
        last.append(result)
    return out


def start_worker(device: str, encoder: str, img_size: int, run_dir: Path,
                 compile: bool) -> Any:
    from workers.encoder import run_worker

    cfg = WorkerConfig(device=device, encoder=encoder, img_size=img_size, compile=compile,
                       untrained=True)
    proc = mp.get_context("spawn").Process(
        target=run_worker, args=(cfg, Endpoints.ipc(run_dir), f"iwmpb_{secrets.token_hex(4)}"),
        daemon=True)
    proc.start()
    return proc


def bench_one(args: argparse.Namespace, device: str, encoder: str) -> list[tuple[str, list]]:
    """Rows (name, timings in ms) for one device and encoder."""
    run_dir = Path(tempfile.mkdtemp(prefix="iwmpb", dir="/tmp"))
    proc = start_worker(device, encoder, args.img_size, run_dir, args.compile)
    rows: list[tuple[str, list]] = []
    try:
        with IWMClient(run_dir, timeout_s=600) as client:
            info = client.health()
            frame = np.random.default_rng(0).integers(0, 256, (args.img_size, args.img_size, 3),
                                                      dtype=np.uint8)
            z0 = client.encode_image(frame).z_cls
            goal = client.rollout(z0, aug_seq=np.full((args.horizon, args.dim), 0.5)).z_cls_seq[-1]
            rng = np.random.default_rng(1)
            seq = rng.uniform(-1, 1, (5, args.dim))
            cands = rng.uniform(-1, 1, (args.samples, args.horizon, args.dim)).astype(np.float32)
            rows.append(("encode 1 frame", timed(lambda: client.encode_image(frame),
                                                 10 * args.repeats)))
            rows.append(("rollout k=5", timed(lambda: client.rollout(z0, aug_seq=seq),
                                              10 * args.repeats)))
            rows.append((f"rollout_batch {args.samples}x{args.horizon}",
                         timed(lambda: client.rollout_batch(z0, aug_seqs=cands),
                               2 * args.repeats)))
            cfg = PlannerConfig(horizon=args.horizon, samples=args.samples, elites=args.elites,
                                iterations=args.iterations)
            space = ActionSpace(dim=args.dim)
            cem = CEMPlanner(client_rollout_fn(client), space, cfg)
            plans: list = []
            rows.append((_plan_name("CEM plan (RPC)", args),
                         timed(lambda: cem.plan(z0, goal), args.repeats, plans)))
            rnd = RandomShootingPlanner(client_rollout_fn(client), space, cfg)
            rows.append((_plan_name("random shooting (RPC)", args),
                         timed(lambda: rnd.plan(z0, goal), args.repeats, plans)))
            rows.append(("_info", [info["embed_dim"], plans[0].cost, plans[1].cost]))
    finally:
        proc.terminate()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        shutil.rmtree(run_dir, ignore_errors=True)
    if not args.no_local:
        rows.append(_local_plan(args, device, encoder, z0, goal))
    return rows


def _plan_name(name: str, args: argparse.Namespace) -> str:
    return f"{name} {args.samples}xH{args.horizon}x{args.iterations}"


def _local_plan(args: argparse.Namespace, device: str, encoder: str, z0: np.ndarray,
                goal: np.ndarray) -> tuple[str, list]:
    from iwm_bus.model import create_iwm_model

    model = create_iwm_model("custom", device=device, seed=0, encoder_name=encoder,
                             img_size=args.img_size)
    cfg = PlannerConfig(horizon=args.horizon, samples=args.samples, elites=args.elites,
                        iterations=args.iterations)
    cem = CEMPlanner(model_rollout_fn(model), ActionSpace(dim=args.dim), cfg)
    times = timed(lambda: cem.plan(z0, goal), args.repeats)
    del model
    return _plan_name("CEM plan (in-process)", args), times


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    devices = args.device.split(",") if args.device else default_devices()
    print("| device | encoder @ px | D | measurement | median ms | min ms | runs |")
    print("|---|---|---|---|---|---|---|")
    for device in devices:
        for encoder in args.encoder.split(","):
            rows = bench_one(args, device, encoder)
            info = dict(rows)["_info"]
            for name, ms in rows:
                if name == "_info":
                    continue
                print(f"| {device} ({device_name(device)}) | {encoder} @ {args.img_size} | "
                      f"{info[0]} | {name} | {statistics.median(ms):.1f} | {min(ms):.1f} | "
                      f"{len(ms)} |", flush=True)
            print(f"<!-- {device} {encoder}: final cost CEM {info[1]:.4f} vs random shooting "
                  f"{info[2]:.4f} -->", flush=True)
    for row in BASELINES:
        print(row)


#: named baselines, printed under the table (published figures, other models and GPUs)
BASELINES = [
    "| baseline: DINO-WM, A6000 | DINO-WM latents | - | CEM plan 300 x H5 x 30 | 53000 | - | - |",
    "| baseline: V-JEPA 2-AC, RTX 4090 | V-JEPA 2 | - | CEM plan per action | 16000 | - | - |",
    "| target: H100 | ViT-B/16 @ 224 | 768 | CEM plan 300 x H5 x 30 | <= 1000 | - | - |",
]


if __name__ == "__main__":
    main()
