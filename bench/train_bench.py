"""Training throughput of the iwm-train presets, beside a bare timm ViT forward+backward.

For each preset: a Trainer on in-memory random frames (no file I/O: the data cost shown is
batch assembly, augmentation and masking), ``--warmup`` steps, then ``--steps`` timed steps.
Prints one markdown table: median step time split into data / forward / backward+optimiser /
EMA, samples per second (images for Phase 1, transitions for Phase 3) and encoder images per
second (every image the step encodes, online and target), beside the baseline: a bare
``timm`` ViT of the same encoder, forward+backward+AdamW on the same batch.

    python bench/train_bench.py                                  # CPU presets (minutes)
    python bench/train_bench.py --presets cpu-tiny:1 --steps 5   # seconds
    python bench/train_bench.py --device cuda --presets gpu-core:1,gpu-core:3

Ratio = (preset's encoder images/s) / (bare ViT images/s): the trainer's cost per encoded
image relative to plain supervised-style training of its encoder (target encodes are
forward-only, so a ratio above 1/2 is possible).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from iwm_bus.model import IWMConfig  # noqa: E402
from train.config import RunConfig  # noqa: E402
from train.data import FrameStore  # noqa: E402
from train.presets import preset  # noqa: E402
from train.trainer import Trainer  # noqa: E402


def fake_store(n: int, size: int, cond_dim: int) -> FrameStore:
    gen = torch.Generator().manual_seed(0)
    linked = torch.ones(n, dtype=torch.bool)
    linked[::100] = False
    return FrameStore(torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=gen),
                      torch.randint(0, 18, (n,), generator=gen), torch.zeros(n, cond_dim),
                      linked, torch.zeros(n, dtype=torch.long), ["random"])


def bare_vit(mc: IWMConfig, batch: int, device: str, steps: int, warmup: int) -> float:
    """Images/s of a plain timm ViT (same encoder) forward + backward + AdamW."""
    vit = timm.create_model(mc.encoder_name, **mc.encoder_kwargs()).to(device)
    opt = torch.optim.AdamW(vit.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, mc.img_size, mc.img_size, device=device)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        loss = vit.forward_features(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def bench_preset(name: str, phase: int, args: argparse.Namespace) -> dict[str, float | str]:
    d = preset(name)
    d.setdefault("train", {}).update(phase=phase, data_dirs=["-"], sessions=["-"], steps=10_000,
                                     device=args.device, progress=False,
                                     out_dir="/tmp/iwm-train-bench")
    if args.batch:
        d["train"]["batch_size"] = args.batch
    run = RunConfig.from_dict(d)
    mc, tc = run.model, run.train
    store = fake_store(max(4 * tc.batch_size, 400), mc.img_size, mc.cond_dim)
    trainer = Trainer(run, store=store)
    rows = []
    for step in range(args.warmup + args.steps):
        m = trainer.train_step(step)
        if step >= args.warmup:
            rows.append(m)
    med = {k: statistics.median(r[k] for r in rows) for k in ("t_data", "t_forward",
                                                                "t_backward", "t_ema")}
    total = sum(med.values())
    # images encoded per sample: Phase 1 = 1 online (masked) + 1 target;
    # Phase 3 = K online + (K + 1) target
    per = 2 if phase == 1 else 2 * tc.k_steps + 1
    bare = bare_vit(mc, tc.batch_size, args.device, args.steps, 1)
    return {"preset": f"{name} (phase {phase})", "encoder": f"{mc.encoder_name} @{mc.img_size}"
            f"/p{mc.effective_patch_size} d{mc.encoder_depth or 12}", "batch": tc.batch_size,
            **{k: v * 1e3 for k, v in med.items()}, "step_ms": total * 1e3,
            "samples_s": tc.batch_size / total, "enc_img_s": tc.batch_size * per / total,
            "bare_img_s": bare, "ratio": tc.batch_size * per / total / bare}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="cpu-tiny:1,cpu-tiny:3,cpu-default:3",
                    help="comma-separated PRESET:PHASE")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, help="override the presets' batch size")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    cols = ["preset", "encoder", "batch", "t_data", "t_forward", "t_backward", "t_ema",
            "step_ms", "samples_s", "enc_img_s", "bare_img_s", "ratio"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for item in args.presets.split(","):
        name, _, phase = item.partition(":")
        r = bench_preset(name, int(phase or 1), args)
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c])
                                for c in cols) + " |", flush=True)


if __name__ == "__main__":
    main()
