"""Counterfactual training data: the recorder's sidecar, the store that reads it, the
action-term batches, and the refusals (issue 23).

The sidecar must hold exactly the frames the emulator gives after each action (so the
counterfactual term is taught the truth); a sampled query's positive must be the outcome its
action leads to (a wrong map would teach the wrong action); a source that cannot clone its
state, or sessions without sidecars with the term on, are one line and exit 2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from control_world import NUM_ACTIONS, control_sets, write_control_session

from train import cli
from train.cf_data import CounterfactualStore
from train.counterfactual import (
    CounterfactualWriter,
    branch,
    outcome_index,
    sidecar_path,
)
from train.data import DataError
from train.record import main as record_main
from train.record import record_session, resolve_games

pytestmark = pytest.mark.timeout(120)


def test_outcome_index_numbers_outcomes_by_first_action() -> None:
    f = np.zeros((5, 4, 4, 3), np.uint8)
    f[1] += 1
    f[3] += 1
    f[4] += 2
    assert outcome_index(f).tolist() == [0, 1, 0, 1, 2]


def test_writer_and_store_round_trip_the_action_map(tmp_path: Path) -> None:
    sets = control_sets(6, seed=3)
    w = CounterfactualWriter("control", 3)
    for i, s in enumerate(sets):
        w.add(i, s)
    session = tmp_path / "control-s3.mcap"
    w.write(sidecar_path(session))
    assert sidecar_path(session).name == "control-s3.cf.npz"
    store = CounterfactualStore.for_sessions([session], img_size=32)
    kept = [s for s in sets if len(np.unique(outcome_index(s.next_frames))) >= 2]
    assert len(store) == len(kept)
    for i, s in enumerate(kept):  # outcome a leads to is the frame action a gave
        outs = store.outcomes[int(store.offsets[i]):int(store.offsets[i + 1])]
        for a in range(NUM_ACTIONS):
            assert torch.equal(outs[int(store.outcome_of[i, a])],
                               torch.from_numpy(s.next_frames[a]))


def test_sampled_queries_point_at_their_actions_outcome(tmp_path: Path) -> None:
    session = write_control_session(tmp_path / "control-s0.mcap", n=120, seed=0)
    store = CounterfactualStore.for_sessions([session], img_size=32)
    part = store.sample(torch.Generator().manual_seed(0), states=6, max_outcomes=3, extra=2)
    assert len(part["cf_cur"]) == 6
    assert (torch.bincount(part["cf_out_state"]) <= 3).all()
    for s, a, p in zip(part["cf_q_state"], part["cf_q_action"], part["cf_q_pos"], strict=True):
        assert part["cf_out_state"][p] == s  # a candidate of its own state
        assert part["cf_out_actions"][p, a]  # which its action leads to
    # the outcomes of one state differ (the hard negatives are real)
    s0 = part["cf_out"][part["cf_out_state"] == 0]
    assert len(s0) >= 2 and not torch.equal(s0[0], s0[1])


def test_sidecars_read_by_workers_make_the_same_store(tmp_path: Path) -> None:
    """``workers`` > 1 (the GPU host reads 36 sidecars with all its cores): the same store."""
    sessions = []
    for seed in (3, 4, 5):
        w = CounterfactualWriter("control", seed)
        for i, s in enumerate(control_sets(5, seed=seed)):
            w.add(i, s)
        sessions.append(tmp_path / f"control-s{seed}.mcap")
        w.write(sidecar_path(sessions[-1]))
    one = CounterfactualStore.for_sessions(sessions, img_size=16)
    many = CounterfactualStore.for_sessions(sessions, img_size=16, workers=2)
    for f in ("frames", "outcomes", "offsets", "outcome_of"):
        assert torch.equal(getattr(one, f), getattr(many, f)), f
    assert one.sources == many.sources and len(one) > 5  # more than one sidecar's states


def test_recorded_sidecar_holds_what_the_emulator_shows(tmp_path: Path) -> None:
    from workers.sources import open_source

    name, game = resolve_games(["breakout"])[0]
    path = tmp_path / "breakout-s0.mcap"
    stats = record_session(game, path, seed=0, frames=30, counterfactual_every=5)
    assert stats["cf_states"] >= 4
    with np.load(sidecar_path(path)) as z:
        seq, frames, outcomes = z["seq"], z["frames"], z["outcomes"]
        offsets, outcome_of = z["offsets"], z["outcome_of"]
    assert seq.tolist()[:2] == [0, 5] and outcome_of.shape[1] == 18
    # the same seed replayed: the state at seq 5 branches to the stored outcomes
    from train.explore import ExplorationPolicy, ExploreConfig
    policy = ExplorationPolicy(ExploreConfig(seed=0))
    with open_source(f"gym:{game.env_id}", seed=0) as src:
        frame = src.reset().pixels
        for _ in range(5):
            frame = src.step({"action_id": policy.act()}).pixels
        cs = branch(src, frame)
    assert np.array_equal(frames[1], cs.frame)
    mine = outcomes[offsets[1]:offsets[2]]
    for a in range(18):
        assert np.array_equal(mine[outcome_of[1, a]], cs.next_frames[a])


def test_counterfactuals_of_a_source_that_cannot_clone_are_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = record_main(["--out", str(tmp_path), "--games", "pong,basic", "--frames", "10",
                      "--counterfactual", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "VizdoomBasic-v1" in err[0]
    assert "--counterfactual" in err[0]
    assert not list(tmp_path.iterdir())  # nothing recorded


def test_the_term_on_sessions_without_sidecars_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from toy_world import write_toy_session
    write_toy_session(tmp_path / "toy.mcap", n=60)
    rc = cli.main(["--preset", "cpu-actions", "--sessions", str(tmp_path / "toy.mcap"),
                   "--set", "model.img_size=32", "--out_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no counterfactual sidecars" in err[0], err
    assert not (tmp_path / "o" / "last.pt").exists()
    with pytest.raises(DataError, match="no counterfactual sidecars"):
        CounterfactualStore.for_sessions([tmp_path / "toy.mcap"], 32)


@pytest.mark.parametrize("sets, match", [
    (["train.cf_states=0"], "go together"),
    (["objective.cf_weight=0"], "go together"),
    (["model.inverse_dynamics=false"], "needs model.inverse_dynamics"),
    (["train.cf_outcomes=1"], "cf_outcomes=1"),
])
def test_inconsistent_action_term_configs_are_one_line(
        sets: list[str], match: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--preset", "cpu-actions", "--sessions", str(tmp_path), "--out_dir",
            str(tmp_path / "o")]
    for s in sets:
        argv += ["--set", s]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err


def test_init_predictor_false_keeps_the_encoder_and_starts_a_new_predictor(
        tmp_path: Path) -> None:
    from iwm_bus.model import create_iwm_model, save_checkpoint
    from train.config import RunConfig
    from train.trainer import init_model

    model_cfg = {"encoder_name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8,
                 "encoder_depth": 1, "pred_depth": 1, "pred_dim": 64, "pred_heads": 2,
                 "num_actions": NUM_ACTIONS, "ensemble": 2}
    src = create_iwm_model("custom", seed=3, **model_cfg)
    with torch.no_grad():  # a predictor that is not what a fresh one would be
        for p in src.predictor.parameters():
            p.add_(0.5)
    save_checkpoint(src, tmp_path / "src.pt")
    for keep in (True, False):
        run = RunConfig.from_dict({
            "model": {"variant": "custom", **model_cfg},
            "train": {"phase": 3, "sessions": [str(tmp_path)], "seed": 0,
                      "init_from": str(tmp_path / "src.pt"), "init_predictor": keep}})
        m = init_model(run, torch.device("cpu"))
        assert torch.equal(m.encoder.patch_embed.proj.weight, src.encoder.patch_embed.proj.weight)
        same = torch.equal(m.predictor.in_proj.weight, src.predictor.in_proj.weight)
        assert same is keep
