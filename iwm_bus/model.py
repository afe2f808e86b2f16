"""The IWM world model: a timm ViT encoder and an action-conditioned transformer predictor.

This module and its helpers :mod:`iwm_bus.checkpoint` and :mod:`iwm_bus.cuda_graphs` are the
only ones of ``iwm_bus`` that import torch and timm; ``import iwm_bus`` stays torch-free.
The pieces:

- :class:`IWMConfig` - one validated dataclass; it travels inside every checkpoint.
- :class:`IWM` - ``encode(frames) -> (z_cls, patches)``, ``predict(z_cls, patches, cond,
  action_id) -> Prediction`` and ``rollout(...) -> Rollout``, all under
  ``torch.inference_mode`` (bf16 autocast and CUDA graphs on CUDA). Training uses the grad-enabled
  ``preprocess`` / ``encode_features`` / ``predict_heads`` and the EMA target encoder
  (``init_target_encoder`` + :class:`EMA`), which is only built when asked for.
- :func:`create_iwm_model` - the seed's variants: ``core`` (8 predictor layers), ``invariant``
  (4), ``equivariant`` (16); ``custom`` takes everything from overrides.
- :func:`save_checkpoint` / :func:`load_iwm` - config + weights + format version in a
  ``torch.save`` zip of plain tensors and containers, read back with ``weights_only=True``
  (defined in :mod:`iwm_bus.checkpoint`, re-exported here).

Uncertainty. The predictor ends in ``ensemble`` linear heads on a shared trunk. The
uncertainty of a prediction is the spread of the heads, measured in the same units as
:func:`iwm_bus.metrics.surprise`: each head's prediction is layer-normalised per token, and
the uncertainty is the RMS over heads, predicted tokens (CLS and patches) and dimensions of
the deviation from the heads' mean. It is 0 when the heads agree and about 1.4 when they are
uncorrelated. It only means something once the heads were trained each on its own loss
(their random inits differ, so they disagree where the data does not pin them down).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from iwm_bus.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    load_checkpoint,
    load_iwm,
    save_checkpoint,
)
from iwm_bus.cuda_graphs import GraphCache as _GraphCache

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "EMA",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IWM",
    "VARIANT_DEPTHS",
    "IWMConfig",
    "IWMPredictor",
    "Prediction",
    "Rollout",
    "create_iwm_model",
    "ema_momentum",
    "load_checkpoint",
    "load_iwm",
    "pad_cond",
    "save_checkpoint",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Predictor depth of each named variant (seed guide, "Model Variants").
VARIANT_DEPTHS = {"core": 8, "invariant": 4, "equivariant": 16}
VARIANTS = (*VARIANT_DEPTHS, "custom")

ArrayLike = Tensor | np.ndarray


@lru_cache(maxsize=32)
def encoder_geometry(name: str) -> tuple[int, int, int]:
    """``(embed_dim, patch_size, num_prefix_tokens)`` of a timm ViT, read from a meta-device build."""
    with torch.device("meta"):
        enc = timm.create_model(name, pretrained=False, num_classes=0)
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
    """Everything needed to rebuild an :class:`IWM` (stored in every checkpoint)."""

    # variant name: core (8 predictor layers), invariant (4), equivariant (16) or custom
    variant: str = "core"
    # timm ViT name; always built with random weights (pretrained=False)
    encoder_name: str = "vit_base_patch16_224"
    # square size frames are resized to; a multiple of the encoder's patch size
    img_size: int = 224
    # predictor transformer depth (number of blocks)
    pred_depth: int = 8
    # predictor width; a multiple of 4 (2-D sin-cos positions) and of pred_heads
    pred_dim: int = 384
    # predictor attention heads
    pred_heads: int = 6
    # predictor MLP hidden size / pred_dim
    pred_mlp_ratio: float = 4.0
    # length of the continuous action/augmentation vector (seed: [0.0] * 16); see pad_cond
    cond_dim: int = 16
    # number of discrete action tokens (Phase 3); 0 = no action embedding
    num_actions: int = 0
    # predictor output heads; their spread is the prediction's uncertainty (>= 2)
    ensemble: int = 4
    # dropout in the predictor blocks (attention and projections) while training
    dropout: float = 0.0
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
        _check_float("pred_mlp_ratio", self.pred_mlp_ratio, 0.25, 64.0)
        _check_float("dropout", self.dropout, 0.0, 0.99)
        _check_float("ema_momentum_start", self.ema_momentum_start, 0.0, 1.0)
        _check_float("ema_momentum_end", self.ema_momentum_end, self.ema_momentum_start, 1.0)
        if self.pred_dim % 4 or self.pred_dim % self.pred_heads:
            raise ValueError(f"IWMConfig.pred_dim must be a multiple of 4 and of pred_heads="
                             f"{self.pred_heads}, got {self.pred_dim}")
        if self.img_size % self.patch_size:
            raise ValueError(f"IWMConfig.img_size must be a multiple of the patch size "
                             f"{self.patch_size} of {self.encoder_name}, got {self.img_size}")

    @property
    def embed_dim(self) -> int:
        """Latent width D of the encoder (192 ViT-Ti, 384 ViT-S, 768 ViT-B)."""
        return encoder_geometry(self.encoder_name)[0]

    @property
    def patch_size(self) -> int:
        return encoder_geometry(self.encoder_name)[1]

    @property
    def num_patches(self) -> int:
        """Patch latents per frame, N = (img_size // patch_size) ** 2 (196 at 224 / 16)."""
        return (self.img_size // self.patch_size) ** 2

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


def pad_cond(vec: Any, cond_dim: int) -> np.ndarray:
    """Zero-pad an action/augmentation vector (or a batch of them, last axis) to ``cond_dim``.

    The seed sends short vectors such as ``[0.5, 0.3, 0.0]``; the model takes ``cond_dim``
    (default 16). Returns float32. A vector longer than ``cond_dim`` raises ValueError.
    """
    arr = np.asarray(vec, dtype=np.float32)
    if arr.ndim == 0:
        raise ValueError(f"cond must be a vector (or a batch of vectors), got a scalar {vec!r}")
    if arr.shape[-1] > cond_dim:
        raise ValueError(f"cond has length {arr.shape[-1]} but cond_dim is {cond_dim}; "
                         "the model cannot take a longer action vector")
    if not np.isfinite(arr).all():
        raise ValueError("cond holds NaN or inf")
    out = np.zeros((*arr.shape[:-1], cond_dim), dtype=np.float32)
    out[..., : arr.shape[-1]] = arr
    return out


class Prediction(NamedTuple):
    """One predicted step (float32, on the model's device)."""

    z_cls: Tensor  # (B, D)
    patches: Tensor | None  # (B, N, D), or None when predicted from CLS only
    uncertainty: Tensor  # (B,) ensemble spread, surprise units (see module docstring)


class Rollout(NamedTuple):
    """K autoregressive steps (float32, on the model's device)."""

    z_cls_seq: Tensor  # (B, K, D)
    patches_seq: Tensor | None  # (B, K, N, D)
    uncertainty_seq: Tensor  # (B, K)


# ----------------------------------------------------------------------------- EMA


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
        tgt = [p for p in self.target.parameters()]
        src = [p.detach() for p in self.source.parameters()]
        torch._foreach_lerp_(tgt, src, 1.0 - m)
        for bt, bs in zip(self.target.buffers(), self.source.buffers(), strict=True):
            bt.copy_(bs)
        self.step = step + 1
        return m

    def state_dict(self) -> dict[str, float | int]:
        return {"total_steps": self.total_steps, "start": self.start, "end": self.end,
                "step": self.step}

    def load_state_dict(self, state: Mapping[str, float | int]) -> None:
        self.total_steps = int(state["total_steps"])
        self.start, self.end = float(state["start"]), float(state["end"])
        self.step = int(state["step"])


# ----------------------------------------------------------------------------- predictor


def _sincos_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding, (grid * grid, dim), row-major like timm patches."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                            torch.arange(grid, dtype=torch.float64), indexing="ij")
    ax = xs.reshape(-1, 1) * omega  # (G*G, dim/4)
    ay = ys.reshape(-1, 1) * omega  # (G*G, dim/4)
    return torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], dim=1).float()


