"""``create_iwm_model``: an IWM of a named variant, built reproducibly."""

from __future__ import annotations

from typing import Any

import torch

from iwm_bus.model.config import VARIANT_DEPTHS, IWMConfig
from iwm_bus.model.iwm import IWM

__all__ = ["create_iwm_model"]


def create_iwm_model(variant: str = "core", *, device: str | torch.device = "cpu",
                     seed: int | None = None, compile: bool = False, amp: bool = True,
                     cuda_graphs: bool = True, **overrides: Any) -> IWM:
    """Build an IWM in eval mode: ``core`` (8 predictor layers), ``invariant`` (4),
    ``equivariant`` (16) or ``custom``; ``overrides`` are IWMConfig fields.

    A named variant pins its depth: ``pred_depth`` may only be given with ``custom`` (or
    equal to the variant's). ``seed`` makes the init reproducible without touching the
    global RNG.
    """
    fields = {"variant": variant, "pred_depth": VARIANT_DEPTHS.get(variant, 8), **overrides}
    cfg = IWMConfig.from_dict(fields)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = IWM(cfg, compile=compile, amp=amp, cuda_graphs=cuda_graphs)
    return model.to(device).eval()
