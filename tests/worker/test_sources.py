"""Tests of workers.sources: synthetic determinism and action response, image folders with
actions.csv, animated images, spec errors, the screen's no-display error, and real games
(ALE Pong, ViZDoom Basic; marked ``games``, skipped when the packages are missing)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from workers.sources import (
    SPEC_FORMS,
    SourceError,
    SyntheticSource,
    check_spec,
    open_source,
)

pytestmark = pytest.mark.timeout(60)


def square_xy(pixels: np.ndarray) -> tuple[int, int]:
    """Top-left corner of the synthetic source's white square."""
    ys, xs = np.nonzero(np.all(pixels == 255, axis=2))
    assert xs.size, "no white square in the frame"
    return int(xs.min()), int(ys.min())


def check_frame(pixels: np.ndarray, shape: tuple[int, int, int]) -> None:
    assert pixels.shape == shape
    assert pixels.dtype == np.uint8
    assert pixels.flags.c_contiguous


# ---------------------------------------------------------------- synthetic


ACTIONS = [None, {"action_id": 4}, {"vector": np.array([0.3, -0.7], np.float32)}, None,
           {"action_id": 1}, {"action_id": 0}, None]


def run_synthetic(spec: str, seed: int, actions: list) -> list[np.ndarray]:
    src = open_source(spec, seed=seed)
    return [src.reset().pixels] + [src.step(a).pixels for a in actions]


def test_synthetic_frames_are_a_function_of_seed_and_actions() -> None:
    a = run_synthetic("synthetic:48x40", 3, ACTIONS)
    b = run_synthetic("synthetic:48x40", 3, ACTIONS)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    check_frame(a[0], (40, 48, 3))
    other_seed = run_synthetic("synthetic:48x40", 4, ACTIONS)
    assert not any(np.array_equal(x, y) for x, y in zip(a, other_seed, strict=True))
    other_actions = run_synthetic("synthetic:48x40", 3, [{"action_id": 2}] * len(ACTIONS))
    assert np.array_equal(a[0], other_actions[0])
    assert not np.array_equal(a[-1], other_actions[-1])


def test_synthetic_reset_restarts_the_same_scene() -> None:
    src = SyntheticSource(32, 32, seed=9)
    first = src.reset().pixels
    for _ in range(5):
        src.step({"action_id": 4})
    assert np.array_equal(src.reset().pixels, first)
    assert src.frame_index == 0


def test_synthetic_square_moves_the_way_the_action_says() -> None:
    src = SyntheticSource(64, 64, seed=0)  # square 8 px, speed 4 px
    assert (src.square, src.speed) == (8, 4.0)
    x, y = square_xy(src.reset().pixels)
    assert (x, y) == (28, 28)
    for action_id, (dx, dy) in [(4, (4, 0)), (2, (0, 4)), (3, (-4, 0)), (1, (0, -4)), (0, (0, 0))]:
        frame = src.step({"action_id": action_id})
        assert frame.action == {"action_id": action_id}
        x, y = x + dx, y + dy
        assert square_xy(frame.pixels) == (x, y), f"action_id {action_id}"
    frame = src.step({"vector": np.array([0.5, 1.0, 9.0], np.float32)})  # extra dims ignored
    assert square_xy(frame.pixels) == (x + 2, y + 4)
    np.testing.assert_array_equal(frame.action["vector"], [0.5, 1.0])
    frame = src.step({"vector": np.array([5.0, -5.0], np.float32)})  # clipped to [-1, 1]
    assert square_xy(frame.pixels) == (x + 2 + 4, y + 4 - 4)
    for _ in range(20):
        frame = src.step({"action_id": 4})
    assert square_xy(frame.pixels)[0] == 64 - 8  # clamped at the edge


def test_synthetic_background_moves_while_the_square_stays() -> None:
    src = SyntheticSource(32, 32, seed=1)
    before = src.reset().pixels
    after = src.step({"action_id": 0}).pixels
    assert square_xy(before) == square_xy(after)
    assert not np.array_equal(before, after)