class IWMPredictor(nn.Module):
    """Transformer over [cond, (action), CLS, patches] tokens; predicts next-step latents.

    Latents (width D) are projected to ``pred_dim`` and given positions (a learned CLS
    position, fixed 2-D sin-cos for patches). The conditioning vector goes through a small
    MLP into one token; a discrete action id (``num_actions > 0``) adds one embedding token,
    index 0 meaning "no action". Each of the ``ensemble`` heads maps the trunk's output back
    to D and is added to the input latent (residual: an untrained model predicts ~identity).
    """

    def __init__(self, cfg: IWMConfig) -> None:
        super().__init__()
        d, p = cfg.embed_dim, cfg.pred_dim
        self.embed_dim, self.ensemble = d, cfg.ensemble
        self.in_proj = nn.Linear(d, p)
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, p))
        grid = cfg.img_size // cfg.patch_size
        self.register_buffer("patch_pos", _sincos_2d(p, grid)[None], persistent=False)
        self.cond_embed = nn.Sequential(nn.Linear(cfg.cond_dim, p), nn.GELU(), nn.Linear(p, p))
        self.action_embed = nn.Embedding(cfg.num_actions + 1, p) if cfg.num_actions else None
        self.n_ctx = 1 + (1 if cfg.num_actions else 0)
        self.blocks = nn.ModuleList(
            Block(p, cfg.pred_heads, mlp_ratio=cfg.pred_mlp_ratio, qkv_bias=True,
                  proj_drop=cfg.dropout, attn_drop=cfg.dropout)
            for _ in range(cfg.pred_depth))
        self.norm = nn.LayerNorm(p, eps=1e-6)
        self.head = nn.Linear(p, cfg.ensemble * d)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.cls_pos, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=0.02)
        for i, blk in enumerate(self.blocks, start=1):  # I-JEPA fix_init_weight
            blk.attn.proj.weight.data.div_(math.sqrt(2.0 * i))
            blk.mlp.fc2.weight.data.div_(math.sqrt(2.0 * i))

    def forward(self, z_cls: Tensor, patches: Tensor | None, cond: Tensor,
                action_id: Tensor | None) -> Tensor:
        """Per-head predictions, (E, B, T, D) with T = 1 (+ N when patches are given)."""
        b = z_cls.shape[0]
        lat = z_cls[:, None] if patches is None else torch.cat([z_cls[:, None], patches], 1)
        x = self.in_proj(lat)  # (B, T, P)
        pos = self.cls_pos if patches is None else torch.cat([self.cls_pos, self.patch_pos], 1)
        x = x + pos  # (B, T, P)
        ctx = [self.cond_embed(cond)[:, None]]  # [(B, 1, P)]
        if self.action_embed is not None:
            ids = action_id if action_id is not None else z_cls.new_full((b,), -1, dtype=torch.long)
            ctx.append(self.action_embed(ids + 1)[:, None])  # (B, 1, P)
        x = torch.cat([*ctx, x], 1)  # (B, C + T, P)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x[:, self.n_ctx:])  # (B, T, P)
        t = x.shape[1]
        out = self.head(x).view(b, t, self.ensemble, self.embed_dim)  # (B, T, E, D)
        return lat.unsqueeze(0) + out.permute(2, 0, 1, 3)  # (E, B, T, D)


