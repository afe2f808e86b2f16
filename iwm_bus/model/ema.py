"""EMA target encoder: a pure momentum schedule of the step (I-JEPA 0.996 -> 1), so resume is exact."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["EMA", "ema_momentum"]


def ema_momentum(step: int, total_steps: int, start: float = 0.996, end: float = 1.0) -> float:
    """EMA momentum at ``step``: linear from ``start`` to ``end`` over ``total_steps`` (I-JEPA)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    frac = min(max(step, 0) / total_steps, 1.0)
    return start + (end - start) * frac


class EMA:
    """Exponential moving average of ``source``'s weights into ``target``.

    The momentum is a pure function of the step (:func:`ema_momentum`), so a resumed run
    updates exactly as an uninterrupted one. ``update(step)`` does
    ``target = m * target + (1 - m) * source`` for parameters and copies buffers.
    """

    def __init__(self, source: nn.Module, target: nn.Module, total_steps: int,
                 start: float = 0.996, end: float = 1.0) -> None:
        src, tgt = dict(source.named_parameters()), dict(target.named_parameters())
        if src.keys() != tgt.keys() or any(src[k].shape != tgt[k].shape for k in src):
            raise ValueError("EMA source and target must have the same parameters and shapes")
        ema_momentum(0, total_steps, start, end)  # validates total_steps
        self.source, self.target = source, target
        self.total_steps, self.start, self.end = total_steps, start, end
        self.step = 0  # the next step to apply

    def momentum(self, step: int) -> float:
        return ema_momentum(step, self.total_steps, self.start, self.end)

    @torch.no_grad()
    def update(self, step: int) -> float:
        """Apply the EMA update for training step ``step``; returns the momentum used."""
        m = self.momentum(step)
        # one multi-tensor op for all parameters and one for all buffers (a kernel or two on
        # a GPU, not two per tensor); under no_grad the source needs no detach
        torch._foreach_lerp_(list(self.target.parameters()), list(self.source.parameters()),
                             1.0 - m)
        bt, bs = list(self.target.buffers()), list(self.source.buffers())
        if len(bt) != len(bs):
            raise ValueError(f"EMA target has {len(bt)} buffers, source {len(bs)}")
        if bt:
            torch._foreach_copy_(bt, bs)
        self.step = step + 1
        return m

    @torch.no_grad()
    def distance(self) -> float:
        """RMS difference of target and source weights (seed: "verify EMA is updating")."""
        sq = n = 0.0
        for pt, ps in zip(self.target.parameters(), self.source.parameters(), strict=True):
            sq += float((pt.float() - ps.float()).square().sum())
            n += pt.numel()
        return (sq / max(n, 1)) ** 0.5

    def state_dict(self) -> dict[str, float | int]:
        return {"total_steps": self.total_steps, "start": self.start, "end": self.end,
                "step": self.step}

    def load_state_dict(self, state: Mapping[str, float | int]) -> None:
        self.total_steps = int(state["total_steps"])
        self.start, self.end = float(state["start"]), float(state["end"])
        self.step = int(state["step"])
