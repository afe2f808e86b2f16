"""Inverse dynamics: which action led from one frame to the next (ICM, Pathak et al. 2017).

A small head reads the latents of a frame and of the next frame and gives a logit per action
id. Trained beside the predictor, its loss reaches the encoder, which then has to represent
what the agent controls (the sprite, the view) and not only what moves by itself; at
inference it answers "what did the agent just do" for any source, emulator or not.

Each position sees its own latent and its change, ``[ln(z_t), ln(z_t+1) - ln(z_t)]`` (per
token layer-normed, the space every ranking here uses), through a two-layer MLP; mean and
max pooling over positions feed a linear layer of ``num_actions`` logits. The max keeps a
change confined to a few patches (a 2-pixel sprite) from being averaged away.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["InverseDynamics", "set_cross_entropy"]


class InverseDynamics(nn.Module):
    """``forward(z0, z1) -> logits``: patch latents (B, N, D) x 2 -> (B, num_actions)."""

    def __init__(self, embed_dim: int, num_actions: int, hidden: int = 192) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * embed_dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden), nn.GELU())
        self.out = nn.Linear(2 * hidden, num_actions)

    def forward(self, z0: Tensor, z1: Tensor) -> Tensor:
        a = F.layer_norm(z0.float(), z0.shape[-1:])  # (B, N, D)
        b = F.layer_norm(z1.float(), z1.shape[-1:])
        h = self.mlp(torch.cat([a, b - a], -1))  # (B, N, H)
        return self.out(torch.cat([h.mean(1), h.amax(1)], -1))  # (B, A)


def set_cross_entropy(logits: Tensor, allowed: Tensor) -> Tensor:
    """Mean of ``-log P(action in allowed set)`` over rows: logits (B, A), allowed (B, A)
    bool. Where several actions lead to the same outcome (synonyms in a game's action set)
    any of them is right; with one allowed action per row it is the plain cross-entropy."""
    logp = logits.float().log_softmax(-1)
    return -(logp.masked_fill(~allowed, float("-inf")).logsumexp(-1)).mean()
