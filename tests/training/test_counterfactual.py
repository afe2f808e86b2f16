"""train.counterfactual: next frames under every action from cloned ALE states.

Restoring a state and stepping the same action gives the same frame; a counterfactual next
frame is exactly what the recorder's source would show after that action; actions are not
ignored (distinct next frames exist); sets are a function of the seed.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from train.counterfactual import (
    CounterfactualSet,
    branch,
    counterfactual_sets,
    distinct_count,
)
from train.explore import ExplorationPolicy, ExploreConfig

pytestmark = pytest.mark.timeout(60)


def test_import_is_numpy_only() -> None:
    code = ("import sys, train.counterfactual; "
            "bad = [m for m in ('gymnasium', 'ale_py', 'torch', 'workers') if m in sys.modules]; "
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0


@pytest.mark.parametrize("kwargs, match", [
    ({"env_id": "VizdoomBasic-v1"}, "ALE/"), ({"n_states": -1}, "n_states"),
    ({"min_gap": 0}, "min_gap"), ({"min_gap": 5, "max_gap": 4}, "max_gap"),
    ({"min_distinct": 19}, "min_distinct"),
])
def test_bad_arguments_are_value_errors(kwargs: dict, match: str) -> None:
    args = {"env_id": "ALE/Pong-v5", "n_states": 1, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        counterfactual_sets(**args)


@pytest.mark.games
def test_restoring_and_stepping_the_same_action_gives_the_same_frame() -> None:
    pytest.importorskip("ale_py")
    from workers.sources import open_source

    policy = ExplorationPolicy(ExploreConfig(seed=2))
    with open_source("gym:ALE/Breakout-v5", seed=2) as src:
        src.reset()
        for _ in range(30):
            frame = src.step({"action_id": policy.act()}).pixels
        first, second = branch(src, frame), branch(src, frame)
        np.testing.assert_array_equal(first.next_frames, second.next_frames)
        # ... and it is the frame the recorder's source shows after that action
        for action in (0, 1, 3, 4):
            got = branch(src, frame).next_frames[action]
            ale = src.env.unwrapped.ale
            state = ale.cloneState(include_rng=True)
            real = src.step({"action_id": action}).pixels
            ale.restoreState(state)
            np.testing.assert_array_equal(got, real)


@pytest.mark.games
@pytest.mark.parametrize("env_id", ["ALE/Pong-v5", "ALE/Breakout-v5"])
def test_sets_have_every_action_and_the_actions_matter(env_id: str) -> None:
    pytest.importorskip("ale_py")
    sets = counterfactual_sets(env_id, n_states=4, seed=1000, min_gap=10, max_gap=20)
    assert len(sets) == 4 and all(isinstance(s, CounterfactualSet) for s in sets)
    for s in sets:
        assert s.frame.shape == (210, 160, 3) and s.frame.dtype == np.uint8
        assert s.next_frames.shape == (18, 210, 160, 3) and s.next_frames.dtype == np.uint8
    assert max(distinct_count(s) for s in sets) >= 2  # fails if the actions were ignored


@pytest.mark.games
def test_sets_are_a_function_of_the_seed_and_min_distinct_filters() -> None:
    pytest.importorskip("ale_py")
    a = counterfactual_sets("ALE/Pong-v5", n_states=3, seed=5)
    b = counterfactual_sets("ALE/Pong-v5", n_states=3, seed=5)
    c = counterfactual_sets("ALE/Pong-v5", n_states=3, seed=6)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.frame, y.frame)
        np.testing.assert_array_equal(x.next_frames, y.next_frames)
    assert not all(np.array_equal(x.frame, y.frame) for x, y in zip(a, c, strict=True))
    filtered = counterfactual_sets("ALE/Pong-v5", n_states=3, seed=5, min_distinct=2)
    assert all(distinct_count(s) >= 2 for s in filtered)
