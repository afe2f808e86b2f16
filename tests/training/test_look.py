"""Look augmentations of the action terms (``train/look.py``): a mirrored or recoloured sample
is still a true sample of a game, with the same rules.

In the shared-vocabulary control world (``SHARED_MOVES``: RIGHT moves the sprite right), every
factual step and every counterfactual query of a batch is checked: the sprite must move the way
the sample's own action says, in the sample's own frames. Mirroring the frames without the
actions (or the actions without the frames, or flipping the wrong axis) turns it red; so does a
look that differs between the frames of one sample.
"""

from __future__ import annotations

from itertools import permutations
from pathlib import Path

import pytest
import torch
from control_world import SHARED_MOVES, SIZE, SPRITE, write_control_session

from iwm_bus.actions import ACTION_NAMES, MIRRORED
from train.config import RunConfig
from train.look import sample_looks
from train.trainer import DistInfo, Trainer

pytestmark = pytest.mark.timeout(120)

SPRITE_RGB = (250, 220, 40)


def _sessions(tmp_path: Path) -> Path:
    sessions = tmp_path / "sessions"
    sessions.mkdir()
    write_control_session(sessions / "control-s0.mcap", n=240, seed=0, moves=SHARED_MOVES)
    return sessions


def _trainer(sessions: Path, dist: DistInfo | None = None, **train: float) -> Trainer:
    run = RunConfig.from_dict({
        "model": {"variant": "custom", "encoder_name": "vit_tiny_patch16_224", "img_size": 32,
                  "patch_size": 8, "encoder_depth": 1, "pred_depth": 1, "pred_dim": 32,
                  "pred_heads": 2, "num_actions": len(ACTION_NAMES),
                  "action_every_layer": True, "inverse_dynamics": True, "ensemble": 2},
        "train": {"phase": 3, "sessions": [str(sessions)],
                  "out_dir": str(sessions.parent / "run"), "batch_size": 32, "cf_states": 16,
                  "cf_outcomes": 5, "cf_extra": 2, "steps": 4, "progress": False, **train},
        "objective": {"cf_weight": 1.0, "inverse_weight": 1.0},
    })
    return Trainer(run, dist)


def _unit_colour(trainer: Trainer, rgb: tuple[int, ...]) -> torch.Tensor:
    unit = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1) / 255.0
    return trainer.model.normalise_unit(unit).view(3)


