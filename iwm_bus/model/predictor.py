"""The IWM predictor: context tokens + mask tokens at target positions -> latents at the targets.

After I-JEPA's ``VisionTransformerPredictor``: context latents are projected to ``pred_dim``
and given the position they came from; one mask token per target position carries that
position, the conditioning and (for the next-frame call) the latent that was at that
position. A transformer runs over both; only the mask tokens' outputs are read, through
``ensemble`` independent MLP heads. Conditioning is "feature conditioning" (IWM, Garrido et
al. 2024): the embedded augmentation/action vector and the discrete action token are added
to every mask token; with ``action_every_layer`` a per-block projection of the same
conditioning is also added to the tokens before each block, so the action cannot fade out
of a deep stack (as DiT's per-block adaLN conditioning, Peebles & Xie 2023, and the
contrastive world models that feed the action to every layer). With a ``prior`` (the next-frame call) the heads predict the change of
each position's latent (output = prior + head), so training starts from copy-last and spends
its capacity on what moves; without one they predict the latent itself.

Positions are patch indices ``0..N-1`` with fixed 2-D sin-cos embeddings; index ``-1`` is
the *global* position, used when the context is only a frame's global latent (``z_cls``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from iwm_bus.model.config import IWMConfig

__all__ = ["IWMPredictor", "ensemble_spread", "sincos_2d"]


def sincos_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding, (grid * grid, dim), row-major like timm patches."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                            torch.arange(grid, dtype=torch.float64), indexing="ij")
    ax = xs.reshape(-1, 1) * omega  # (G*G, dim/4)
    ay = ys.reshape(-1, 1) * omega  # (G*G, dim/4)
    return torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], dim=1).float()


class IWMPredictor(nn.Module):
    """``forward(ctx, ctx_idx, tgt_idx, cond, action_id, prior) -> (E, B, T, D)``."""

    def __init__(self, cfg: IWMConfig) -> None:
        super().__init__()
        d, p = cfg.embed_dim, cfg.pred_dim
        self.embed_dim, self.ensemble, self.num_patches = d, cfg.ensemble, cfg.num_patches
        self.in_proj = nn.Linear(d, p)
        self.prior_proj = nn.Linear(d, p)
        self.register_buffer("patch_pos", sincos_2d(p, cfg.grid), persistent=False)  # (N, P)
        self.global_pos = nn.Parameter(torch.zeros(1, p))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, p))
        self.cond_embed = nn.Sequential(nn.Linear(cfg.cond_dim, p), nn.GELU(), nn.Linear(p, p))
        self.action_embed = nn.Embedding(cfg.num_actions + 1, p) if cfg.num_actions else None
        self.action_init_std, self.layer_cond_init_std = cfg.action_init_std, cfg.layer_cond_init_std
        self.blocks = nn.ModuleList(
            Block(p, cfg.pred_heads, mlp_ratio=cfg.pred_mlp_ratio, qkv_bias=True,
                  proj_drop=cfg.dropout, attn_drop=cfg.dropout)
            for _ in range(cfg.pred_depth))
        # per-block conditioning (zero at init by default: a predictor loaded without it is
        # unchanged)
        self.layer_cond = nn.ModuleList(nn.Linear(p, p) for _ in range(cfg.pred_depth)) \
            if cfg.action_every_layer else None
        self.grid = cfg.grid
        self.local = nn.ModuleList(LocalMix(p) for _ in range(cfg.pred_depth)) \
            if cfg.local_mix else None
        self.norm = nn.LayerNorm(p, eps=1e-6)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(p, p), nn.GELU(), nn.Linear(p, d))
            for _ in range(cfg.ensemble))
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.global_pos, std=0.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=0.02)
        if self.action_embed is not None and self.action_init_std != 0.02:
            s = self.action_init_std
            if s:
                nn.init.trunc_normal_(self.action_embed.weight, std=s, a=-2 * s, b=2 * s)
            else:
                nn.init.zeros_(self.action_embed.weight)
        for i, blk in enumerate(self.blocks, start=1):  # I-JEPA fix_init_weight
            blk.attn.proj.weight.data.div_(math.sqrt(2.0 * i))
            blk.mlp.fc2.weight.data.div_(math.sqrt(2.0 * i))
        for lin in self.layer_cond or ():
            if self.layer_cond_init_std:
                nn.init.normal_(lin.weight, std=self.layer_cond_init_std)
            else:
                nn.init.zeros_(lin.weight)
        for mix in self.local or ():
            nn.init.zeros_(mix.out.weight)
            nn.init.zeros_(mix.out.bias)

    def positions(self, idx: Tensor) -> Tensor:
        """Position embeddings of indices ``idx`` (B, K) in [-1, N) -> (B, K, P)."""
        table = torch.cat([self.patch_pos, self.global_pos], 0)  # (N + 1, P); row N = global
        return table[idx.remainder(self.num_patches + 1)]  # -1 -> N

    def condition(self, cond: Tensor, action_id: Tensor | None) -> Tensor:
        """The conditioning added to every mask token: (B, P)."""
        c = self.cond_embed(cond)  # (B, P)
        if self.action_embed is not None:
            ids = action_id if action_id is not None else cond.new_full(
                cond.shape[:1], -1, dtype=torch.long)
            c = c + self.action_embed(ids + 1)  # id -1 (none) -> row 0
        return c

    def forward(self, ctx: Tensor, ctx_idx: Tensor, tgt_idx: Tensor, cond: Tensor,
                action_id: Tensor | None = None, prior: Tensor | None = None) -> Tensor:
        """Per-head predictions at the target positions.

        ctx (B, C, D) latents at ``ctx_idx`` (B, C); ``tgt_idx`` (B, T); cond (B, cond_dim);
        action_id (B,) long (-1 = none) or None; ``prior`` (B, T, D): the latent known at each
        target position (the current frame's, for next-frame prediction) or None.
        Returns (E, B, T, D).
        """
        c = ctx.shape[1]
        x = self.in_proj(ctx) + self.positions(ctx_idx)  # (B, C, P)
        cvec = self.condition(cond, action_id)  # (B, P)
        m = self.mask_token + self.positions(tgt_idx) + cvec[:, None]  # (B, T, P)
        if prior is not None:
            m = m + self.prior_proj(prior)  # (B, T, P)
        h = torch.cat([x, m], 1)  # (B, C + T, P)
        grid_targets = self.local is not None and tgt_idx.shape[1] == self.num_patches
        for i, blk in enumerate(self.blocks):
            if self.layer_cond is not None:
                h = h + self.layer_cond[i](cvec)[:, None]  # (B, C + T, P)
            if grid_targets:  # targets are the whole frame in order (the next-frame call)
                h = torch.cat([h[:, :c], self.local[i](h[:, c:], cvec, self.grid)], 1)
            h = blk(h)
        h = self.norm(h[:, c:])  # (B, T, P)
        out = torch.stack([head(h) for head in self.heads])  # (E, B, T, D)
        # Where the latent at a target position is known (the next-frame call), the heads
        # predict its change; elsewhere (masked positions, the global-latent call) the
        # latent itself. An untrained predictor thus starts at copy-last for the next frame
        # and still predicts positions absent from the context.
        return out + prior[None] if prior is not None else out


class LocalMix(nn.Module):
    """A residual 3x3 convolution over the token grid, the conditioning concatenated at every
    position (as the contrastive world models feed the action to each conv layer):
    ``forward(x (B, G*G, P), cond (B, P), grid) -> (B, G*G, P)``; zero at init."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2 * dim, dim, 3, padding=1)
        self.out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, cond: Tensor, grid: int) -> Tensor:
        b, n, p = x.shape
        g = x.transpose(1, 2).reshape(b, p, grid, grid)  # (B, P, G, G)
        c = cond[:, :, None, None].expand(-1, -1, grid, grid)  # (B, P, G, G)
        y = self.out(F.gelu(self.conv(torch.cat([g, c], 1))))  # (B, P, G, G)
        return x + y.flatten(2).transpose(1, 2)  # (B, N, P)


def ensemble_spread(heads: Tensor) -> Tensor:
    """Uncertainty from per-head predictions (E, B, T, D) -> (B,), in surprise units.

    Each head's tokens are layer-normalised; the spread is the RMS over heads, tokens and
    dimensions of the deviation from the heads' mean: 0 when the heads agree, ~1.4 when
    they are unrelated.
    """
    ln = F.layer_norm(heads.float(), heads.shape[-1:], eps=1e-6)  # (E, B, T, D)
    dev = ln - ln.mean(0, keepdim=True)  # (E, B, T, D)
    return dev.square().mean(dim=(0, 2, 3)).sqrt()  # (B,)
