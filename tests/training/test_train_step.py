"""A training step with fewer ops computes what it computed before (issue 24).

The fused AdamW takes the step torch's per-parameter loop takes (a resumed pre-issue-24
checkpoint too); a step reads the device once, not once a metric; the batch's pixel-copy mask
found by content equals the pixel-by-pixel comparison it replaced; the inverse-dynamics loss
that weighs unknown actions out equals the one that indexed them out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from random_stores import random_cf, random_store
from torch.profiler import ProfilerActivity, profile

from iwm_bus.model.action_terms import SEQ_LEN, _inverse
from iwm_bus.model.inverse import InverseDynamics
from train.cf_data import CounterfactualStore
from train.config import RunConfig
from train.data import FrameStore
from train.trainer import Trainer

pytestmark = pytest.mark.timeout(240)

S, ACTIONS = 32, 5


def _store(n: int = 96, copies: int = 0) -> FrameStore:
    return random_store(n, S, ACTIONS, copies)


def _cf(n: int = 16, outcomes: int = 3) -> CounterfactualStore:
    return random_cf(n, S, ACTIONS, outcomes)


def _run(tmp_path: Path, actions: bool = True, **train: Any) -> RunConfig:
    model = {"variant": "custom", "encoder_name": "vit_tiny_patch16_224", "img_size": S,
             "patch_size": 8, "encoder_depth": 1, "pred_depth": 1, "pred_dim": 64,
             "pred_heads": 2, "num_actions": ACTIONS, "ensemble": 2}
    objective: dict[str, Any] = {"var_weight": 1.0, "cov_weight": 0.005, "change_weight": 2.0}
    t = {"phase": 3, "sessions": ["-"], "out_dir": str(tmp_path / "run"), "batch_size": 4,
         "steps": 20, "lr": 1e-3, "warmup_steps": 2, "progress": False, "seed": 0}
    if actions:
        model.update(action_every_layer=True, local_mix=True, inverse_dynamics=True)
        objective.update(cf_weight=1.0, temporal_weight=1.0, inverse_weight=0.5)
        t.update(cf_states=3, cf_outcomes=3, cf_extra=1)
    return RunConfig.from_dict({"model": model, "objective": objective, "train": {**t, **train}})


def _trainer(run: RunConfig, store: FrameStore | None = None) -> Trainer:
    return Trainer(run, store=store or _store(), cf=_cf() if run.objective.cf_weight else None)


def _weights(tr: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tr.model.state_dict().items()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_adamw_implementations_take_the_loops_step(tmp_path: Path, impl: str) -> None:
    """Four steps of the action terms (online encoder, predictor, heads, inverse head, EMA
    target): every weight within float rounding of torch's per-parameter AdamW."""
    runs = {i: _trainer(_run(tmp_path, adamw=i)) for i in ("loop", impl)}
    start = _weights(runs["loop"])
    assert _max_diff(start, _weights(runs[impl])) == 0.0
    metrics = {i: [tr.train_step(s) for s in range(4)] for i, tr in runs.items()}
    group = runs[impl].opt.param_groups[0]
    assert (group["fused"], group["foreach"]) == (impl == "fused", impl == "foreach")
    after = {i: _weights(tr) for i, tr in runs.items()}
    assert _max_diff(start, after["loop"]) > 1e-3  # the steps moved the weights
    assert _max_diff(after["loop"], after[impl]) < 1e-5
    assert metrics["loop"][-1]["loss"] == pytest.approx(metrics[impl][-1]["loss"], rel=1e-4)


def test_a_loop_checkpoint_resumes_fused_on_the_same_path(tmp_path: Path) -> None:
    """A checkpoint of a run before issue 24 (AdamW loop) resumed by today's trainer (fused)
    ends within float rounding of a loop run that never stopped."""
    whole = _trainer(_run(tmp_path / "whole", adamw="loop"))
    for s in range(4):
        whole.train_step(s)
    first = _trainer(_run(tmp_path / "first", adamw="loop"))
    for s in range(2):
        first.train_step(s)
    first.save(tmp_path / "ckpt.pt")
    resumed = _trainer(_run(tmp_path / "second"))  # adamw "fused", the default
    resumed.resume(tmp_path / "ckpt.pt")
    assert resumed.opt.param_groups[0]["fused"] and not resumed.opt.param_groups[0]["foreach"]
    for s in range(2, 4):
        resumed.train_step(s)
    assert _max_diff(_weights(whole), _weights(resumed)) < 1e-5


