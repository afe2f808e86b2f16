"""The shared discrete action vocabulary: an action id means the same in every game.

The 18 ids are the ALE's full action set (gymnasium ``full_action_space=True``), so one
model with ``num_actions=18`` takes the actions of every game of the mix. ViZDoom buttons
are mapped onto the same ids: UP = move forward, DOWN = move backward, LEFT / RIGHT = turn
(strafe where the scenario cannot turn), FIRE = attack; a component the scenario lacks is
dropped, so e.g. UP in ``basic`` (no forward button) is a no-op. docs/actions.md has the
table per scenario. Pure Python, no imports beyond the standard library::

    from iwm_bus.actions import ACTION_NAMES, doom_buttons, doom_button_table
    ACTION_NAMES[11]                                            # 'RIGHTFIRE'
    doom_buttons(11, ["TURN_LEFT", "TURN_RIGHT", "ATTACK"])     # ('TURN_RIGHT', 'ATTACK')
    doom_button_table(["MOVE_LEFT", "MOVE_RIGHT", "ATTACK"])[4]  # (1, 0, 0): LEFT strafes
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "ACTION_NAMES", "ALE_ENV_KWARGS", "DOOM_COMPONENTS", "NUM_ACTIONS", "VOCAB", "components",
    "doom_button_table", "doom_buttons", "shared_action_space",
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
