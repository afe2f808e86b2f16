"""IWMConfig: everything needed to rebuild an IWM; it travels inside every checkpoint.

A variant is a name for a predictor depth (seed guide, "Model Variants"): ``core`` 8,
``invariant`` 4, ``equivariant`` 16. Any other depth is ``custom``; the config refuses a
named variant with another depth, so a checkpoint's variant always says what it holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import timm
import torch

from iwm_bus.actions import pad_cond
from iwm_bus.model import conv_encoder  # noqa: F401  (registers iwm_conv64 with timm)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "VARIANTS", "VARIANT_DEPTHS", "IWMConfig",
           "encoder_geometry", "pad_cond", "variant_for_depth"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Predictor depth of each named variant (seed guide, "Model Variants").
VARIANT_DEPTHS = {"core": 8, "invariant": 4, "equivariant": 16}
VARIANTS = (*VARIANT_DEPTHS, "custom")


def variant_for_depth(depth: int) -> str:
    """The variant name of a predictor depth: ``core``/``invariant``/``equivariant`` or ``custom``."""
    return next((name for name, d in VARIANT_DEPTHS.items() if d == depth), "custom")


@lru_cache(maxsize=32)
def encoder_geometry(name: str, patch_size: int | None = None, depth: int | None = None
                     ) -> tuple[int, int, int]:
    """``(embed_dim, patch_size, num_prefix_tokens)`` of a timm ViT, from a meta-device build."""
    kwargs = {k: v for k, v in (("patch_size", patch_size), ("depth", depth)) if v}
    with torch.device("meta"):
        enc = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    patch = enc.patch_embed.patch_size
    patch = patch[0] if isinstance(patch, tuple | list) else int(patch)
    return int(enc.embed_dim), int(patch), int(getattr(enc, "num_prefix_tokens", 1))


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"IWMConfig.{name} must be an int >= {minimum}, got {value!r}")


def _check_float(name: str, value: Any, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ValueError(f"IWMConfig.{name} must be a number in [{lo}, {hi}], got {value!r}")


@dataclass
class IWMConfig:
    """Everything needed to rebuild an :class:`~iwm_bus.model.IWM` (stored in every checkpoint)."""

    # variant name: core (8 predictor layers), invariant (4), equivariant (16) or custom
    variant: str = "core"
    # timm ViT name; always built with random weights (pretrained=False)
    encoder_name: str = "vit_base_patch16_224"
    # square size frames are resized to; a multiple of the encoder's patch size
    img_size: int = 224
    # encoder patch size override (None = the timm model's own, e.g. 16)
    patch_size: int | None = None
    # encoder depth override (None = the timm model's own, e.g. 12)
    encoder_depth: int | None = None
    # predictor transformer depth (number of blocks); must match a named variant
    pred_depth: int = 8
    # predictor width; a multiple of 4 (2-D sin-cos positions) and of pred_heads
    pred_dim: int = 384
    # predictor attention heads
    pred_heads: int = 6
    # predictor MLP hidden size / pred_dim
    pred_mlp_ratio: float = 4.0
    # length of the continuous action/augmentation vector (seed: [0.0] * 16); see pad_cond
    cond_dim: int = 16
    # number of discrete action ids (Phase 3); 0 = no action embedding
    num_actions: int = 0
    # independent predictor output heads; their spread is the prediction's uncertainty (>= 2)
    ensemble: int = 4
    # dropout in the predictor blocks (attention and projections) while training
    dropout: float = 0.0
    # the conditioning (action and vector) also enters every predictor block, added to its
    # tokens through a per-block projection, not only the mask tokens at the input
    action_every_layer: bool = False
    # a residual 3x3 convolution over the grid of target tokens (with the conditioning
    # concatenated) before every predictor block, where the targets are the whole frame (the
    # next-frame call): local motion (a sprite moved by the action) is a shift on the grid
    local_mix: bool = False
    # an inverse-dynamics head (ICM, Pathak et al. 2017): the action id from a frame's and the
    # next frame's latents (needs num_actions)
    inverse_dynamics: bool = False
    # init std of a new predictor's action table (ViT-style 0.02). An action then moves the
    # prediction ~1e-4 (1 - cos) where one state's outcomes lie ~6e-3 apart, and the
    # contrastive terms' gradient through it is as small; 1.0 starts it at the outcomes' scale
    action_init_std: float = 0.02
    # init std of the per-block conditioning projections (action_every_layer); 0 = zero, so a
    # loaded predictor without them is unchanged
    layer_cond_init_std: float = 0.0
    # EMA target-encoder momentum at step 0 (I-JEPA: 0.996)
    ema_momentum_start: float = 0.996
    # EMA momentum at the last training step (I-JEPA: 1.0)
    ema_momentum_end: float = 1.0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"IWMConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if not isinstance(self.encoder_name, str) or not timm.is_model(self.encoder_name):
            raise ValueError(f"IWMConfig.encoder_name {self.encoder_name!r} is not a timm model")
        for name, minimum in [("img_size", 1), ("pred_depth", 1), ("pred_dim", 4),
                              ("pred_heads", 1), ("cond_dim", 1), ("num_actions", 0),
                              ("ensemble", 2)]:
            _check_int(name, getattr(self, name), minimum)
        for name in ("patch_size", "encoder_depth"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        for name in ("action_every_layer", "local_mix", "inverse_dynamics"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"IWMConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.inverse_dynamics and not self.num_actions:
            raise ValueError("IWMConfig.inverse_dynamics needs num_actions > 0: the head "
                             "predicts a discrete action id")
        _check_float("pred_mlp_ratio", self.pred_mlp_ratio, 0.25, 64.0)
        _check_float("action_init_std", self.action_init_std, 0.0, 10.0)
        _check_float("layer_cond_init_std", self.layer_cond_init_std, 0.0, 1.0)
        _check_float("dropout", self.dropout, 0.0, 0.99)
        _check_float("ema_momentum_start", self.ema_momentum_start, 0.0, 1.0)
        _check_float("ema_momentum_end", self.ema_momentum_end, self.ema_momentum_start, 1.0)
        if self.pred_dim % 4 or self.pred_dim % self.pred_heads:
            raise ValueError(f"IWMConfig.pred_dim must be a multiple of 4 and of pred_heads="
                             f"{self.pred_heads}, got {self.pred_dim}")
        if self.variant != "custom" and VARIANT_DEPTHS[self.variant] != self.pred_depth:
            raise ValueError(
                f"IWMConfig.pred_depth={self.pred_depth} but variant {self.variant!r} means "
                f"{VARIANT_DEPTHS[self.variant]} predictor layers; use variant "
                f"{variant_for_depth(self.pred_depth)!r} for that depth")
        if self.img_size % self.effective_patch_size:
            raise ValueError(f"IWMConfig.img_size must be a multiple of the patch size "
                             f"{self.effective_patch_size} of {self.encoder_name}, "
                             f"got {self.img_size}")

    def _geometry(self) -> tuple[int, int, int]:
        return encoder_geometry(self.encoder_name, self.patch_size, self.encoder_depth)

    @property
    def embed_dim(self) -> int:
        """Latent width D of the encoder (192 ViT-Ti, 384 ViT-S, 768 ViT-B)."""
        return self._geometry()[0]

    @property
    def effective_patch_size(self) -> int:
        return self._geometry()[1]

    @property
    def grid(self) -> int:
        """Patches per side, ``img_size // patch size``."""
        return self.img_size // self._geometry()[1]

    @property
    def num_patches(self) -> int:
        """Patch latents per frame, N = grid ** 2 (196 at 224 / 16)."""
        return self.grid ** 2

    def encoder_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model`` beyond the name."""
        kw: dict[str, Any] = {"pretrained": False, "num_classes": 0, "img_size": self.img_size}
        if self.patch_size:
            kw["patch_size"] = self.patch_size
        if self.encoder_depth:
            kw["depth"] = self.encoder_depth
        return kw

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> IWMConfig:
        """Build from a dict (e.g. a checkpoint's); unknown keys raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown IWMConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**dict(d))
