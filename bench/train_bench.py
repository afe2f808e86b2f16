"""Training throughput and op count of the iwm-train presets (issue 24).

For each preset: a Trainer on in-memory random frames (no file I/O: the data cost shown is
batch assembly, augmentation and masking; the action presets get random counterfactual
states), ``--warmup`` steps, then ``--steps`` timed steps, then one step under
``torch.profiler``. Prints one markdown table:

- **aten ops/step**: the top-level aten calls of one optimiser step (forward, backward,
  gradient clip, AdamW, EMA, the step's metrics) on a batch made beforehand: calls made from
  Python or the autograd engine, not those an aten op makes inside itself (``linear`` ->
  ``t`` + ``addmm`` counts once). Without fusion a GPU runs at least one kernel a call, so
  this bounds a launch-bound step. **aten calls** counts every aten event, nested ones too;
  **syncs** the calls that would wait for the device on a GPU (``_local_scalar_dense``:
  ``float``, ``.item()``, ``if tensor``; ``nonzero``: boolean indexing), besides the one
  ``tolist`` that reads the step's metrics (on CUDA: the waits CUDA's sync debug mode
  reports, that one included); **data ops** the top-level aten calls of making the batch
  (on a GPU a thread makes the next batch meanwhile).
- **steps/s**, **transitions/s**: 1 / the median step time (data included), and the
  transitions a step trains on per second: Phase 3 samples (each predicts frame t+1 from
  frame t) plus, for the action presets, counterfactual queries; Phase 1 counts images.
- the median step time split into data / forward / backward + optimiser / EMA / wait (ms;
  on a GPU the first four are launch times and ``wait`` the device's work left at the end).

``--adamw fused,loop`` gives a row per AdamW implementation (``train.adamw``; ``loop`` is
torch's per-parameter default on a CPU, what the trainer ran before issue 24), their steps
interleaved so that a machine whose load drifts slows them alike.

    python bench/train_bench.py                                    # cpu-actions, cpu-default
    python bench/train_bench.py --presets cpu-tiny:1 --steps 3     # seconds
    python bench/train_bench.py --adamw fused,loop --steps 5       # before / after the optimiser
    python bench/train_bench.py --device cuda --presets gpu-actions --batch 1024 --cf_states 256

``--bare`` adds a plain timm ViT of the same encoder, forward + backward + AdamW on the same
batch, and the ratio of the step's encoder images/s to it (every image a step encodes, online
and target; target encodes are forward-only, so a ratio above 1/2 is possible). On CUDA the
profiled step also counts the GPU kernels it ran.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import timm
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from iwm_bus.model import IWMConfig  # noqa: E402
from iwm_bus.model.action_terms import SEQ_LEN  # noqa: E402
from train.cf_data import CounterfactualStore  # noqa: E402
from train.config import RunConfig  # noqa: E402
from train.data import FrameStore  # noqa: E402
from train.presets import preset  # noqa: E402
from train.trainer import Trainer  # noqa: E402

#: calls that make the host wait for the device
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero")


def fake_store(n: int, size: int, cond_dim: int) -> FrameStore:
    gen = torch.Generator().manual_seed(0)
    linked = torch.ones(n, dtype=torch.bool)
    linked[::100] = False
    return FrameStore(torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=gen),
                      torch.randint(0, 18, (n,), generator=gen), torch.zeros(n, cond_dim),
                      linked, torch.zeros(n, dtype=torch.long), ["random"])


def fake_cf(n: int, size: int, outcomes: int = 6, actions: int = 18) -> CounterfactualStore:
    """``n`` random states, each with ``outcomes`` distinct next frames; action a leads to
    outcome a for the first ``outcomes`` actions, to a random one for the others."""
    gen = torch.Generator().manual_seed(1)
    of = torch.randint(0, outcomes, (n, actions), generator=gen)
    of[:, :outcomes] = torch.arange(outcomes)
    u8 = torch.uint8
    return CounterfactualStore(
        torch.randint(0, 256, (n, size, size, 3), dtype=u8, generator=gen),
        torch.randint(0, 256, (n * outcomes, size, size, 3), dtype=u8, generator=gen),
        torch.arange(n + 1) * outcomes, of, ["random"])


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


def op_counts(fn: Any, cuda: bool) -> dict[str, int]:
    """Aten calls of ``fn()``: top-level, all, syncs; GPU kernels on CUDA (-1 otherwise)."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    aten = [e for e in events if e.name.startswith("aten::")
            and e.device_type == torch.autograd.DeviceType.CPU]

    def top(e: Any) -> bool:
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("aten::"):
                return False
            p = p.cpu_parent
        return True

    def sync(e: Any) -> bool:  # AdamW reads its step counts where they are: on the CPU
        p = e.cpu_parent        # (loop, foreach) or inside its kernel (fused): no wait
        while p is not None:
            if p.name.startswith("Optimizer.step"):
                return False
            p = p.cpu_parent
        return e.name in SYNC_OPS

    kernels = sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events) if cuda else -1
    return {"ops": sum(map(top, aten)), "calls": len(aten), "syncs": sum(map(sync, aten)),
            "kernels": kernels}


