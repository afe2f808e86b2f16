"""The encoder side of IWM: a timm ViT run on all tokens or only on kept (context) tokens.

``vit_patch_tokens(vit, x, keep)`` is timm's ``forward_features`` with I-JEPA's context
masking inserted after the position embedding: only the patch tokens at ``keep`` (plus the
prefix tokens such as CLS) go through the blocks. It returns patch latents only; the global
latent of a frame is the mean of its patch latents (:func:`global_latent`), the same rule for
observed and predicted frames, so whatever the worker's surprise uses is what training trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models._manipulate import checkpoint_seq
from torch import Tensor, nn

__all__ = ["gather_tokens", "global_latent", "normed_targets", "vit_patch_tokens"]


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """Tokens ``x`` (B, N, C) at positions ``idx`` (B, K) -> (B, K, C)."""
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


def vit_patch_tokens(vit: nn.Module, x: Tensor, keep: Tensor | None = None,
                     checkpointing: bool = False) -> Tensor:
    """Patch latents of images ``x`` (B, 3, S, S): (B, N, D), or (B, K, D) for ``keep`` (B, K).

    An encoder whose blocks work on the whole grid (``needs_full_grid``: the conv encoder)
    encodes every patch and then keeps those at ``keep``.
    """
    if keep is not None and getattr(vit, "needs_full_grid", False):
        return gather_tokens(vit_patch_tokens(vit, x, None, checkpointing), keep)
    pre = int(getattr(vit, "num_prefix_tokens", 1))
    t = vit.patch_embed(x)  # (B, N, D)
    t = vit._pos_embed(t)  # (B, pre + N, D)
    if keep is not None:
        t = torch.cat([t[:, :pre], gather_tokens(t[:, pre:], keep)], 1)  # (B, pre + K, D)
    t = vit.norm_pre(t)
    t = checkpoint_seq(vit.blocks, t) if checkpointing and t.requires_grad else vit.blocks(t)
    t = vit.norm(t)
    return t[:, pre:]  # (B, N or K, D)


def global_latent(patches: Tensor) -> Tensor:
    """The frame's global latent ``z_cls``: the mean of its patch latents, (B, N, D) -> (B, D)."""
    return patches.mean(-2)


def normed_targets(patches: Tensor) -> Tensor:
    """I-JEPA's regression targets: patch latents layer-normed without affine (B, N, D)."""
    return F.layer_norm(patches.float(), patches.shape[-1:])
