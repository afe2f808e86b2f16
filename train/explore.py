"""The exploration policy that records training data: random actions, each held a while.

An action is drawn uniformly from the ``num_actions`` ids (the shared 18-id vocabulary,
``iwm_bus.actions``) and held for a uniform random ``min_hold..max_hold`` steps, then the
next is drawn. Everything comes from one generator seeded with ``seed``, so a policy with
the same config acts the same. numpy only::

    from train.explore import ExploreConfig, ExplorationPolicy
    policy = ExplorationPolicy(ExploreConfig(seed=3))
    actions = [policy.act() for _ in range(100)]   # e.g. [7, 7, 7, 12, 12, 0, ...]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from iwm_bus.actions import NUM_ACTIONS

__all__ = ["ExplorationPolicy", "ExploreConfig"]


@dataclass(frozen=True)
class ExploreConfig:
    # ids to draw from, 0..num_actions-1 (the shared vocabulary has 18)
    num_actions: int = NUM_ACTIONS
    # an action is held for a uniform random number of steps in min_hold..max_hold
    min_hold: int = 1
    max_hold: int = 8
    # seed of the policy's generator (its draws only; the game has its own seed)
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("num_actions", 1), ("min_hold", 1), ("max_hold", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"ExploreConfig.{name}={value!r}: must be an int >= {low}")
        if self.max_hold < self.min_hold:
            raise ValueError(f"ExploreConfig.max_hold={self.max_hold!r}: must be >= min_hold "
                             f"({self.min_hold})")


class ExplorationPolicy:
    """Random held actions (see the module docstring); ``act()`` gives the next action id."""

    def __init__(self, config: ExploreConfig | None = None) -> None:
        self.config = config or ExploreConfig()
        self._rng = np.random.default_rng(self.config.seed)
        self._action = 0
        self._left = 0  # steps the current action is still held

    def act(self) -> int:
        """The action for the next step."""
        c = self.config
        if self._left == 0:
            self._action = int(self._rng.integers(c.num_actions))
            self._left = int(self._rng.integers(c.min_hold, c.max_hold + 1))
        self._left -= 1
        return self._action

    def __repr__(self) -> str:
        return f"ExplorationPolicy({self.config})"
