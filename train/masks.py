"""I-JEPA multi-block masks (Assran et al. 2023): context and target patch indices.

Per batch one set of block sizes is drawn (scale, aspect ratio), then per image the block
positions: ``num_targets`` target blocks, whose union is the prediction target, and one large
context block minus every target patch. Each row is then cut to the batch's shortest, as
I-JEPA's collator does, so the indices stack into (B, C) and (B, T) tensors. Everything is
drawn from the generator passed in, so a step's masks are a pure function of its seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MaskConfig", "sample_masks"]


def _check_range(name: str, lo_hi: tuple[float, float], lo: float, hi: float) -> None:
    a, b = lo_hi
    if not lo <= a <= b <= hi:
        raise ValueError(f"MaskConfig.{name} must be (a, b) with {lo} <= a <= b <= {hi}, "
                         f"got {lo_hi!r}")


@dataclass
class MaskConfig:
    """Block-mask geometry (I-JEPA defaults)."""

    # number of target blocks per image
    num_targets: int = 4
    # fraction of the image each target block covers
    target_scale: tuple[float, float] = (0.15, 0.2)
    # target block aspect ratio (height / width)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    # fraction of the image the context block covers (before removing targets)
    context_scale: tuple[float, float] = (0.85, 1.0)
    # fewest patches a context may keep
    min_context: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.num_targets, bool) or not isinstance(self.num_targets, int) \
                or self.num_targets < 1:
            raise ValueError(f"MaskConfig.num_targets must be an int >= 1, got {self.num_targets!r}")
        _check_range("target_scale", tuple(self.target_scale), 0.0, 1.0)
        _check_range("target_aspect", tuple(self.target_aspect), 0.1, 10.0)
        _check_range("context_scale", tuple(self.context_scale), 0.0, 1.0)


def _uniform(gen: torch.Generator, lo_hi: tuple[float, float]) -> float:
    lo, hi = lo_hi
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _block_size(gen: torch.Generator, grid: int, scale: tuple[float, float],
                aspect: tuple[float, float]) -> tuple[int, int]:
    area = _uniform(gen, scale) * grid * grid
    ratio = math.exp(_uniform(gen, (math.log(aspect[0]), math.log(aspect[1]))))
    h = max(1, min(grid, round(math.sqrt(area * ratio))))
    w = max(1, min(grid, round(math.sqrt(area / ratio))))
    return h, w


def _block(gen: torch.Generator, grid: int, h: int, w: int) -> Tensor:
    top = int(torch.randint(0, grid - h + 1, (), generator=gen))
    left = int(torch.randint(0, grid - w + 1, (), generator=gen))
    m = torch.zeros(grid, grid, dtype=torch.bool)
    m[top:top + h, left:left + w] = True
    return m.flatten()  # (N,)


def sample_masks(gen: torch.Generator, batch: int, grid: int, cfg: MaskConfig | None = None
                 ) -> tuple[Tensor, Tensor]:
    """Context (B, C) and target (B, T) patch indices for a batch on a ``grid`` x ``grid`` image."""
    cfg = cfg or MaskConfig()
    th, tw = _block_size(gen, grid, cfg.target_scale, cfg.target_aspect)
    ch, cw = _block_size(gen, grid, cfg.context_scale, (1.0, 1.0))
    ctx_rows, tgt_rows = [], []
    for _ in range(batch):
        tgt = torch.zeros(grid * grid, dtype=torch.bool)
        for _ in range(cfg.num_targets):
            tgt |= _block(gen, grid, th, tw)
        ctx = _block(gen, grid, ch, cw) & ~tgt
        if int(ctx.sum()) < cfg.min_context:  # too little left: keep the complement
            ctx = ~tgt
        ctx_rows.append(ctx.nonzero().flatten())
        tgt_rows.append(tgt.nonzero().flatten())
    c = min(len(r) for r in ctx_rows)
    t = min(len(r) for r in tgt_rows)
    if c == 0 or t == 0:
        raise ValueError(f"masks left an empty context or target on a {grid}x{grid} grid; "
                         "use larger images or smaller patches")
    return torch.stack([r[:c] for r in ctx_rows]), torch.stack([r[:t] for r in tgt_rows])