def cuda_syncs(fn: Any) -> int:
    """Host waits for the GPU during ``fn()``, as CUDA's sync debug mode reports them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def transitions(run: RunConfig, batch: dict[str, torch.Tensor]) -> int:
    """Transitions (Phase 1: images) one step trains on: factual samples + counterfactual
    queries."""
    b = run.train.batch_size
    return b + (len(batch["cf_q_state"]) if "cf_q_state" in batch else 0)


def _run_config(name: str, phase: int | None, adamw: str | None, args: argparse.Namespace
                ) -> RunConfig:
    d = preset(name)
    t = d.setdefault("train", {})
    t.update(phase=phase or t.get("phase", 1), data_dirs=["-"], sessions=["-"], steps=10_000,
             device=args.device, progress=False, out_dir="/tmp/iwm-train-bench", init_from=None)
    if args.batch:
        t["batch_size"] = args.batch
    if args.cf_states is not None and t.get("cf_states"):
        t["cf_states"] = args.cf_states
    if adamw:
        t["adamw"] = adamw
    return RunConfig.from_dict(d)


def bench_preset(name: str, phase: int | None, impls: list[str | None],
                 args: argparse.Namespace) -> list[dict[str, float | str]]:
    """A row per AdamW implementation of preset ``name``; their steps interleaved (A, B, A,
    B, ...), so a machine whose load drifts slows them alike."""
    runs = [_run_config(name, phase, impl, args) for impl in impls]
    mc, tc = runs[0].model, runs[0].train
    store = fake_store(max(4 * tc.batch_size, 400), mc.img_size, mc.cond_dim)
    cf = fake_cf(max(2 * tc.cf_states, 64), mc.img_size) if runs[0].objective.cf_weight else None
    trainers = [Trainer(run, store=store, cf=cf) for run in runs]
    rows: list[list[dict[str, float]]] = [[] for _ in trainers]
    for step in range(args.warmup + args.steps):
        for tr, r in zip(trainers, rows, strict=True):
            m = tr.train_step(step)
            if step >= args.warmup:
                r.append(m)
    return [_row(name, tr, r, args) for tr, r in zip(trainers, rows, strict=True)]


def _row(name: str, trainer: Trainer, rows: list[dict[str, float]], args: argparse.Namespace
         ) -> dict[str, float | str]:
    run, step = trainer.run_cfg, args.warmup + args.steps
    mc, tc = run.model, run.train
    cuda = args.device.startswith("cuda")
    data = op_counts(lambda: trainer.make_batch(step), False)
    batch = trainer.make_batch(step)
    ops = op_counts(lambda: trainer.train_step(step, batch), cuda)
    med = {k: statistics.median(r.get(k, 0.0) for r in rows)
           for k in ("t_data", "t_forward", "t_backward", "t_ema", "t_wait")}
    total = statistics.median(sum(r.get(k, 0.0) for k in med) for r in rows)
    n = transitions(run, batch)
    if tc.phase == 1:  # images encoded per sample: 1 online (masked) + 1 target
        per = 2
    elif run.objective.action_terms:  # frames t-1..t+2 once, with gradient
        per = SEQ_LEN
    else:  # K online + (K + 1) target
        per = 2 * tc.k_steps + 1
    enc = tc.batch_size * per / total
    row: dict[str, float | str] = {
        "preset": f"{name} (phase {tc.phase})", "adamw": tc.adamw,
        "batch": f"{tc.batch_size}" + (f" + {tc.cf_states} states" if tc.cf_states else ""),
        "trans/step": n, "aten ops/step": ops["ops"], "aten calls": ops["calls"],
        "syncs": ops["syncs"], "data ops": data["ops"],
        **{k[2:]: v * 1e3 for k, v in med.items()}, "step ms": total * 1e3,
        "steps/s": 1.0 / total, "trans/s": n / total}
    if cuda:
        row["kernels"] = ops["kernels"]
        row["syncs"] = cuda_syncs(lambda: trainer.train_step(step + 1, batch))
    if args.bare:
        bare = bare_vit(mc, tc.batch_size, args.device, args.steps, 1)
        row.update({"enc img/s": enc, "bare img/s": bare, "ratio": enc / bare})
    return row


def fmt(v: float | str | int) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="cpu-actions,cpu-default",
                    help="comma-separated PRESET[:PHASE] (default: the preset's phase)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, help="override the presets' batch size")
    ap.add_argument("--cf_states", type=int,
                    help="override the action presets' counterfactual states a step")
    ap.add_argument("--adamw", help="comma-separated train.adamw values: a row each")
    ap.add_argument("--bare", action="store_true", help="add the bare timm ViT baseline")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    header = False
    for item in args.presets.split(","):
        name, _, phase = item.partition(":")
        impls: list[str | None] = list(args.adamw.split(",")) if args.adamw else [None]
        for r in bench_preset(name, int(phase) if phase else None, impls, args):
            if not header:
                print("| " + " | ".join(r) + " |")
                print("|" + "---|" * len(r))
                header = True
            print("| " + " | ".join(fmt(v) for v in r.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
