"""The action-discrimination evaluation and its baselines (issue 23).

The action-blind oracle is the best any ranking that ignores the action can do, so it must be
computed right (a model "beating" a wrong oracle proves nothing); a model without the new
heads keeps evaluating, with "n/a" where a row needs them; a model that ignores its action
cannot beat the oracle on this metric.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from control_world import NUM_ACTIONS, control_sets

from iwm_bus.model import create_iwm_model
from iwm_bus.model.inverse import set_cross_entropy
from train.eval_cli import format_games, format_table
from train.evaluate import EvalConfig, action_discrimination, action_discrimination_games, oracle_rr

pytestmark = pytest.mark.timeout(120)


def test_oracle_ranks_outcomes_by_how_many_actions_share_them() -> None:
    # outcome 0 by 3 actions, outcome 1 by 2, outcome 2 by 1: ranks 1, 2, 3
    rr = oracle_rr(np.array([0, 0, 0, 1, 1, 2]))
    assert rr.tolist() == [1, 1, 1, 0.5, 0.5, pytest.approx(1 / 3)]
    # a tie of two outcomes: each is first or second with equal chance
    assert oracle_rr(np.array([0, 1])).tolist() == [0.75, 0.75]


def test_set_cross_entropy_rewards_any_action_of_the_set() -> None:
    logits = torch.tensor([[5.0, 5.0, -5.0]])
    both = torch.tensor([[True, True, False]])
    one = torch.tensor([[True, False, False]])
    assert set_cross_entropy(logits, both) < 0.01 < set_cross_entropy(logits, one)


def _tiny(**kw: object):
    torch.manual_seed(0)
    return create_iwm_model("custom", encoder_name="vit_tiny_patch16_224", img_size=32,
                            patch_size=8, encoder_depth=1, pred_depth=1, pred_dim=64,
                            pred_heads=2, num_actions=NUM_ACTIONS, ensemble=2, **kw).eval()


def test_a_model_without_the_heads_is_na_not_an_error() -> None:
    model = _tiny()
    res = action_discrimination(model, control_sets(4, seed=1), EvalConfig(batch=16))
    assert res["inverse"] is None and res["inverse_majority"] is None
    assert res["n_states"] == 4 and 0 < res["model"] <= 1
    with pytest.raises(RuntimeError, match="no inverse-dynamics head"):
        model.infer_action(torch.zeros(1, 16, 192), torch.zeros(1, 16, 192))
    table = format_table({"action_discrimination": res})
    assert "inverse dynamics accuracy" in table and "n/a" in table


def test_an_action_blind_model_does_not_beat_the_oracle() -> None:
    """The same model fed no action (and a model with no action input) ranks the outcomes
    the same for every action: at most what the oracle gets, here on 40 states."""
    model = _tiny(inverse_dynamics=True)
    sets = control_sets(40, seed=2)
    res = action_discrimination(model, sets, EvalConfig(batch=64))
    assert res["no_action"] <= res["oracle"] + 1e-6
    assert res["centroid"] <= res["oracle"] + 1e-6
    assert res["inverse"] is not None and res["inverse_majority"] >= 1 / NUM_ACTIONS


def test_games_split_into_seen_and_unseen() -> None:
    model = _tiny()
    games = {"a": control_sets(3, seed=4), "b": control_sets(3, seed=5)}
    res = action_discrimination_games(model, games, {"b"}, EvalConfig(batch=16))
    assert res["seen"]["games"] == ["a"] and res["unseen"]["games"] == ["b"]
    assert res["model"] == pytest.approx((res["seen"]["model"] + res["unseen"]["model"]) / 2)
    assert "b (unseen)" in format_games(res)