def _pixels_of(frame: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """(S, S) bool: the pixels of a normalised (3, S, S) frame in ``colour``."""
    return (frame - colour[:, None, None]).abs().amax(0) < 1e-3


def _sprite(frame: torch.Tensor, colour: torch.Tensor) -> tuple[float, float]:
    """(y, x) of the top-left corner of the sprite in a normalised (3, S, S) frame."""
    hit = _pixels_of(frame, colour).nonzero()
    assert len(hit) == SPRITE * SPRITE, f"the sprite covers {len(hit)} pixels"
    return float(hit[:, 0].min()), float(hit[:, 1].min())


def _agrees(before: tuple[float, float], after: tuple[float, float], action: int) -> bool:
    """The sprite moved as ``action`` moves it (clamped at the edges)."""
    hi = SIZE - SPRITE
    dy, dx = SHARED_MOVES[action]
    want = (min(max(before[0] + dy, 0), hi), min(max(before[1] + dx, 0), hi))
    return after == want


def _colours(trainer: Trainer) -> list[torch.Tensor]:
    """The sprite's colour in each of the 12 looks (channel orders, inverted or not)."""
    out = []
    for perm in permutations(range(3)):
        rgb = [SPRITE_RGB[c] for c in perm]
        out += [_unit_colour(trainer, rgb), _unit_colour(trainer, [255 - v for v in rgb])]
    return out


def _look_of(frame: torch.Tensor, colours: list[torch.Tensor]) -> int:
    """Which look's sprite colour ``frame`` holds."""
    found = [i for i, c in enumerate(colours) if _pixels_of(frame, c).sum() == SPRITE * SPRITE]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize(("mirror_p", "recolour_p"), [(0.0, 0.0), (0.5, 0.0), (0.5, 0.5)])
def test_a_sample_in_a_new_look_obeys_its_own_actions(tmp_path: Path, mirror_p: float,
                                                       recolour_p: float) -> None:
    sessions = _sessions(tmp_path)
    trainer = _trainer(sessions, mirror_p=mirror_p, recolour_p=recolour_p)
    plain = _trainer(sessions) if mirror_p else None
    colours = _colours(trainer)
    horizontal = {a for a, (_, dx) in SHARED_MOVES.items() if dx}
    sideways = recoloured = mirrored = 0
    for step in range(3):
        batch = trainer.make_batch(step)
        frames, acts = batch["seq_frames"], batch["seq_actions"]
        if plain is not None and not recolour_p:  # the same samples, each as it is or mirrored
            orig = plain.make_batch(step)["seq_frames"]
            flipped = [torch.equal(f, o.flip(-1)) for f, o in zip(frames, orig, strict=True)]
            kept = [torch.equal(f, o) for f, o in zip(frames, orig, strict=True)]
            assert all(a or b for a, b in zip(flipped, kept, strict=True))
            mirrored += sum(flipped)
        for i in range(len(frames)):
            looks = {_look_of(f, colours) for f in frames[i]}
            assert len(looks) == 1, f"sample {i}: its frames are in looks {looks}"
            look = looks.pop()
            recoloured += look != 0
            colour = colours[look]
            place = [_sprite(f, colour) for f in frames[i]]
            for t in range(1, 4):  # frame t is what action t did to frame t-1
                assert _agrees(place[t - 1], place[t], int(acts[i, t])), (
                    f"step {step} sample {i}: {ACTION_NAMES[int(acts[i, t])]} moved the "
                    f"sprite {place[t - 1]} -> {place[t]}")
        # counterfactual queries: the outcome at q_pos is what q_action does to its state
        cur, out = batch["cf_cur"], batch["cf_out"]
        for s, a, p in zip(batch["cf_q_state"], batch["cf_q_action"], batch["cf_q_pos"],
                           strict=True):
            look = _look_of(cur[s], colours)
            assert _look_of(out[p], colours) == look
            start, end = _sprite(cur[s], colours[look]), _sprite(out[p], colours[look])
            assert _agrees(start, end, int(a)), (ACTION_NAMES[int(a)], start, end)
            assert batch["cf_out_actions"][p, a]
            sideways += int(a) in horizontal and start[1] != end[1]
        for p, s in enumerate(batch["cf_out_state"]):  # every action a set names leads there
            start = _sprite(cur[s], colours[_look_of(cur[s], colours)])
            end = _sprite(out[p], colours[_look_of(out[p], colours)])
            for a in batch["cf_out_actions"][p].nonzero().flatten().tolist():
                assert _agrees(start, end, a), (p, ACTION_NAMES[a], start, end)
    # the looks were really drawn (a no-op "augmentation" would pass the checks above)
    assert (recoloured > 0) == (recolour_p > 0), recoloured
    assert (mirrored > 0) == (mirror_p > 0 and not recolour_p), mirrored
    assert sideways > 0  # the queries include moves a mirror changes


def test_ddp_ranks_take_their_own_slice_of_the_global_batchs_looks(tmp_path: Path) -> None:
    """Two ranks of one step: each mirrors its own samples, not the same pattern twice."""
    sessions = _sessions(tmp_path)
    patterns = []
    for rank in (0, 1):
        dist = DistInfo(rank=rank, world=2)
        looked = _trainer(sessions, dist, mirror_p=0.5).make_batch(0)["seq_frames"]
        plain = _trainer(sessions, dist).make_batch(0)["seq_frames"]
        assert len(looked) == 16
        patterns.append([not torch.equal(f, o) for f, o in zip(looked, plain, strict=True)])
    assert any(patterns[0]) and any(patterns[1])
    assert patterns[0] != patterns[1], "both ranks drew the same looks"


def test_mirror_flips_columns_and_maps_actions_to_their_mirror_image() -> None:
    look = sample_looks(torch.Generator().manual_seed(0), 64, mirror_p=0.5, recolour_p=0.0)
    m = look.mirror
    assert 10 < int(m.sum()) < 54 and (look.recolour == -1).all()
    u8 = torch.randint(0, 256, (64, 3, 5, 3), dtype=torch.uint8)  # (n, H, W, RGB)
    seen = look.frames(u8)
    assert torch.equal(seen[m], u8[m].flip(2)) and torch.equal(seen[~m], u8[~m])
    ids = torch.arange(18).repeat(64, 1)
    got = look.actions(ids)
    assert torch.equal(got[m], torch.tensor(MIRRORED).repeat(int(m.sum()), 1))
    assert torch.equal(got[~m], ids[~m])
    assert ACTION_NAMES[MIRRORED[ACTION_NAMES.index("UPLEFTFIRE")]] == "UPRIGHTFIRE"


def test_recolouring_alone_leaves_any_action_ids_alone() -> None:
    """A world with its own action ids (not the shared 18) may be recoloured, not mirrored."""
    look = sample_looks(torch.Generator().manual_seed(0), 8, mirror_p=0.0, recolour_p=1.0)
    assert (look.recolour >= 0).all() and not look.mirror.any()
    ids = torch.tensor([[0, 4, 25]] * 8)
    assert torch.equal(look.actions(ids), ids)
    sets = torch.rand(6, 5) < 0.5
    assert torch.equal(look.action_sets(sets, torch.arange(6)), sets)
    u8 = torch.randint(0, 256, (8, 2, 2, 3), dtype=torch.uint8)
    seen = look.frames(u8)
    for i in range(8):  # a permutation (and maybe inversion) of the sample's own channels
        flat = seen[i].reshape(-1, 3).int()
        orig = u8[i].reshape(-1, 3).int()
        assert any(torch.equal(flat, orig[:, list(p)]) or torch.equal(flat, 255 - orig[:, list(p)])
                   for p in permutations(range(3)))
        assert not torch.equal(flat, orig)


def test_looks_need_the_action_terms_and_the_shared_vocabulary(tmp_path: Path) -> None:
    base = {"model": {"variant": "custom", "num_actions": 5},
            "train": {"phase": 3, "sessions": ["x"], "cf_states": 4, "mirror_p": 0.5},
            "objective": {"cf_weight": 1.0}}
    with pytest.raises(ValueError, match="num_actions is 5"):
        RunConfig.from_dict(base)
    with pytest.raises(ValueError, match=r"mirror_p=1.5 must be in \[0, 1\]"):
        RunConfig.from_dict({**base, "train": {**base["train"], "mirror_p": 1.5}})
    with pytest.raises(ValueError, match="need objective.cf_weight or temporal_weight"):
        RunConfig.from_dict({"model": {"variant": "custom", "num_actions": 18},
                             "train": {"phase": 3, "sessions": ["x"], "recolour_p": 0.5}})
