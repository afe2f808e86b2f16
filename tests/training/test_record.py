"""train.record, train.explore and the shared action vocabulary (iwm_bus.actions).

Sessions recorded from real games (marked ``games``, skipped without the packages) read back
as SessionDataset transitions with shared action ids, and are a function of the seed; every
game of the mix opens with the 18-id space; ViZDoom ids press the buttons docs/actions.md says.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from iwm_bus.actions import ACTION_NAMES, NUM_ACTIONS, components, doom_button_table
from iwm_bus.session import SessionReader
from train.explore import ExplorationPolicy, ExploreConfig
from train.record import (
    GAMES,
    GROUPS,
    RecordConfig,
    main,
    parse_seeds,
    record_session,
    resolve_games,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # ViZDoom writes _vizdoom.ini into the working directory
    return tmp_path


def frames_and_actions(path: Path) -> tuple[np.ndarray, list]:
    reader = SessionReader(path)
    frames = list(reader.frames())
    return np.stack([f.pixels for f in frames]), [f.action for f in frames]


# ---------------------------------------------------------------- vocabulary and policy


def test_vocabulary_is_the_ale_full_action_set() -> None:
    assert NUM_ACTIONS == 18 and ACTION_NAMES[:6] == ("NOOP", "FIRE", "UP", "RIGHT", "LEFT",
                                                      "DOWN")
    assert components(0) == () and components(17) == ("DOWN", "LEFT", "FIRE")
    with pytest.raises(ValueError, match="not in 0..17"):
        components(18)


def test_doom_buttons_map_by_meaning_and_fall_back_to_strafing() -> None:
    turn = ["TURN_LEFT", "TURN_RIGHT", "MOVE_FORWARD", "MOVE_LEFT", "MOVE_RIGHT"]
    table = doom_button_table(turn)
    assert table[0] == (0, 0, 0, 0, 0)
    assert table[2] == (0, 0, 1, 0, 0)  # UP = forward
    assert table[4] == (1, 0, 0, 0, 0)  # LEFT = turn left (not strafe) when turning exists
    assert table[6] == (0, 1, 1, 0, 0)  # UPRIGHT = forward + turn right
    assert table[1] == (0, 0, 0, 0, 0)  # FIRE: no attack button here -> nothing
    strafe = doom_button_table(["MOVE_LEFT", "MOVE_RIGHT", "ATTACK"])  # basic
    assert strafe[4] == (1, 0, 0) and strafe[11] == (0, 1, 1)  # LEFT strafes; RIGHTFIRE


def test_exploration_policy_holds_actions_and_is_seeded() -> None:
    policy = ExplorationPolicy(ExploreConfig(seed=4, min_hold=3, max_hold=3))
    acts = [policy.act() for _ in range(300)]
    assert all(acts[i] == acts[i - 1] for i in range(300) if i % 3)  # changes only every 3
    assert set(acts) == set(range(18))  # uniform over the vocabulary
    again = ExplorationPolicy(ExploreConfig(seed=4, min_hold=3, max_hold=3))
    assert [again.act() for _ in range(300)] == acts
    other = ExplorationPolicy(ExploreConfig(seed=5, min_hold=3, max_hold=3))
    assert [other.act() for _ in range(300)] != acts
    default = ExplorationPolicy(ExploreConfig(seed=1))
    seq = np.array([default.act() for _ in range(2000)])
    changes = np.flatnonzero(seq[1:] != seq[:-1]) + 1
    runs = np.diff(np.concatenate([[0], changes]))
    assert runs.max() <= 16 and 3.5 < runs.mean() < 6.0  # holds of 1..8 (mean 4.5; two may merge)


@pytest.mark.parametrize("kwargs, match", [
    ({"min_hold": 0}, "min_hold"), ({"max_hold": 2, "min_hold": 3}, "max_hold"),
    ({"num_actions": 0}, "num_actions"), ({"seed": -1}, "seed"),
])
def test_explore_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=f"ExploreConfig.{match}"):
        ExploreConfig(**kwargs)


def test_games_seeds_and_config_validation(tmp_path: Path) -> None:
    assert len(GROUPS["mix"]) == 10 and set(GROUPS["mix"]) == set(GAMES)
    assert [n for n, _ in resolve_games(["ale", "pong", "ALE/Qbert-v5"])][-1] == "ALE_Qbert-v5"
    assert parse_seeds("0-3") == (0, 1, 2, 3) and parse_seeds("1000-1001,7") == (1000, 1001, 7)
    for bad in ("", "3-", "a", "1,1"):
        with pytest.raises(ValueError, match="seeds"):
            parse_seeds(bad)
    with pytest.raises(ValueError, match="unknown game 'tetris'"):
        RecordConfig(out=tmp_path, games=("tetris",))
    with pytest.raises(ValueError, match="frame_encoding"):
        RecordConfig(out=tmp_path, frame_encoding="jpeg")
    with pytest.raises(ValueError, match="frames"):
        RecordConfig(out=tmp_path, frames=1)
    assert main(["--out", str(tmp_path), "--games", "tetris"]) == 2


# ---------------------------------------------------------------- real games


@pytest.mark.games
def test_recorded_session_reads_as_transitions_with_shared_ids(tmp_path: Path) -> None:
    pytest.importorskip("ale_py")
    from train.datasets import SessionDataset

    path = tmp_path / "pong.mcap"
    stats = record_session(GAMES["pong"], path, seed=0, frames=40, name="pong")
    assert stats["frames"] == 40 and stats["fps"] > 0
    ds = SessionDataset(path)
    assert len(ds) == 39
    ids = [int(ds[i].action["action_id"]) for i in range(len(ds))]
    assert all(0 <= a < 18 for a in ids) and len(set(ids)) > 3
    sample = ds[0]
    assert sample.frame.shape == sample.next_frame.shape == (210, 160, 3)
    meta = SessionReader(path).metadata
    assert meta["source"]["action_space"]["vocab"] == "iwm-18"
    assert meta["source"]["env_kwargs"] == {"repeat_action_probability": 0.0,
                                            "full_action_space": True}
    assert meta["agent"]["seed"] == 0 and meta["frame_encoding"] == "zstd-raw"
    rec = next(SessionReader(path).frame_records())
    assert rec.encoding == "zstd-raw"  # lossless at the native size
    times = [r.t_ns for r in SessionReader(path).frame_records()]
    assert set(np.diff(times)) == {round(1e9 / 15)}  # the game clock


@pytest.mark.games
def test_same_seed_records_the_same_session_and_another_seed_differs(tmp_path: Path) -> None:
    pytest.importorskip("ale_py")
    paths = {}
    for tag, seed in (("a", 3), ("b", 3), ("c", 4)):
        paths[tag] = tmp_path / f"{tag}.mcap"
        record_session(GAMES["breakout"], paths[tag], seed=seed, frames=40)
    fa, aa = frames_and_actions(paths["a"])
    fb, ab = frames_and_actions(paths["b"])
    fc, ac = frames_and_actions(paths["c"])
    np.testing.assert_array_equal(fa, fb)
    assert aa == ab
    assert aa != ac and not np.array_equal(fa, fc)


@pytest.mark.games
def test_doom_session_with_shared_ids(scratch: Path) -> None:
    pytest.importorskip("vizdoom")
    first, second = scratch / "a.mcap", scratch / "b.mcap"
    for path in (first, second):
        record_session(GAMES["basic"], path, seed=1, frames=30, name="basic")
    frames, actions = frames_and_actions(first)
    assert frames.shape == (30, 240, 320, 3)
    resets = SessionReader(first).end_metadata["episodes"]  # basic ends when the monster dies
    assert resets - 1 <= sum(a is None for a in actions[1:]) <= resets  # last may not reset
    assert all(0 <= a["action_id"] < 18 for a in actions[1:] if a is not None)
    np.testing.assert_array_equal(frames, frames_and_actions(second)[0])
    assert SessionReader(first).metadata["source"]["action_space"]["n"] == 18


@pytest.mark.games
def test_cli_writes_one_session_per_game_and_seed(scratch: Path) -> None:
    pytest.importorskip("ale_py")
    out = scratch / "out"
    assert main(["--out", str(out), "--games", "pong", "--frames", "12", "--seeds", "0-1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["pong-s0.mcap", "pong-s1.mcap"]
    assert main(["--out", str(out), "--games", "pong", "--frames", "12", "--seeds", "0"]) == 2
    before = (out / "pong-s0.mcap").stat().st_mtime_ns
    assert main(["--out", str(out), "--games", "pong", "--frames", "12", "--seeds", "0",
                 "--skip-existing"]) == 0
    assert (out / "pong-s0.mcap").stat().st_mtime_ns == before  # complete: left alone


@pytest.mark.games
@pytest.mark.parametrize("name", list(GROUPS["mix"]))
def test_every_game_of_the_mix_opens_with_the_shared_space(name: str, scratch: Path) -> None:
    game = GAMES[name]
    pytest.importorskip("ale_py" if game.env_id.startswith("ALE/") else "vizdoom")
    from workers.sources import open_source

    with open_source(f"gym:{game.env_id}", seed=0) as src:
        assert src.action_space == {"type": "discrete", "n": 18, "start": 0, "vocab": "iwm-18"}
        first = src.reset().pixels
        frames = [src.step({"action_id": a}).pixels for a in (0, 1, 2, 3, 4, 17)]
    assert first.dtype == np.uint8 and first.shape[2] == 3
    assert all(f.shape == first.shape for f in frames)


@pytest.mark.games
def test_recipe_data_step_at_toy_size(tmp_path: Path) -> None:
    pytest.importorskip("ale_py")
    pytest.importorskip("vizdoom")
    recipe = Path(__file__).resolve().parents[2] / "train" / "recipes" / "default.sh"
    env = {**os.environ, "STEPS": "data", "GAMES": "pong,basic", "FRAMES": "6",
           "TRAIN_SEEDS": "0", "HELDOUT_SEEDS": "1000", "JOBS": "1", "DATA": str(tmp_path),
           "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(recipe)], env=env, cwd=tmp_path, timeout=60,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["basic-s0.mcap",
                                                                      "pong-s0.mcap"]
    assert sorted(p.name for p in (tmp_path / "heldout").iterdir()) == ["basic-s1000.mcap",
                                                                        "pong-s1000.mcap"]
    assert SessionReader(tmp_path / "heldout" / "pong-s1000.mcap").num_frames == 6
