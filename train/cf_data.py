"""Counterfactual training data: the sidecars ``train.record --counterfactual`` writes beside
the sessions, in memory at the model's input size.

:class:`CounterfactualStore` holds, for every recorded state with at least two distinct next
frames, the state's frame, its distinct next frames and which action leads to which;
:meth:`CounterfactualStore.sample` draws a step's states and queries (a pure function of the
generator, so a resumed run draws the same ones). Frames are resized with
:func:`train.data.resize_u8`, as the evaluation resizes them::

    store = FrameStore.from_sessions(["data/actions/train"], 64, 16)
    cf = CounterfactualStore.for_sessions(store.sources, img_size=64)
    part = cf.sample(torch.Generator().manual_seed(0), states=16, max_outcomes=8, extra=2)
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from train.counterfactual import sidecar_path
from train.data import DataError, resize_u8

__all__ = ["CounterfactualStore"]


def _load(path: os.PathLike[str] | str, img_size: int
          ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """One sidecar's states with >= 2 outcomes: frames, outcomes, offsets, outcome_of."""
    try:
        with np.load(path) as z:
            offsets, outcome_of = z["offsets"], z["outcome_of"].astype(np.int64)
            counts = np.diff(offsets)
            keep = np.flatnonzero(counts >= 2)
            frames = z["frames"][keep]
            outcomes = z["outcomes"]  # each z[...] decompresses the whole array: read it once
            parts = [outcomes[offsets[i]:offsets[i + 1]] for i in keep]
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{path}: unreadable counterfactual sidecar ({e})") from e
    if outcome_of.ndim != 2 or len(outcome_of) != len(counts) or outcome_of.shape[1] < 1:
        raise DataError(f"{path}: outcome_of has shape {outcome_of.shape}, expected "
                        f"({len(counts)}, actions)")
    new_off = np.concatenate([[0], np.cumsum(counts[keep])]).astype(np.int64)
    if not len(keep):
        empty = torch.empty(0, img_size, img_size, 3, dtype=torch.uint8)
        return empty, empty, new_off, outcome_of[keep]
    return (_resized(frames, img_size), _resized(np.concatenate(parts), img_size), new_off,
            outcome_of[keep])


def _resized(frames: np.ndarray, size: int, chunk: int = 256) -> torch.Tensor:
    """:func:`resize_u8` a chunk at a time (the float copy of all frames would not fit)."""
    return torch.cat([resize_u8(frames[i:i + chunk], size) for i in range(0, len(frames), chunk)])


@dataclass
class CounterfactualStore:
    """States (C, S, S, 3), their distinct next frames (Q, S, S, 3) and the action map."""

    frames: torch.Tensor  # (C, S, S, 3) uint8, the state's frame
    outcomes: torch.Tensor  # (Q, S, S, 3) uint8, distinct next frames, state after state
    offsets: torch.Tensor  # (C + 1,) long, where each state's outcomes start
    outcome_of: torch.Tensor  # (C, A) long, the outcome (within its state) of each action
    sources: list[str]  # the sidecar files

    def __len__(self) -> int:
        return self.frames.shape[0]

    @classmethod
    def for_sessions(cls, sessions: Sequence[str | os.PathLike[str]], img_size: int,
                     workers: int = 1) -> CounterfactualStore:
        """The sidecars of those session files that have one; DataError when none has.

        ``workers`` > 1 reads that many sidecars at once in spawned processes (each is
        zlib-compressed at the game's size: one process reads ~4,000 frames a sidecar, one
        after the other); the same store either way."""
        paths = [sidecar_path(s) for s in sessions]
        found = [p for p in paths if p.exists()]
        if not found:
            raise DataError(f"no counterfactual sidecars (*.cf.npz) beside the {len(paths)} "
                            "sessions: record them with python -m train.record "
                            "--counterfactual 2 (ALE games), or set objective.cf_weight 0")
        if workers > 1 and len(found) > 1:
            ctx = mp.get_context("spawn")  # no torch state shared with the parent
            with ProcessPoolExecutor(min(workers, len(found)), mp_context=ctx) as pool:
                parts = list(pool.map(_load, found, [img_size] * len(found)))
        else:
            parts = [_load(p, img_size) for p in found]
        frames = torch.cat([p[0] for p in parts])
        if not len(frames):
            raise DataError(f"{', '.join(map(str, found))}: no state with two or more distinct "
                            "next frames")
        base = np.cumsum([0] + [p[2][-1] for p in parts])
        offsets = np.concatenate([[0]] + [p[2][1:] + o for p, o in zip(parts, base, strict=False)])
        return cls(frames, torch.cat([p[1] for p in parts]), torch.from_numpy(offsets),
                   torch.from_numpy(np.concatenate([p[3] for p in parts])),
                   [str(p) for p in found])

    def sample(self, gen: torch.Generator, states: int, max_outcomes: int, extra: int
               ) -> dict[str, torch.Tensor]:
        """A step's counterfactual part (uint8 images; keys as ``iwm_bus.model.action_terms``
        reads them, ``cf_cur`` / ``cf_out`` still (n, S, S, 3) uint8).

        ``states`` states, each with at most ``max_outcomes`` of its distinct next frames (a
        random subset when it has more); one query per kept outcome, by a random action that
        leads there, plus ``extra`` queries by random actions among those kept (so outcomes
        that many actions share weigh more, as they do in the evaluation)."""
        pick = torch.randint(len(self), (states,), generator=gen)
        out_idx, out_state, out_actions = [], [], []
        q_state, q_action, q_pos = [], [], []
        for si, s in enumerate(pick.tolist()):
            lo, hi = int(self.offsets[s]), int(self.offsets[s + 1])
            n = hi - lo
            keep = torch.randperm(n, generator=gen)[:max_outcomes].sort().values
            of = self.outcome_of[s]  # (A,)
            base = len(out_idx)
            for j, g in enumerate(keep.tolist()):
                acts = (of == g).nonzero().flatten()
                out_idx.append(lo + g)
                out_state.append(si)
                out_actions.append(of == g)
                q_state.append(si)
                q_action.append(int(acts[torch.randint(len(acts), (), generator=gen)]))
                q_pos.append(base + j)
            pos_of = {g: base + j for j, g in enumerate(keep.tolist())}
            usable = torch.tensor([a for a in range(len(of)) if int(of[a]) in pos_of])
            for a in usable[torch.randint(len(usable), (extra,), generator=gen)].tolist():
                q_state.append(si)
                q_action.append(a)
                q_pos.append(pos_of[int(of[a])])
        long = torch.long
        return {"cf_cur": self.frames[pick], "cf_out": self.outcomes[torch.tensor(out_idx)],
                "cf_out_state": torch.tensor(out_state, dtype=long),
                "cf_out_actions": torch.stack(out_actions),
                "cf_q_state": torch.tensor(q_state, dtype=long),
                "cf_q_action": torch.tensor(q_action, dtype=long),
                "cf_q_pos": torch.tensor(q_pos, dtype=long)}