def ensemble_spread(heads: Tensor) -> Tensor:
    """Uncertainty from per-head predictions (E, B, T, D) -> (B,), in surprise units."""
    ln = F.layer_norm(heads.float(), heads.shape[-1:], eps=1e-6)  # (E, B, T, D)
    dev = ln - ln.mean(0, keepdim=True)  # (E, B, T, D)
    return dev.square().mean(dim=(0, 2, 3)).sqrt()  # (B,)


# ----------------------------------------------------------------------------- model


class IWM(nn.Module):
    """Image world model: timm ViT encoder + action-conditioned ensemble predictor.

    Inference (``encode``, ``predict``, ``rollout``) runs under ``torch.inference_mode`` and
    returns float32 tensors on the model's device. Call ``eval()`` first (models from
    :func:`create_iwm_model` and :func:`load_iwm` already are). On CUDA:

    - ``amp``: bf16 autocast (weights stay float32).
    - ``cuda_graphs``: in eval mode, each input signature (batch size, frame size, with or
      without patches/actions) is captured once as a CUDA graph and replayed afterwards (the
      first call of a new shape is slower; up to 8 graphs per function are kept). At batch 1
      this removes the kernel-launch cost that otherwise dominates. ``.to()`` drops them.
    - ``compile``: ``torch.compile`` of the encoder and predictor instead of graphs.

    A model is used by one thread at a time (graphs replay into shared static buffers).
    """

    def __init__(self, config: IWMConfig | None = None, *, compile: bool = False,
                 amp: bool = True, cuda_graphs: bool = True) -> None:
        super().__init__()
        self.config = cfg = config or IWMConfig()
        self.embed_dim, self.num_patches = cfg.embed_dim, cfg.num_patches
        self._amp, self.compiled, self.cuda_graphs = amp, compile, cuda_graphs
        self.encoder = timm.create_model(cfg.encoder_name, pretrained=False, num_classes=0,
                                         img_size=cfg.img_size)
        self.predictor = IWMPredictor(cfg)
        self.target_encoder: nn.Module | None = None  # built by init_target_encoder()
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("pix_scale", (1.0 / (255.0 * std)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pix_shift", (-mean / std).view(1, 3, 1, 1), persistent=False)
        # Plain attributes (not submodules), so the state dict holds each weight once.
        encode_fn, predict_fn = self.encode_features, self.predictor
        if compile:
            encode_fn, predict_fn = torch.compile(encode_fn), torch.compile(predict_fn)
        object.__setattr__(self, "_encode_fn", encode_fn)
        object.__setattr__(self, "_predict_fn", predict_fn)
        self._encode_graphs = _GraphCache(self._encode_device)
        self._step_graphs = _GraphCache(self._step_device)

    # -- properties and helpers

    @property
    def device(self) -> torch.device:
        return self.pix_scale.device

    @property
    def amp(self) -> bool:
        """bf16 autocast on CUDA; setting it drops captured CUDA graphs."""
        return self._amp

    @amp.setter
    def amp(self, value: bool) -> None:
        self._amp = bool(value)
        self.clear_cuda_graphs()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp and self.device.type == "cuda":  # no weight-cast cache: graph-capture safe
            return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()

    def _use_graphs(self) -> bool:
        return (self.cuda_graphs and not self.compiled and not self.training
                and self.device.type == "cuda")

    def clear_cuda_graphs(self) -> None:
        """Drop captured CUDA graphs (done automatically by ``.to()``/``.cuda()``/...)."""
        self._encode_graphs.clear()
        self._step_graphs.clear()

    def _apply(self, *args: Any, **kwargs: Any) -> IWM:
        self.clear_cuda_graphs()  # graphs hold the old parameter addresses
        return super()._apply(*args, **kwargs)

    def num_params(self) -> dict[str, int]:
        """Parameter counts: encoder, predictor (and target encoder when built)."""
        parts = {"encoder": self.encoder, "predictor": self.predictor}
        if self.target_encoder is not None:
            parts["target_encoder"] = self.target_encoder
        return {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}

    def describe(self) -> dict[str, Any]:
        """Plain-data summary for health replies and logs."""
        return {"config": self.config.to_dict(), "embed_dim": self.embed_dim,
                "num_patches": self.num_patches, "params": self.num_params(),
                "device": str(self.device), "amp": self.amp, "compiled": self.compiled,
                "cuda_graphs": self._use_graphs()}

    # -- training: target encoder

    def init_target_encoder(self) -> nn.Module:
        """Build (once) the EMA target encoder as a frozen copy of the encoder."""
        if self.target_encoder is None:
            self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        return self.target_encoder

    def make_ema(self, total_steps: int) -> EMA:
        """EMA from the encoder into the target encoder with the config's momentum schedule."""
        return EMA(self.encoder, self.init_target_encoder(), total_steps,
                   self.config.ema_momentum_start, self.config.ema_momentum_end)

    # -- encoder

    def preprocess(self, frames: ArrayLike) -> Tensor:
        """uint8 (H, W, 3) or (B, H, W, 3) frames -> normalised float32 (B, 3, S, S) on device.

        Resizes (bilinear, antialiased; aspect ratio is not kept) to ``img_size`` and applies
        the ImageNet mean/std, on the model's device.
        """
        return self._normalise(self._check_frames(frames).to(self.device, non_blocking=True))

    @staticmethod
    def _check_frames(frames: ArrayLike) -> Tensor:
        """Validated uint8 (B, H, W, 3) tensor, still where the caller had it."""
        if isinstance(frames, np.ndarray):
            if not frames.flags.writeable:  # e.g. decoded straight from a wire buffer
                frames = frames.copy()
            frames = torch.from_numpy(np.ascontiguousarray(frames))
        elif not isinstance(frames, Tensor):
            raise ValueError(f"frames must be a numpy array or torch tensor, got {type(frames)}")
        if frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8 RGB pixels, got dtype {frames.dtype}")
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
            raise ValueError("frames must be (H, W, 3) or (B, H, W, 3) RGB with 3 channels last, "
                             f"got shape {tuple(frames.shape)}")
        return frames

    def _normalise(self, frames: Tensor) -> Tensor:
        """uint8 (B, H, W, 3) on device -> resized, normalised float32 (B, 3, S, S)."""
        s = self.config.img_size
        x = frames.permute(0, 3, 1, 2).float()  # (B, 3, H, W)
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True,
                              align_corners=False)  # (B, 3, S, S)
        x = x * self.pix_scale + self.pix_shift
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def encode_features(self, x: Tensor, target: bool = False) -> tuple[Tensor, Tensor]:
        """Grad-enabled encoder on preprocessed images (B, 3, S, S) -> (B, D), (B, N, D)."""
        enc = self.encoder
        if target:
            enc = self.target_encoder
            if enc is None:
                raise RuntimeError("no target encoder: call init_target_encoder() first")
        tokens = enc.forward_features(x)  # (B, prefix + N, D)
        patches = tokens[:, enc.num_prefix_tokens:]  # (B, N, D)
        z_cls = tokens[:, 0] if enc.num_prefix_tokens else patches.mean(1)  # (B, D)
        return z_cls, patches

    @torch.inference_mode()
    def encode(self, frames: ArrayLike) -> tuple[Tensor, Tensor]:
        """Frames (uint8, (H, W, 3) or (B, H, W, 3), any size) -> z_cls (B, D), patches (B, N, D)."""
        u8 = self._check_frames(frames)  # (B, H, W, 3)
        if self._use_graphs():
            return self._encode_graphs(self.device, u8)
        return self._encode_device(u8.to(self.device, non_blocking=True))

    def _encode_device(self, u8: Tensor) -> tuple[Tensor, Tensor]:
        """Encode uint8 frames already on the device (graph-capturable)."""
        x = self._normalise(u8)  # (B, 3, S, S)
        with self._autocast():
            z_cls, patches = self._encode_fn(x)
        return z_cls.float(), patches.float()

    # -- predictor

    def predict_heads(self, z_cls: Tensor, patches: Tensor | None = None,
                      cond: Tensor | None = None, action_id: Tensor | None = None) -> Tensor:
        """Grad-enabled per-head predictions (E, B, T, D) for training (checked inputs)."""
        z, p, c, a = self._check_step_inputs(z_cls, patches, cond, action_id)
        return self.predictor(z, p, c, a)

    def _step(self, z: Tensor, p: Tensor | None, c: Tensor, a: Tensor | None) -> Prediction:
        if self._use_graphs():
            return Prediction(*self._step_graphs(self.device, z, p, c, a))
        return Prediction(*self._step_device(z, p, c, a))

    def _step_device(self, z: Tensor, p: Tensor | None, c: Tensor, a: Tensor | None
                     ) -> tuple[Tensor, Tensor | None, Tensor]:
        """One checked predictor step on the device (graph-capturable)."""
        with self._autocast():
            heads = self._predict_fn(z, p, c, a)  # (E, B, T, D)
        heads = heads.float()
        mean = heads.mean(0)  # (B, T, D)
        return mean[:, 0], mean[:, 1:] if p is not None else None, ensemble_spread(heads)

    @torch.inference_mode()
    def predict(self, z_cls: ArrayLike, patches: ArrayLike | None = None,
                cond: ArrayLike | None = None, action_id: ArrayLike | None = None) -> Prediction:
        """Next-step latents from z_cls (B, D), optional patches (B, N, D), cond (B, cond_dim)
        (None = zeros) and action_id (B,) (-1 = no action; None = none)."""
        return self._step(*self._check_step_inputs(z_cls, patches, cond, action_id))

    @torch.inference_mode()
    def rollout(self, z_cls: ArrayLike, patches: ArrayLike | None = None,
                cond_seq: ArrayLike | None = None, action_seq: ArrayLike | None = None) -> Rollout:
        """K autoregressive steps from z_cls (B or 1, D) [+ patches (B or 1, N, D)].

        ``cond_seq`` (B, K, cond_dim) and/or ``action_seq`` (B, K) give the steps; a start
        state with batch 1 is shared by all B candidate sequences. Each step feeds the
        ensemble-mean prediction back in, so K steps equal K chained :meth:`predict` calls.
        """
        z, p, cs, acts = self._check_rollout_inputs(z_cls, patches, cond_seq, action_seq)
        zs, ps, us = [], [], []
        for k in range(cs.shape[1]):
            a = acts[:, k].contiguous() if acts is not None else None
            pred = self._step(z, p, cs[:, k].contiguous(), a)
            z, p = pred.z_cls, pred.patches
            zs.append(z)
            ps.append(p)
            us.append(pred.uncertainty)
        return Rollout(torch.stack(zs, 1), torch.stack(ps, 1) if p is not None else None,
                       torch.stack(us, 1))

    # -- input checks

    def _as_float(self, x: ArrayLike, name: str) -> Tensor:
        if not isinstance(x, Tensor | np.ndarray | list | tuple):
            raise ValueError(f"{name} must be an array or tensor, got {type(x).__name__}")
        t = torch.as_tensor(x)
        if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"{name} must be a float array, got dtype {t.dtype}")
        return t.to(self.device, torch.float32).contiguous()

    def _check_latents(self, z_cls: ArrayLike, patches: ArrayLike | None
                       ) -> tuple[Tensor, Tensor | None]:
        d, n = self.embed_dim, self.num_patches
        z = self._as_float(z_cls, "z_cls")
        z = z[None] if z.ndim == 1 else z
        if z.ndim != 2 or z.shape[1] != d:
            raise ValueError(f"z_cls must be (B, {d}), got shape {tuple(z.shape)}")
        if patches is None:
            return z, None
        p = self._as_float(patches, "patches")
        p = p[None] if p.ndim == 2 else p
        if p.ndim != 3 or p.shape[1:] != (n, d) or p.shape[0] != z.shape[0]:
            raise ValueError(f"patches must be ({z.shape[0]}, {n}, {d}) to match z_cls, "
                             f"got shape {tuple(p.shape)}")
        return z, p

    def _check_cond(self, cond: ArrayLike | None, lead: tuple[int, ...]) -> Tensor:
        cd = self.config.cond_dim
        if cond is None:
            return torch.zeros(*lead, cd, device=self.device)
        c = self._as_float(cond, "cond")
        if c.shape[-1:] != (cd,):
            raise ValueError(f"cond has length {tuple(c.shape)[-1:]} but the model expects "
                             f"cond_dim={cd}; zero-pad shorter vectors with pad_cond")
        if c.ndim == 1:
            c = c.expand(*lead, cd)
        if tuple(c.shape) != (*lead, cd):
            raise ValueError(f"cond must be {(*lead, cd)}, got shape {tuple(c.shape)}")
        return c.contiguous()

    def _check_actions(self, action_id: ArrayLike | None, lead: tuple[int, ...]) -> Tensor | None:
        na = self.config.num_actions
        if action_id is None:
            return None
        a = torch.as_tensor(action_id)
        if a.is_floating_point() or a.dtype == torch.bool:
            raise ValueError(f"action ids must be integers, got dtype {a.dtype}")
        if a.ndim == 0:
            a = a.expand(*lead)
        if tuple(a.shape) != lead:
            raise ValueError(f"action ids must have shape {lead}, got {tuple(a.shape)}")
        lo, hi = int(a.min()), int(a.max())  # on the caller's device (usually the CPU)
        if lo < -1 or hi >= na:
            raise ValueError(f"action ids must be in [-1, {na - 1}] (num_actions={na}), "
                             f"got values in [{lo}, {hi}]")
        return a.to(self.device, torch.long).contiguous() if na else None

    def _check_step_inputs(self, z_cls: ArrayLike, patches: ArrayLike | None,
                           cond: ArrayLike | None, action_id: ArrayLike | None
                           ) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        z, p = self._check_latents(z_cls, patches)
        lead = (z.shape[0],)
        return z, p, self._check_cond(cond, lead), self._check_actions(action_id, lead)

    def _check_rollout_inputs(self, z_cls: ArrayLike, patches: ArrayLike | None,
                              cond_seq: ArrayLike | None, action_seq: ArrayLike | None
                              ) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        if cond_seq is None and action_seq is None:
            raise ValueError("rollout needs cond_seq (B, K, cond_dim) and/or action_seq (B, K)")
        z, p = self._check_latents(z_cls, patches)
        seq = cond_seq if cond_seq is not None else action_seq
        shape = tuple(torch.as_tensor(seq).shape)
        if len(shape) < 2:
            raise ValueError(f"cond_seq/action_seq must be batched over (B, K, ...), got {shape}")
        lead = shape[:2]  # (B, K)
        if z.shape[0] not in (1, lead[0]):
            raise ValueError(f"start state batch {z.shape[0]} must be 1 or match the {lead[0]} "
                             "sequences")
        z = z.expand(lead[0], -1).contiguous()  # (B, D)
        if p is not None:
            p = p.expand(lead[0], -1, -1).contiguous()  # (B, N, D)
        return z, p, self._check_cond(cond_seq, lead), self._check_actions(action_seq, lead)


def create_iwm_model(variant: str = "core", *, device: str | torch.device = "cpu",
                     seed: int | None = None, compile: bool = False, amp: bool = True,
                     cuda_graphs: bool = True, **overrides: Any) -> IWM:
    """Build an IWM in eval mode: ``core`` (8 predictor layers), ``invariant`` (4),
    ``equivariant`` (16) or ``custom``; ``overrides`` are IWMConfig fields.

    ``seed`` makes the random init reproducible without touching the global RNG.
    """
    fields = {"variant": variant, "pred_depth": VARIANT_DEPTHS.get(variant, 8), **overrides}
    cfg = IWMConfig.from_dict(fields)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = IWM(cfg, compile=compile, amp=amp, cuda_graphs=cuda_graphs)
    return model.to(device).eval()
