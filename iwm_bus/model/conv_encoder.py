"""A small convolutional encoder registered with timm beside the ViTs: ``iwm_conv64``.

Contrastive world models that learn what an action does from pixels (C-SWM, Kipf et al. 2020;
SPR, Schwarzer et al. 2021) encode with a few strided convolutions: a sprite of 2-3 px stays
inside one cell of the output map, where a ViT's patch embedding mixes it with the rest of its
8x8 patch and six global attention blocks spread it further. Trained on counterfactual
outcomes, a 0.1 M-parameter conv encoder to a 64 x 8 x 8 map at 64 px beat the action-blind
oracle by a wide margin within 25 minutes of this 2-core CPU (``shared/notes``), where the
ViT-Ti default had not begun to after an hour.

The module has the attributes :func:`iwm_bus.model.encoder.vit_patch_tokens` uses
(``patch_embed``, ``_pos_embed``, ``norm_pre``, ``blocks``, ``norm``, ``num_prefix_tokens``,
``embed_dim``), so everything downstream (the token grid, the predictor, the EMA target, the
worker) treats it as a ViT without prefix tokens; I-JEPA's context masking keeps cells of the
whole map (``needs_full_grid``). ``patch_size`` (a power of two) sets the
number of stride-2 stages; ``depth`` the residual 3x3 blocks at the output resolution.
"""

from __future__ import annotations

import math
from typing import Any

from timm.models import register_model
from torch import Tensor, nn

__all__ = ["ConvEncoder"]


class _Stem(nn.Module):
    """Stride-2 convolutions from (B, 3, S, S) to the token grid (B, N, D)."""

    def __init__(self, dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        stages = int(math.log2(patch_size))
        widths = [min(32 * 2 ** i, dim) for i in range(stages - 1)] + [dim]
        layers: list[nn.Module] = []
        c_in = 3
        for w in widths:
            layers += [nn.Conv2d(c_in, w, 4, stride=2, padding=1), nn.GELU()]
            c_in = w
        self.convs = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.convs(x).flatten(2).transpose(1, 2)  # (B, N, D)


class _GridBlock(nn.Module):
    """A residual 3x3 convolution over the token grid: (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, t: Tensor) -> Tensor:
        b, n, d = t.shape
        g = math.isqrt(n)
        y = self.conv(t.transpose(1, 2).reshape(b, d, g, g)).flatten(2).transpose(1, 2)
        return t + nn.functional.gelu(y)


class ConvEncoder(nn.Module):
    """Strided conv stem + residual 3x3 blocks; tokens = the cells of the output map."""

    num_prefix_tokens = 0
    needs_full_grid = True  # its blocks convolve the grid: context masking keeps cells after

    def __init__(self, embed_dim: int = 64, patch_size: int = 8, depth: int = 1,
                 img_size: int = 64) -> None:
        super().__init__()
        if patch_size < 2 or patch_size & (patch_size - 1):
            raise ValueError(f"ConvEncoder: patch_size must be a power of two >= 2, "
                             f"got {patch_size}")
        self.embed_dim, self.img_size = embed_dim, img_size
        self.patch_embed = _Stem(embed_dim, patch_size)
        self.norm_pre = nn.Identity()
        self.blocks = nn.Sequential(*(_GridBlock(embed_dim) for _ in range(depth)))
        self.norm = nn.Identity()  # the latents are layer-normed downstream (normed_targets)

    def _pos_embed(self, t: Tensor) -> Tensor:
        return t  # a convolution's padding already tells the cells apart at the borders

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.blocks(self.patch_embed(x)))  # (B, N, D)


@register_model
def iwm_conv64(pretrained: bool = False, **kwargs: Any) -> ConvEncoder:
    """64 channels; patch 8 and one grid block unless told otherwise (no pretrained weights)."""
    if pretrained:
        raise ValueError("iwm_conv64 has no pretrained weights")
    return ConvEncoder(64, patch_size=kwargs.get("patch_size") or 8,
                       depth=kwargs.get("depth") or 1, img_size=kwargs.get("img_size", 64))
