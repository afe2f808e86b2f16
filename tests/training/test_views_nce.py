"""Views in groups (one source view, several colour-jittered targets) and the InfoNCE term
that teaches the predictor to tell a group's targets apart (``Objective.views_nce_weight``)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from toy_world import write_toy_session

from iwm_bus.model.objective import group_nce
from train.augment import AugConfig, apply_views, sample_params, with_target_jitters
from train.config import RunConfig
from train.data import FrameStore
from train.trainer import Trainer

pytestmark = pytest.mark.timeout(120)


def test_a_group_shares_its_source_view_and_differs_in_the_target_colour() -> None:
    gen = torch.Generator().manual_seed(0)
    base = sample_params(gen, 3, AugConfig())
    p = with_target_jitters(gen, base, 4, AugConfig())
    assert p.crop.shape == (12, 4)
    for name in ("crop", "flip", "jitter_s", "gray", "blur", "sigma", "solarize"):
        assert torch.equal(getattr(p, name), getattr(base, name).repeat_interleave(4, 0)), name
    assert len({tuple(j.tolist()) for j in p.jitter_t}) == 12  # every target its own jitter
    frames = torch.randint(0, 256, (3, 24, 24, 3), dtype=torch.uint8).repeat_interleave(4, 0)
    src, tgt = apply_views(frames, p)
    for g in range(3):
        rows = slice(4 * g, 4 * g + 4)
        assert all(torch.equal(src[4 * g], s) for s in src[rows])  # one source view
        assert len({t.sum().item() for t in tgt[rows]}) == 4  # four different targets


def test_group_nce_rewards_only_a_prediction_that_follows_the_conditioning() -> None:
    gen = torch.Generator().manual_seed(1)
    k = 4
    target = torch.randn(2 * k, 16, 8, generator=gen)
    group = torch.arange(2 * k) // k
    assert float(group_nce(target, target, group, 0.02)) < 0.01 * math.log(k)
    # a predictor that ignores the conditioning says the same for a whole group: at best
    # chance, log k, however close that one prediction is to the group's targets
    blind = target.view(2, k, 16, 8).mean(1).repeat_interleave(k, 0)
    assert float(group_nce(blind, target, group, 0.02)) >= math.log(k) - 1e-5
    # negatives come from the row's own group only: the same as scoring each group alone
    noisy = target + 3 * torch.randn(target.shape, generator=gen)
    alone = torch.stack([group_nce(noisy[g * k:(g + 1) * k], target[g * k:(g + 1) * k],
                                   group[:k], 0.02) for g in range(2)]).mean()
    torch.testing.assert_close(group_nce(noisy, target, group, 0.02), alone)


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("sessions")
    write_toy_session(d / "a.mcap", n=60, seed=0, episode=30)
    return d


def _trainer(sessions: Path, out: Path, nce: float) -> Trainer:
    run = RunConfig.from_dict({
        "model": {"variant": "custom", "encoder_name": "vit_tiny_patch16_224",
                  "encoder_depth": 1, "img_size": 32, "patch_size": 8, "pred_depth": 1,
                  "pred_dim": 64, "pred_heads": 2, "num_actions": 5},
        "train": {"phase": 3, "sessions": [str(sessions)], "batch_size": 8, "steps": 1,
                  "out_dir": str(out), "progress": False, "warmup_steps": 1, "lr": 1e-2},
        "objective": {"views_weight": 2.0, "views_residual": True, "views_nce_weight": nce,
                      "freeze_encoder": True},
        "aug": {"target_views": 4}})
    return Trainer(run, store=FrameStore.from_sessions([sessions], 32, 16))


def test_grouped_views_add_the_weighted_nce_term_and_a_frozen_encoder_stays_frozen(
        sessions: Path, tmp_path: Path) -> None:
    tr = _trainer(sessions, tmp_path / "o", nce=0.5)
    batch = tr.make_batch(0)
    views = batch["views"]
    assert views["group"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert torch.equal(views["src"][0], views["src"][3])  # one source view per group
    assert not torch.equal(views["tgt"][0], views["tgt"][1])
    obj = tr.run_cfg.objective
    out = tr.model(batch, obj)
    off = tr.model(batch, dataclasses.replace(obj, views_nce_weight=0.0))
    assert float(out["views_nce"]) > 0
    torch.testing.assert_close(out["loss"] - off["loss"], 2.0 * 0.5 * out["views_nce"])
    enc = {k: v.clone() for k, v in tr.model.encoder.state_dict().items()}
    pred = {k: v.clone() for k, v in tr.model.predictor.state_dict().items()}
    tr.train_step(0, batch)
    assert all(torch.equal(v, enc[k]) for k, v in tr.model.encoder.state_dict().items())
    assert any(not torch.equal(v, pred[k]) for k, v in tr.model.predictor.state_dict().items())
