"""Counterfactual next frames: from one emulator state, the next frame under every action.

For evaluation (action discrimination): play an ALE game with the exploration policy
(``train.explore``), stop at states spaced by a random gap of ``min_gap..max_gap`` steps,
and at each one clone the emulator state (``ale.cloneState(include_rng=True)``), then for
every action of the shared vocabulary restore it and step once. The env is the recorder's
own (``workers.sources.open_source("gym:<id>")``: full 18-action set, no sticky actions,
frameskip 4), so ``next_frames[a]`` is exactly the frame a recording would hold after
action ``a`` from that state. Everything is a function of ``(env_id, seed, gaps)``; episodes
that end are reset, and a state is never taken at an episode's end. numpy only at import
(gymnasium / ale-py are imported when sets are made)::

    from train.counterfactual import counterfactual_sets
    sets = counterfactual_sets("ALE/Breakout-v5", n_states=8, seed=1000)
    sets[0].frame.shape, sets[0].next_frames.shape     # (210, 160, 3), (18, 210, 160, 3)

    python -m train.counterfactual ALE/Pong-v5 --states 20 --seed 1000   # distinct next frames
    python -m train.counterfactual ALE/Breakout-v5 --states 20 --min-distinct 2
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from iwm_bus.actions import NUM_ACTIONS
from train.explore import ExplorationPolicy, ExploreConfig

__all__ = ["CF_SUFFIX", "CounterfactualSet", "CounterfactualWriter", "branch", "can_branch",
           "counterfactual_sets", "distinct_count", "first_actions", "main", "outcome_index",
           "sidecar_path"]

#: a session's counterfactual sidecar: ``<game>-s<seed>.mcap`` -> ``<game>-s<seed>.cf.npz``
CF_SUFFIX = ".cf.npz"

#: second stream of the seed: the gaps between states (the first is the policy's)
_GAP_STREAM = 1
#: states examined per state wanted before min_distinct gives up
MAX_TRIES_PER_STATE = 50


class CounterfactualSet(NamedTuple):
    """One state: its frame and the next frame under each action of the vocabulary."""

    # (H, W, 3) uint8, the current frame
    frame: np.ndarray
    # (A, H, W, 3) uint8, next frame under action a = 0..A-1
    next_frames: np.ndarray


def branch(source: Any, frame: np.ndarray, num_actions: int = NUM_ACTIONS) -> CounterfactualSet:
    """The next frame under each action from the current state of ``source``, which is left
    in that state.

    ``source`` is an ALE ``GymSource`` (``workers.sources.games``) whose last frame is
    ``frame``. Each action is stepped through the unwrapped env (one ``env.step``: frameskip
    emulator frames, the same as ``GymSource.step``) from a restored clone of the state;
    wrappers and the source's episode bookkeeping are not touched.
    """
    env = source.env.unwrapped
    ale = env.ale
    state = ale.cloneState(include_rng=True)
    next_frames = np.empty((num_actions, *frame.shape), np.uint8)  # (A, H, W, 3)
    try:
        for action in range(num_actions):
            ale.restoreState(state)
            env.step(action)
            next_frames[action] = env.render()
    finally:
        ale.restoreState(state)
    return CounterfactualSet(np.array(frame, np.uint8, copy=True), next_frames)


def can_branch(source: Any) -> bool:
    """Whether ``source`` can clone and restore its emulator state (an ALE ``GymSource``)."""
    env = getattr(source, "env", None)
    return env is not None and hasattr(getattr(env, "unwrapped", None), "ale")


def sidecar_path(session: str | os.PathLike[str]) -> Path:
    """Where the counterfactual sidecar of session file ``session`` lives."""
    p = Path(session)
    return p.with_name(p.name.removesuffix(".mcap") + CF_SUFFIX)


class CounterfactualWriter:
    """Collects :func:`branch` results of one recorded session and writes its sidecar.

    The sidecar (``np.savez_compressed``) holds, for C states: ``seq`` (C,) the session seq of
    the state's frame; ``frames`` (C, H, W, 3) that frame; ``outcomes`` (Q, H, W, 3) the
    distinct next frames of all states, state after state; ``offsets`` (C + 1,) where each
    state's outcomes start; ``outcome_of`` (C, A) int8, the outcome (0-based within its state)
    each action leads to. Distinct means different pixels at the game's native size, as the
    action-discrimination eval counts them.
    """

    def __init__(self, env_id: str, seed: int) -> None:
        self.env_id, self.seed = env_id, seed
        self._seq: list[int] = []
        self._frames: list[np.ndarray] = []
        self._outcomes: list[np.ndarray] = []
        self._of: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._seq)

    def add(self, seq: int, cset: CounterfactualSet) -> None:
        nxt = cset.next_frames
        of = outcome_index(nxt)
        self._seq.append(int(seq))
        self._frames.append(cset.frame)
        self._outcomes.append(nxt[first_actions(of)])
        self._of.append(of.astype(np.int8))

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the sidecar atomically; returns its path."""
        path = Path(path)
        counts = [len(o) for o in self._outcomes]
        shape = self._frames[0].shape if self._frames else (0, 0, 3)
        tmp = path.with_name(path.name + ".part")
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f, seq=np.asarray(self._seq, np.int64),
                frames=np.stack(self._frames) if self._frames else np.empty((0, *shape), np.uint8),
                outcomes=(np.concatenate(self._outcomes) if self._outcomes
                          else np.empty((0, *shape), np.uint8)),
                offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                outcome_of=(np.stack(self._of) if self._of
                            else np.empty((0, NUM_ACTIONS), np.int8)),
                env_id=np.asarray(self.env_id), seed=np.asarray(self.seed))
        os.replace(tmp, path)
        return path