@pytest.mark.parametrize("bad", [
    {"action_id": 17}, {"action_id": True}, {"action_id": "4"},
    {"vector": np.array([np.nan, 0.0], np.float32)}, {"vector": np.array([1.0], np.float32)},
    {}, "left", 4,
])
def test_synthetic_bad_action_is_counted_and_the_default_policy_acts(bad: object) -> None:
    src, ref = SyntheticSource(32, 32, seed=5), SyntheticSource(32, 32, seed=5)
    src.reset()
    ref.reset()
    got, expected = src.step(bad), ref.step(None)
    assert src.bad_actions == 1
    assert got.action == expected.action
    assert np.array_equal(got.pixels, expected.pixels)


# ---------------------------------------------------------------- specs


@pytest.mark.parametrize("spec", [
    "", "nope", "Synthetic", "synthetic:64", "synthetic:4x4", "synthetic:64x64x3",
    "screen:-1", "screen:left", "gym:", "gym:Pong v5", "video:/nonexistent/x.gif",
    "folder:/nonexistent/dir", "replay:/nonexistent/s.mcap", "video:",
])
def test_bad_spec_is_a_value_error_listing_the_valid_forms(spec: str) -> None:
    with pytest.raises(ValueError) as err:
        check_spec(spec)
    assert repr(spec) in str(err.value)
    assert all(form.split()[0] in str(err.value) for form in SPEC_FORMS)
    with pytest.raises(ValueError):
        open_source(spec)


def test_check_spec_accepts_valid_forms_without_opening_them(tmp_path: Path) -> None:
    gif = tmp_path / "a.gif"
    gif.write_bytes(b"not opened by check_spec")
    for spec in ["synthetic", "synthetic:32x16", "gym:NotInstalledAnywhere-v9", "screen",
                 "screen:0", f"folder:{tmp_path}", f"video:{gif}", f"replay:{gif}"]:
        check_spec(spec)


def test_unknown_option_and_bad_seed_are_value_errors() -> None:
    with pytest.raises(ValueError, match="unknown options"):
        open_source("synthetic", colour="red")
    with pytest.raises(ValueError, match="seed"):
        open_source("synthetic", seed=-1)
    with pytest.raises(ValueError, match="speed"):
        open_source("synthetic", speed=0)


def test_screen_without_display_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPLAY", ":987")  # no X server answers there
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(SourceError, match="no display"):
        open_source("screen")


def test_replay_without_its_module_is_a_clear_error(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    session = tmp_path / "s.mcap"
    session.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "workers.sources.replay", None)  # import fails
    with pytest.raises(SourceError, match="ReplaySource"):
        open_source(f"replay:{session}")


# ---------------------------------------------------------------- folder and video


