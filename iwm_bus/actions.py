"""Actions, in one place: the shared discrete vocabulary (an action id means the same in
every game) and the checks every action passes, wherever it enters (``check_vector``,
``check_action_id``, ``pad_cond``).

The 18 ids are the ALE's full action set (gymnasium ``full_action_space=True``), so one
model with ``num_actions=18`` takes the actions of every game of the mix. ViZDoom buttons
are mapped onto the same ids: UP = move forward, DOWN = move backward, LEFT / RIGHT = turn
(strafe where the scenario cannot turn), FIRE = attack; a component the scenario lacks is
dropped, so e.g. UP in ``basic`` (no forward button) is a no-op. docs/actions.md has the
table per scenario. numpy only (no torch: the agent side uses it too)::

    from iwm_bus.actions import ACTION_NAMES, doom_buttons, doom_button_table
    ACTION_NAMES[11]                                            # 'RIGHTFIRE'
    doom_buttons(11, ["TURN_LEFT", "TURN_RIGHT", "ATTACK"])     # ('TURN_RIGHT', 'ATTACK')
    doom_button_table(["MOVE_LEFT", "MOVE_RIGHT", "ATTACK"])[4]  # (1, 0, 0): LEFT strafes
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "ACTION_NAMES", "ALE_ENV_KWARGS", "DOOM_COMPONENTS", "MIRRORED", "NUM_ACTIONS", "VOCAB",
    "check_action_id", "check_vector", "components", "doom_button_table", "doom_buttons",
    "pad_cond", "shared_action_space",
]

#: the vocabulary's name, stored in a source's ``action_space["vocab"]`` and in sessions
VOCAB = "iwm-18"

#: id -> meaning: the ALE's full action set, in the ALE's order
ACTION_NAMES: tuple[str, ...] = (
    "NOOP", "FIRE", "UP", "RIGHT", "LEFT", "DOWN", "UPRIGHT", "UPLEFT", "DOWNRIGHT",
    "DOWNLEFT", "UPFIRE", "RIGHTFIRE", "LEFTFIRE", "DOWNFIRE", "UPRIGHTFIRE", "UPLEFTFIRE",
    "DOWNRIGHTFIRE", "DOWNLEFTFIRE",
)
NUM_ACTIONS = len(ACTION_NAMES)

#: id -> the id of its left-right mirror image (LEFT <-> RIGHT, UPLEFT <-> UPRIGHT, ...; the
#: rest are their own): in a horizontally mirrored game, action ``a`` does what ``MIRRORED[a]``
#: does in the game itself
MIRRORED: tuple[int, ...] = tuple(
    ACTION_NAMES.index(name.replace("LEFT", "\0").replace("RIGHT", "LEFT").replace("\0", "RIGHT"))
    for name in ACTION_NAMES)

#: gymnasium.make kwargs of every ALE source: the full action set (ids = this vocabulary)
#: and no sticky actions (the action recorded is the action that took effect)
ALE_ENV_KWARGS: dict[str, Any] = {"full_action_space": True, "repeat_action_probability": 0.0}

#: each component of a name -> the ViZDoom buttons that realise it, the first available wins
DOOM_COMPONENTS: dict[str, tuple[str, ...]] = {
    "UP": ("MOVE_FORWARD",),
    "DOWN": ("MOVE_BACKWARD",),
    "LEFT": ("TURN_LEFT", "MOVE_LEFT"),
    "RIGHT": ("TURN_RIGHT", "MOVE_RIGHT"),
    "FIRE": ("ATTACK",),
}
_ORDER = ("UP", "DOWN", "RIGHT", "LEFT", "FIRE")  # how ALE names are spelled


def _check_id(action_id: int) -> int:
    if isinstance(action_id, bool) or not isinstance(action_id, int) \
            or not 0 <= action_id < NUM_ACTIONS:
        raise ValueError(f"action id {action_id!r} is not in 0..{NUM_ACTIONS - 1} ({VOCAB})")
    return action_id


def components(action_id: int) -> tuple[str, ...]:
    """The direction/fire components of ``action_id``: 15 (UPLEFTFIRE) -> ('UP', 'LEFT', 'FIRE')."""
    name = ACTION_NAMES[_check_id(action_id)]
    return tuple(part for part in _ORDER if part in name)


def doom_buttons(action_id: int, available: Sequence[str]) -> tuple[str, ...]:
    """The ViZDoom buttons (names among ``available``) that ``action_id`` presses."""
    names = set(available)
    pressed: list[str] = []
    for part in components(action_id):
        for button in DOOM_COMPONENTS[part]:
            if button in names:
                pressed.append(button)
                break
    return tuple(pressed)


def doom_button_table(available: Sequence[str]) -> list[tuple[int, ...]]:
    """Row ``a``: 0/1 per button of ``available`` (in that order) pressed by action ``a``."""
    rows = []
    for action_id in range(NUM_ACTIONS):
        pressed = set(doom_buttons(action_id, available))
        rows.append(tuple(int(b in pressed) for b in available))
    return rows


def shared_action_space() -> dict[str, Any]:
    """A source's ``action_space`` description when it takes this vocabulary's ids."""
    return {"type": "discrete", "n": NUM_ACTIONS, "start": 0, "vocab": VOCAB}


# ---------------------------------------------------------------- checks


def check_vector(vector: Any, max_len: int, name: str = "vector") -> np.ndarray:
    """A continuous action (or augmentation) vector as 1-D float32 with 1..``max_len``
    finite values; ValueError naming ``name`` otherwise."""
    try:
        vec = np.asarray(vector, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a sequence of numbers: {e}") from None
    if vec.ndim != 1 or not 1 <= vec.shape[0] <= max_len:
        raise ValueError(f"{name} must be 1-D with 1..{max_len} values, got shape {vec.shape}")
    if not np.isfinite(vec).all():
        raise ValueError(f"{name} holds NaN or inf")
    return vec


def check_action_id(action_id: Any, num_actions: int | None = None) -> int:
    """A discrete action id as an int >= 0 (< ``num_actions`` when given); ValueError."""
    if isinstance(action_id, bool) or not isinstance(action_id, (int, np.integer)):
        raise ValueError(f"action_id must be an int, got {type(action_id).__name__}")
    if action_id < 0 or (num_actions is not None and action_id >= num_actions):
        bound = f"in 0..{num_actions - 1}" if num_actions is not None else ">= 0"
        raise ValueError(f"action_id must be {bound}, got {action_id}")
    return int(action_id)


def pad_cond(vec: Any, cond_dim: int) -> np.ndarray:
    """Zero-pad an action/augmentation vector (or a batch of them, last axis) to ``cond_dim``.

    The seed sends short vectors such as ``[0.5, 0.3, 0.0]``; the model takes ``cond_dim``
    (default 16). Returns float32. A vector longer than ``cond_dim`` raises ValueError.
    """
    arr = np.asarray(vec, dtype=np.float32)
    if arr.ndim == 0:
        raise ValueError(f"cond must be a vector (or a batch of vectors), got a scalar {vec!r}")
    if arr.shape[-1] > cond_dim:
        raise ValueError(f"cond has length {arr.shape[-1]} but cond_dim is {cond_dim}; "
                         "the model cannot take a longer action vector")
    if not np.isfinite(arr).all():
        raise ValueError("cond holds NaN or inf")
    out = np.zeros((*arr.shape[:-1], cond_dim), dtype=np.float32)
    out[..., : arr.shape[-1]] = arr
    return out
