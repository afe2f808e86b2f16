"""Latency of the IWM world model: encode, predict, rollout and batched planning rollouts.

Prints one markdown table (median milliseconds over ``--repeats`` timed runs after
``--warmup`` runs) per device. Random weights: latency does not depend on training.

    # seconds: ViT-Ti, batch 1, few candidates
    python bench/model_bench.py --quick
    # this machine's table in docs/model.md (CPU)
    python bench/model_bench.py --device cpu --encoder vit_tiny_patch16_224,vit_small_patch16_224 \
        --variants core,invariant,equivariant --batch 1,4 --repeats 7 --warmup 1 --show-min
    python bench/model_bench.py --device cpu --encoder vit_base_patch16_224 --variants core \
        --batch 1 --repeats 5 --warmup 1 --show-min
    # a GPU (bf16 autocast + CUDA graphs; --no-graphs, --no-amp (fp32), --compile to compare)
    python bench/model_bench.py --device cuda:0 --variants core,invariant,equivariant --batch 1,8,32

Columns: ``encode`` = B uint8 frames (``--frame``, default 224x224) from host memory to
latents, preprocessing included; ``predict`` = one step from CLS + patch latents;
``enc+pred`` = the worker's per-frame path; ``rollout{K}`` = K autoregressive steps with patch
latents; ``plan`` = ``--candidates`` action sequences of K steps in one batched rollout from
one start state, CLS-only tokens (``plan+patches`` with patch latents: on CUDA, or on CPU with
``--plan-patches``). ``plan`` is measured once per model and shown on its first row.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from iwm_bus.model import IWM, create_iwm_model  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="core", help="comma list: core,invariant,equivariant")
    ap.add_argument("--batch", default=None, help="comma list of batch sizes (1,8)")
    ap.add_argument("--device", default=None, help="comma list; default cpu (+ cuda:0 if present)")
    ap.add_argument("--encoder", default=None,
                    help="comma list of timm ViTs (vit_base_patch16_224)")
    ap.add_argument("--frame", default="224x224", help="input frame HxW (resized on device)")
    ap.add_argument("--steps", type=int, default=5, help="rollout horizon K")
    ap.add_argument("--candidates", type=int, default=None,
                    help="sequences in the plan rollout (300)")
    ap.add_argument("--plan-patches", action="store_true", help="also time plan+patches on CPU")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs (10)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs first (3)")
    ap.add_argument("--compile", action="store_true", help="torch.compile encoder and predictor")
    ap.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    ap.add_argument("--no-graphs", action="store_true", help="no CUDA graphs (eager launches)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--show-min", action="store_true",
                    help="cells 'median (min)': min is robust to a shared, busy CPU")
    ap.add_argument("--quick", action="store_true",
                    help="defaults ViT-Ti, batch 1, 32 candidates, 3 repeats")
    args = ap.parse_args(argv)
    defaults = dict(encoder="vit_base_patch16_224", batch="1,8", candidates=300, repeats=10,
                    warmup=3)
    if args.quick:
        defaults.update(encoder="vit_tiny_patch16_224", batch="1", candidates=32, repeats=3,
                        warmup=1)
    for key, value in defaults.items():  # explicit flags win over --quick
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device is None:
        args.device = "cpu" + (",cuda:0" if torch.cuda.is_available() else "")
    return args


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int
          ) -> tuple[float, float]:
    """(median, min) wall time of fn() in ms, synchronising CUDA around each run."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, min(times) * 1e3


