"""The counterfactual target smoothed toward the action marginal (``Objective.cf_share``).

``1 - share`` of a query's target stays on its own outcome and ``share`` spreads over its
state's outcomes in proportion to how many actions lead to each. The loss must read those
counts (a uniform spread or an ignored share goes red here), keep each query's own outcome
first, and leave the plain cross-entropy untouched at 0.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from random_stores import random_cf, random_store

from iwm_bus.model.action_terms import action_loss, shared_targets
from iwm_bus.model.objective import Objective
from train.config import RunConfig
from train.trainer import Trainer

pytestmark = pytest.mark.timeout(120)

S, ACTIONS = 32, 6


def test_the_share_goes_to_each_outcome_by_its_actions() -> None:
    # two states: outcomes 0, 1 (4 and 2 of 6 actions), outcomes 2, 3 (1 and 5)
    out_actions = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1],
                                [1, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    state = torch.tensor([0, 0, 1, 1])
    pos = torch.tensor([0, 1, 2, 3, 2])
    allowed = state[None] == state[pos][:, None]
    got = shared_targets(pos, allowed, out_actions, 0.3)
    want = torch.tensor([[0.7 + 0.3 * 4 / 6, 0.3 * 2 / 6, 0, 0],
                         [0.3 * 4 / 6, 0.7 + 0.3 * 2 / 6, 0, 0],
                         [0, 0, 0.7 + 0.3 / 6, 0.3 * 5 / 6],
                         [0, 0, 0.3 / 6, 0.7 + 0.3 * 5 / 6],
                         [0, 0, 0.7 + 0.3 / 6, 0.3 * 5 / 6]])
    assert torch.allclose(got, want), got
    assert torch.allclose(shared_targets(pos, allowed, out_actions, 0.0),
                          torch.eye(4)[pos])


def test_each_query_keeps_its_own_outcome_first() -> None:
    """Below a share of 0.5 the own outcome beats even one that 17 of 18 actions share."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(2, 7, (), generator=gen))
        of = torch.randint(0, n, (18,), generator=gen)
        of[:n] = torch.arange(n)  # every outcome has an action
        out_actions = of[None] == torch.arange(n)[:, None]  # (n, 18)
        pos = torch.arange(n)
        allowed = torch.ones(n, n, dtype=torch.bool)
        got = shared_targets(pos, allowed, out_actions, 0.49)
        assert torch.equal(got.argmax(-1), pos)
        assert torch.allclose(got.sum(-1), torch.ones(n))


@pytest.mark.parametrize("bad", [0.5, -0.1, True, "0.2"])
def test_a_bad_share_is_one_error_naming_it(bad: object) -> None:
    with pytest.raises(ValueError, match="cf_share"):
        Objective(cf_share=bad)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def model_and_batch(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    run = RunConfig.from_dict({
        "model": {"variant": "custom", "encoder_name": "vit_tiny_patch16_224", "img_size": S,
                  "patch_size": 8, "encoder_depth": 1, "pred_depth": 1, "pred_dim": 64,
                  "pred_heads": 2, "num_actions": ACTIONS, "ensemble": 2,
                  "action_every_layer": True, "local_mix": True},
        "objective": {"cf_weight": 1.0, "temporal_weight": 1.0},
        "train": {"phase": 3, "sessions": ["-"], "out_dir": str(tmp_path_factory.mktemp("r")),
                  "batch_size": 4, "steps": 1, "cf_states": 6, "cf_outcomes": 3,
                  "cf_extra": 2, "progress": False, "seed": 0}})
    trainer = Trainer(run, store=random_store(64, S, ACTIONS),
                      cf=random_cf(12, S, ACTIONS, outcomes=3, still=True))
    return trainer.model.eval(), trainer.make_batch(0), run.objective


def _cf_loss(model_and_batch: tuple, share: float, **replace: torch.Tensor) -> float:
    model, batch, obj = model_and_batch
    with torch.no_grad():
        out = action_loss(model, {**batch, **replace}, dataclasses.replace(obj, cf_share=share))
    return float(out["cf"])


def test_the_loss_moves_with_the_share_and_reads_the_action_counts(model_and_batch: tuple
                                                                    ) -> None:
    """Linear in the share (its own outcome's cross-entropy at 0, the marginal's at 1), and
    at a share above 0 it changes with how many actions lead to each outcome; at 0 it
    does not."""
    plain, a, b = (_cf_loss(model_and_batch, s) for s in (0.0, 0.2, 0.4))
    assert a != pytest.approx(plain, abs=1e-4), "the share never reaches the loss"
    assert b - a == pytest.approx(a - plain, rel=1e-3, abs=1e-5)
    acts = model_and_batch[1]["cf_out_actions"]
    moved = acts.clone()
    moved[::3] = True  # each state's still outcome: now every action leads there
    assert _cf_loss(model_and_batch, 0.0, cf_out_actions=moved) == pytest.approx(plain, rel=1e-6)
    assert _cf_loss(model_and_batch, 0.2, cf_out_actions=moved) != pytest.approx(a, abs=1e-4)