def counterfactual_sets(env_id: str, n_states: int, seed: int, min_gap: int = 10,
                        max_gap: int = 40, min_distinct: int = 1) -> list[CounterfactualSet]:
    """``n_states`` counterfactual sets of ALE game ``env_id`` (see the module docstring).

    ``min_distinct`` > 1 skips states where the actions lead to fewer distinct next frames
    (about 20-35 % of states give only one on the games of the mix: input lag, pauses
    between points, death animations); exploration goes on to the next state.
    """
    if not isinstance(env_id, str) or not env_id.startswith("ALE/"):
        raise ValueError(f"counterfactual_sets: env_id {env_id!r} must be an ALE/... id "
                         "(emulator clone/restore)")
    for name, value, low in (("n_states", n_states, 0), ("seed", seed, 0),
                             ("min_gap", min_gap, 1), ("max_gap", max_gap, 1),
                             ("min_distinct", min_distinct, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"counterfactual_sets: {name}={value!r} must be an int >= {low}")
    if max_gap < min_gap:
        raise ValueError(f"counterfactual_sets: max_gap={max_gap} must be >= min_gap={min_gap}")
    if min_distinct > NUM_ACTIONS:
        raise ValueError(f"counterfactual_sets: min_distinct={min_distinct} must be <= "
                         f"{NUM_ACTIONS}")
    from workers.sources import open_source  # the recorder's source: same env settings

    policy = ExplorationPolicy(ExploreConfig(seed=seed))
    gaps = np.random.default_rng([seed, _GAP_STREAM])
    out: list[CounterfactualSet] = []
    # the source refuses a game without the shared 18 actions (workers.sources.games)
    with open_source(f"gym:{env_id}", seed=seed) as src:
        ale = src.env.unwrapped.ale
        frame = src.reset().pixels
        tries = 0
        while len(out) < n_states:
            tries += 1
            if tries > MAX_TRIES_PER_STATE * n_states:
                raise RuntimeError(f"{env_id}: only {len(out)} of {n_states} states in {tries - 1} "
                                   f"tries had >= {min_distinct} distinct next frames; lower "
                                   "min_distinct")
            for _ in range(int(gaps.integers(min_gap, max_gap + 1))):
                frame = src.step({"action_id": policy.act()}).pixels
            while ale.game_over():  # an episode's last frame: the next step resets
                frame = src.step({"action_id": policy.act()}).pixels
            cset = branch(src, frame)
            if min_distinct == 1 or distinct_count(cset) >= min_distinct:
                out.append(cset)
    return out


def outcome_index(next_frames: np.ndarray) -> np.ndarray:
    """(A,) int: the distinct outcome each action leads to, numbered in order of the first
    action that leads there (exact pixel equality; hashing rows, far faster than
    ``np.unique(axis=0)`` on frames)."""
    seen: dict[bytes, int] = {}
    return np.array([seen.setdefault(np.ascontiguousarray(f).tobytes(), len(seen))
                     for f in next_frames], np.int64)


def first_actions(outcome_of: np.ndarray) -> np.ndarray:
    """(G,) the first action leading to each outcome of :func:`outcome_index` (in order)."""
    return np.unique(outcome_of, return_index=True)[1]


def distinct_count(cset: CounterfactualSet) -> int:
    """How many different next frames the actions of ``cset`` lead to."""
    return int(outcome_index(cset.next_frames).max()) + 1


def main(argv: Sequence[str] | None = None) -> int:
    """Print, per state, how many of the 18 actions lead to distinct next frames."""
    p = argparse.ArgumentParser(prog="python -m train.counterfactual",
                                description="distinct counterfactual next frames per state")
    p.add_argument("env_id", help="an ALE id, e.g. ALE/Pong-v5")
    p.add_argument("--states", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-gap", type=int, default=10)
    p.add_argument("--max-gap", type=int, default=40)
    p.add_argument("--min-distinct", type=int, default=1)
    a = p.parse_args(argv)
    try:
        sets = counterfactual_sets(a.env_id, a.states, a.seed, a.min_gap, a.max_gap,
                                   a.min_distinct)
    except (ValueError, RuntimeError) as e:
        print(f"train.counterfactual: {e}", file=sys.stderr)
        return 2
    counts = [distinct_count(s) for s in sets]
    print(f"{a.env_id} seed {a.seed}: distinct next frames per state {counts} "
          f"(mean {np.mean(counts):.2f} of {NUM_ACTIONS})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