def bench_batch(m: IWM, args: argparse.Namespace, b: int, with_plan: bool) -> dict:
    """Timings (ms) for one model at batch size b."""
    dev, rng = m.device, np.random.default_rng(0)
    h, w = (int(v) for v in args.frame.lower().split("x"))
    k, c = args.steps, args.candidates
    frames = rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)  # (B, H, W, 3)
    z, p = m.encode(frames)  # (B, D), (B, N, D)
    cond_seq = torch.zeros(b, k, m.config.cond_dim, device=dev)  # (B, K, C)

    def t(fn: Callable[[], object]) -> tuple[float, float]:
        return timed(fn, dev, args.repeats, args.warmup)

    row = {"batch": b,
           "encode": t(lambda: m.encode(frames)),
           "predict": t(lambda: m.predict(z, p)),
           "enc+pred": t(lambda: m.predict(*m.encode(frames))),
           f"rollout{k}": t(lambda: m.rollout(z, p, cond_seq=cond_seq))}
    if with_plan:
        plan_cond = torch.randn(c, k, m.config.cond_dim, device=dev)  # (candidates, K, C)
        row["plan"] = t(lambda: m.rollout(z[:1], cond_seq=plan_cond))
        if dev.type == "cuda" or args.plan_patches:
            row["plan+patches"] = t(lambda: m.rollout(z[:1], p[:1], cond_seq=plan_cond))
    return row


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def fmt(cell: tuple[float, float] | None, show_min: bool) -> str:
    if cell is None:
        return "-"
    return f"{cell[0]:.1f} ({cell[1]:.1f})" if show_min else f"{cell[0]:.1f}"


def print_table(dev: torch.device, results: list[tuple[str, str, dict]], args) -> None:
    k, c = args.steps, args.candidates
    cols = ["batch", "encode", "predict", "enc+pred", f"rollout{k}", "plan", "plan+patches"]
    amp = "bf16 autocast" if dev.type == "cuda" and not args.no_amp else "fp32"
    if dev.type == "cuda":
        amp += ", eager" if args.no_graphs or args.compile else ", CUDA graphs"
    print(f"\n### {dev} - {device_name(dev)} - torch {torch.__version__}, {amp}"
          f"{', compiled' if args.compile else ''}; frames {args.frame}; plan = {c} x {k} steps;"
          f" median{' (min)' if args.show_min else ''} ms\n")
    print("| encoder | variant | " + " | ".join(cols) + " |")
    print("|---|---|" + "---:|" * len(cols))
    for enc, variant, row in results:
        cells = [str(row["batch"])] + [fmt(row.get(col), args.show_min) for col in cols[1:]]
        print(f"| {enc} | {variant} | " + " | ".join(cells) + " |")
    for name, cells in BASELINES:
        print(f"| {name} | " + " | ".join(cells) + " |")
    sys.stdout.flush()


#: named baselines printed under every table: the seed guide's measured figures and the
#: issue's H100 targets (ms; "-" = not given)
BASELINES = [
    ("baseline: seed guide, Radeon 7900 XT, ViT-B | core",
     ["1", "10-15", "5-8", "15-23", "30-40", "-", "-"]),
    ("target: H100, ViT-B | core", ["1", "-", "-", "<= 4", "<= 5", "-", "-"]),
]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch.split(",")]
    for dev_str in args.device.split(","):
        dev = torch.device(dev_str)
        results = []
        for enc in args.encoder.split(","):
            for variant in args.variants.split(","):
                m = create_iwm_model(variant, encoder_name=enc, device=dev, seed=0,
                                     compile=args.compile, amp=not args.no_amp,
                                     cuda_graphs=not args.no_graphs)
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                short = enc.replace("_patch16_224", "").replace("vit_", "ViT-")
                for i, b in enumerate(batches):
                    row = bench_batch(m, args, b, with_plan=i == 0)
                    results.append((short, variant, row))
                    print(f"  {short} {variant} " + " ".join(
                        f"{key}={val[0]:.1f}" for key, val in row.items() if key != "batch")
                        + f" (batch {row['batch']})", file=sys.stderr, flush=True)
                if dev.type == "cuda":
                    gib = torch.cuda.max_memory_allocated(dev) / 2**30
                    print(f"  peak GPU memory {gib:.2f} GiB", file=sys.stderr)
                del m
        print_table(dev, results, args)


if __name__ == "__main__":
    main()