def _syncs(fn: Any) -> int:
    """Calls in ``fn`` that wait for the device on a GPU (outside the optimiser, which reads
    its step counts on the CPU or inside its fused kernel)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    n = 0
    for e in prof.events():
        if e.name not in ("aten::_local_scalar_dense", "aten::nonzero"):
            continue
        p = e.cpu_parent
        while p is not None and not p.name.startswith("Optimizer.step"):
            p = p.cpu_parent
        n += p is None
    return n


@pytest.mark.parametrize("actions", [True, False], ids=["action-terms", "phase3"])
def test_a_step_waits_for_the_device_once(tmp_path: Path, actions: bool) -> None:
    """Metrics are read in one go at the end of the step; the one other wait is the SVD's
    error check of the effective rank. Reading them one by one (``float`` per metric) or
    indexing by a boolean mask in the loss adds a wait each."""
    tr = _trainer(_run(tmp_path, actions=actions))
    batch = tr.make_batch(0)
    tr.train_step(0, batch)
    assert _syncs(lambda: tr.train_step(1, batch)) <= 1


def test_optimiser_and_ema_are_a_few_ops_not_a_few_per_parameter(tmp_path: Path) -> None:
    tr = _trainer(_run(tmp_path))
    tr.train_step(0)
    n_params = sum(1 for p in tr.model.parameters() if p.requires_grad)
    for fn, most in ((tr.opt.step, 4), (lambda: tr.ema.update(1), 3)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        top = [e for e in prof.events() if e.name.startswith("aten::") and not any(
            a.name.startswith("aten::") for a in _ancestors(e))]
        assert len(top) <= most < n_params, [e.name for e in top]


def _ancestors(e: Any) -> list[Any]:
    out, p = [], e.cpu_parent
    while p is not None:
        out.append(p)
        p = p.cpu_parent
    return out


def test_pixel_copies_are_found_by_content(tmp_path: Path) -> None:
    """``seq_same`` marks the candidates that are pixel copies of each positive: with a
    static screen over the first 40 frames, copies sit at other indices of the batch."""
    tr = _trainer(_run(tmp_path), store=_store(copies=40))
    found = 0
    for step in range(6):
        batch = tr.make_batch(step)
        seq = batch["seq_frames"]  # (b, 4, 3, S, S)
        flat = seq.flatten(0, 1).flatten(1)  # (4b, F)
        pos = seq[:, 2:].flatten(2)  # (b, 2, F)
        want = (pos[:, :, None] == flat[None, None]).all(-1)  # (b, 2, 4b)
        assert torch.equal(batch["seq_same"], want)
        found += int(want.sum()) - 2 * seq.shape[0]  # beyond each positive itself
    assert found > 0, "no pixel copy at another index: the test shows nothing"


def test_inverse_loss_weighs_unknown_actions_out() -> None:
    """Equal, value and gradient, to the cross-entropy over the known pairs only; all
    unknown: 0 and no NaN."""
    torch.manual_seed(0)
    head = InverseDynamics(16, ACTIONS, hidden=8)
    model = type("M", (), {"inverse": head})()
    z = torch.randn(3, SEQ_LEN, 5, 16, requires_grad=True)
    acts = torch.randint(0, ACTIONS, (3, SEQ_LEN))
    acts[0, 2] = acts[2, 1] = -1
    out: dict[str, torch.Tensor] = {}
    loss = _inverse(model, z, acts, out)
    (g,) = torch.autograd.grad(loss, z)
    a = acts[:, 1:].flatten()
    known = a >= 0
    logits = head(z[:, :-1].flatten(0, 1)[known], z[:, 1:].flatten(0, 1)[known])
    ref = F.cross_entropy(logits, a[known])
    (g_ref,) = torch.autograd.grad(ref, z)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    assert torch.allclose(g, g_ref, atol=1e-7)
    acc = (logits.argmax(-1) == a[known]).float().mean()
    assert float(out["inverse_acc"]) == pytest.approx(float(acc))
    none = _inverse(model, z, torch.full_like(acts, -1), {})
    (g0,) = torch.autograd.grad(none, z)
    assert float(none.detach()) == 0.0 and torch.isfinite(g0).all() and not g0.any()
