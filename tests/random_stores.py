"""In-memory training data of random pictures, for tests of one training step: a
``FrameStore`` of factual frames and a ``CounterfactualStore`` of cloned states."""

from __future__ import annotations

import torch

from train.cf_data import CounterfactualStore
from train.data import FrameStore


def random_store(n: int, size: int, actions: int, copies: int = 0) -> FrameStore:
    """``n`` random frames of ``size`` px with random action ids below ``actions``; every 48th
    frame starts an episode; the first ``copies`` frames all the same picture (a static
    screen: pixel copies at other indices)."""
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=gen)
    frames[:copies] = frames[0]
    linked = torch.ones(n, dtype=torch.bool)
    linked[::48] = False
    return FrameStore(frames, torch.randint(0, actions, (n,), generator=gen),
                      torch.zeros(n, 16), linked, torch.zeros(n, dtype=torch.long), ["mem"])


def random_cf(n: int, size: int, actions: int, outcomes: int, still: bool = False
              ) -> CounterfactualStore:
    """``n`` random states, each with ``outcomes`` random next frames that the ``actions``
    lead to (each outcome by at least one action); ``still``: each state's first outcome is
    its own frame (nothing moved), so a model's prediction tells it from the others."""
    gen = torch.Generator().manual_seed(1)
    of = torch.randint(0, outcomes, (n, actions), generator=gen)
    of[:, :outcomes] = torch.arange(outcomes)
    u8 = torch.uint8
    states = torch.randint(0, 256, (n, size, size, 3), dtype=u8, generator=gen)
    outs = torch.randint(0, 256, (n * outcomes, size, size, 3), dtype=u8, generator=gen)
    if still:
        outs[::outcomes] = states
    return CounterfactualStore(states, outs, torch.arange(n + 1) * outcomes, of, ["mem"])