def write_images(folder: Path, count: int, size: tuple[int, int] = (20, 12)) -> list[np.ndarray]:
    """``count`` distinct random images named img0.png .. (natural order != string order)."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) for _ in range(count)]
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"img{i}.png")
    return frames


def drain(src, limit: int = 1000) -> list:
    out = [src.reset()]
    while len(out) < limit and (frame := src.step(None)) is not None:
        out.append(frame)
    return out


def test_folder_frames_in_natural_order_with_actions_csv(tmp_path: Path) -> None:
    frames = write_images(tmp_path, 12)
    (tmp_path / "actions.csv").write_text(
        "frame,action_id,v0,v1\n1,3,,\n2,,0.5,-1\n11,2,0.25,0.75\n")
    (tmp_path / "notes.txt").write_text("ignored")
    src = open_source(f"folder:{tmp_path}")
    assert src.knows_actions
    got = drain(src)
    assert len(got) == 12
    for frame, expected in zip(got, frames, strict=True):
        check_frame(frame.pixels, (12, 20, 3))
        assert np.array_equal(frame.pixels, expected)
    assert got[0].action is None and got[3].action is None
    assert got[1].action == {"action_id": 3}
    np.testing.assert_array_equal(got[2].action["vector"], [0.5, -1.0])
    assert got[11].action["action_id"] == 2
    np.testing.assert_array_equal(got[11].action["vector"], [0.25, 0.75])
    assert src.step(None) is None


def test_folder_loop_without_actions(tmp_path: Path) -> None:
    frames = write_images(tmp_path, 3)
    src = open_source(f"folder:{tmp_path}", loop=True)
    assert not src.knows_actions
    got = drain(src, limit=7)
    assert [np.array_equal(f.pixels, frames[i % 3]) for i, f in enumerate(got)] == [True] * 7
    assert src.episodes == 2


@pytest.mark.parametrize("csv_text, match", [
    ("frame,speed\n1,2\n", "header"),
    ("frame,action_id\n12,1\n", r"actions.csv:2: frame 12 is outside"),
    ("frame,action_id\n1,1\n1,2\n", r"actions.csv:3: frame 1 has a second row"),
    ("frame,action_id\nx,1\n", r"actions.csv:2"),
    ("frame,v0,v1\n1,0.5,\n", "all filled"),
    ("frame,v1\n1,0.5\n", "v0"),
])
def test_folder_bad_actions_csv(tmp_path: Path, csv_text: str, match: str) -> None:
    write_images(tmp_path, 3)
    (tmp_path / "actions.csv").write_text(csv_text)
    with pytest.raises(ValueError, match=match):
        open_source(f"folder:{tmp_path}")


def test_folder_without_images_or_with_mixed_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no PNG/JPG"):
        open_source(f"folder:{tmp_path}")
    write_images(tmp_path, 2)
    Image.new("RGB", (8, 8)).save(tmp_path / "img9.png")
    with pytest.raises(ValueError, match="differ in size"):
        open_source(f"folder:{tmp_path}")


def test_video_gif_frames_timing_and_loop(tmp_path: Path) -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 250, 0)]
    frames = []
    for i, colour in enumerate(colours):
        frame = np.zeros((16, 24, 3), np.uint8)
        frame[:, : 6 * (i + 1)] = colour
        frames.append(frame)
    durations = [40, 60, 100, 30]
    path = tmp_path / "clip.gif"
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0)
    src = open_source(f"video:{path}", loop=True)
    got = drain(src, limit=6)
    for i, frame in enumerate(got):
        check_frame(frame.pixels, (16, 24, 3))
        assert np.array_equal(frame.pixels, frames[i % 4]), f"frame {i}"
    clock = np.cumsum([0] + [durations[i % 4] for i in range(5)])
    assert [f.t_recorded_ns for f in got] == [int(ms * 1_000_000) for ms in clock]
    assert src.episodes == 1
    assert all(f.action is None for f in got)


def test_video_rejects_a_file_pillow_cannot_read(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    with pytest.raises(ValueError, match="folder:"):
        open_source(f"video:{path}")


# ---------------------------------------------------------------- real games


def require(module: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError as e:
        pytest.skip(f"{module} not installed ({e}); install the games extra")


def run_game(spec: str, actions: list[int], **options) -> tuple[list, object]:
    src = open_source(spec, seed=7, **options)
    try:
        frames = [src.reset()] + [src.step({"action_id": a}) for a in actions]
    finally:
        src.close()
    return frames, src


@pytest.mark.games
@pytest.mark.parametrize("spec, shape, other", [
    ("gym:ALE/Pong-v5", (210, 160, 3), 3),
    ("gym:VizdoomBasic-v1", (240, 320, 3), 1),
])
def test_gym_frames_and_actions_are_applied(spec: str, shape: tuple, other: int,
                                            tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    require("ale_py" if "ALE" in spec else "vizdoom")
    monkeypatch.chdir(tmp_path)  # ViZDoom writes _vizdoom.ini into the working directory
    actions = [2, 2, 2, 2, 2]
    first, src = run_game(spec, actions)
    again, _ = run_game(spec, actions)
    different, _ = run_game(spec, [other] * 5)
    for frame in first:
        check_frame(frame.pixels, shape)
    assert [f.action for f in first[1:]] == [{"action_id": 2}] * 5
    assert src.action_space["type"] == "discrete"
    assert all(np.array_equal(a.pixels, b.pixels) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[-1].pixels, different[-1].pixels)


@pytest.mark.games
@pytest.mark.parametrize("spec", ["gym:ALE/Pong-v5", "gym:VizdoomBasic-v1"])
def test_gym_episode_end_resets_and_bad_actions_fall_back(spec: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    require("ale_py" if "ALE" in spec else "vizdoom")
    monkeypatch.chdir(tmp_path)
    src = open_source(spec, seed=1, max_episode_steps=3)
    try:
        n = src.action_space["n"]
        src.reset()
        steps = [src.step({"action_id": 1}) for _ in range(3)]
        assert src.episodes == 1
        restart = src.step({"action_id": 1})
        assert restart.action is None  # the new episode's first frame: no action produced it
        bad = src.step({"action_id": n + 5})
        assert src.bad_actions == 1
        assert 0 <= bad.action["action_id"] < n  # the default policy's sample
        wrong_kind = src.step({"vector": np.zeros(2, np.float32)})
        assert src.bad_actions == 2 and "action_id" in wrong_kind.action
        assert all(s.action == {"action_id": 1} for s in steps)
    finally:
        src.close()


@pytest.mark.games
def test_gym_box_space_takes_a_clipped_vector() -> None:
    require("pygame")  # classic-control rendering
    src = open_source("gym:Pendulum-v1", seed=0)
    try:
        assert src.action_space["type"] == "box" and src.action_space["shape"] == [1]
        src.reset()
        frame = src.step({"vector": np.array([9.0], np.float32)})
        np.testing.assert_array_equal(frame.action["vector"], [2.0])  # clipped to high
        assert frame.pixels.ndim == 3 and frame.pixels.dtype == np.uint8
        src.step({"action_id": 1})
        assert src.bad_actions == 1
    finally:
        src.close()


def test_unknown_gym_env_is_a_value_error() -> None:
    require("gymnasium")
    with pytest.raises(ValueError, match="NoSuchGame"):
        open_source("gym:NoSuchGame-v0")


@pytest.mark.games
def test_ale_takes_the_full_action_set_without_sticky_actions() -> None:
    require("ale_py")
    src = open_source("gym:ALE/Breakout-v5", seed=0)
    try:
        spec_kwargs = src.env.spec.kwargs
        assert spec_kwargs["full_action_space"] is True
        assert spec_kwargs["repeat_action_probability"] == 0.0
        assert src.action_space == {"type": "discrete", "n": 18, "start": 0, "vocab": "iwm-18"}
        assert src.env.unwrapped.get_action_meanings()[17] == "DOWNLEFTFIRE"
    finally:
        src.close()
    native = open_source("gym:ALE/Breakout-v5", seed=0, actions="native")
    try:
        assert native.action_space["n"] == 4 and "vocab" not in native.action_space
        assert native.env.spec.kwargs["repeat_action_probability"] == 0.0
    finally:
        native.close()
    with pytest.raises(ValueError, match="contradicts actions='shared'"):
        open_source("gym:ALE/Breakout-v5", env_kwargs={"full_action_space": False})
    with pytest.raises(ValueError, match="actions must be one of"):
        open_source("gym:ALE/Breakout-v5", actions="minimal")
    # a game whose full set is smaller than the shared 18: refused up front, not an IndexError
    # from env.step when the agent sends id 9
    with pytest.raises(ValueError, match="ALE/Skiing-v5 has 9 actions even with full_action"):
        open_source("gym:ALE/Skiing-v5", seed=0)
    skiing = open_source("gym:ALE/Skiing-v5", seed=0, actions="native")
    try:
        assert skiing.action_space["n"] == 3  # its minimal set
    finally:
        skiing.close()


@pytest.mark.games
@pytest.mark.parametrize("env_id, action_id, pressed", [
    ("VizdoomBasic-v1", 11, {"MOVE_RIGHT", "ATTACK"}),         # RIGHTFIRE: strafe (no turning)
    ("VizdoomBasic-v1", 2, set()),                             # UP: no forward button
    ("VizdoomDefendLine-v1", 12, {"TURN_LEFT", "ATTACK"}),     # LEFTFIRE
    ("VizdoomHealthGathering-v1", 6, {"MOVE_FORWARD", "TURN_RIGHT"}),  # UPRIGHT
    ("VizdoomDeadlyCorridor-v1", 9, {"MOVE_BACKWARD", "TURN_LEFT"}),   # DOWNLEFT
])
def test_vizdoom_shared_ids_press_the_mapped_buttons(env_id: str, action_id: int, pressed: set,
                                                     tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    require("vizdoom")
    monkeypatch.chdir(tmp_path)
    src = open_source(f"gym:{env_id}", seed=0)
    try:
        assert src.action_space["n"] == 18
        src.reset()
        frame = src.step({"action_id": action_id})
        game = src.env.unwrapped.game
        names = [b.name for b in game.get_available_buttons()]
        got = {n for n, v in zip(names, game.get_last_action(), strict=True) if v}
        assert got == pressed and frame.action == {"action_id": action_id}
        sample = src.step(None).action  # the default policy draws shared ids
        assert 0 <= sample["action_id"] < 18
    finally:
        src.close()
