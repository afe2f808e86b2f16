"""The IWM world model: a timm ViT encoder, an EMA target and a masked-token predictor.

Inference (``encode``, ``predict``, ``rollout``) runs under ``torch.no_grad`` and returns
float32 tensors on the model's device (ordinary tensors: they may be used in a later
autograd graph). Training calls the module: ``IWM.forward(batch, objective) -> losses``
(:mod:`iwm_bus.model.objective`), so ``DistributedDataParallel`` wraps it.

Latents. ``encode`` gives a frame's patch latents (B, N, D), the ViT's output tokens
layer-normed without affine (the space the predictor is trained in), and its global latent
``z_cls`` (B, D) = the mean of the patch latents. A prediction is made at every patch
position and its ``z_cls`` is the mean of the predicted patches: observed and predicted
global latents are made the same way, from what training trained.

Uncertainty. ``ensemble`` independent MLP heads end the predictor, each trained on its own
bootstrap resample of every batch; the uncertainty of a prediction is their spread
(:func:`~iwm_bus.model.predictor.ensemble_spread`, surprise units).

On CUDA: ``amp`` bf16 autocast; ``cuda_graphs`` replays one captured graph per input
signature at inference; ``compile`` uses ``torch.compile`` instead.
A model is used by one thread at a time (graphs replay into shared static buffers).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, NamedTuple

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iwm_bus.model.action_terms import action_loss
from iwm_bus.model.config import IMAGENET_MEAN, IMAGENET_STD, IWMConfig
from iwm_bus.model.cuda_graphs import GraphCache
from iwm_bus.model.ema import EMA
from iwm_bus.model.encoder import global_latent, normed_targets, vit_patch_tokens
from iwm_bus.model.inputs import (
    ArrayLike,
    check_frames,
    check_rollout_inputs,
    check_step_inputs,
)
from iwm_bus.model.inverse import InverseDynamics
from iwm_bus.model.objective import Objective, dynamics_loss, views_loss
from iwm_bus.model.predictor import IWMPredictor, ensemble_spread
from iwm_bus.provenance import checkpoint_summary

__all__ = ["IWM", "Prediction", "Rollout"]


class Prediction(NamedTuple):
    """One predicted step (float32, on the model's device)."""

    z_cls: Tensor  # (B, D): mean of the predicted patches
    patches: Tensor | None  # (B, N, D), or None when predicted from z_cls alone
    uncertainty: Tensor  # (B,) ensemble spread, surprise units


class Rollout(NamedTuple):
    """K autoregressive steps (float32, on the model's device)."""

    z_cls_seq: Tensor  # (B, K, D)
    patches_seq: Tensor | None  # (B, K, N, D)
    uncertainty_seq: Tensor  # (B, K)


def _count_params(module: nn.Module) -> int:
    """Parameters of ``module``, counting the packed weights of int8 (dynamically quantised)
    linear layers, which are not parameters."""
    n = sum(p.numel() for p in module.parameters())
    for m in module.modules():
        if callable(getattr(m, "weight", None)):  # quantised Linear: weight() / bias()
            bias = m.bias()
            n += m.weight().numel() + (bias.numel() if bias is not None else 0)
    return n


class IWM(nn.Module):
    """Image world model: timm ViT encoder + conditioned masked-token ensemble predictor."""

    def __init__(self, config: IWMConfig | None = None, *, compile: bool = False,
                 amp: bool = True, cuda_graphs: bool = True) -> None:
        super().__init__()
        self.config = cfg = config or IWMConfig()
        self.embed_dim, self.num_patches = cfg.embed_dim, cfg.num_patches
        self._amp, self.compiled, self.cuda_graphs = amp, compile, cuda_graphs
        # the inference precision (:func:`~iwm_bus.model.precision.set_precision`)
        self.precision = "auto"
        self.encoder = timm.create_model(cfg.encoder_name, **cfg.encoder_kwargs())
        self.predictor = IWMPredictor(cfg)
        self.inverse = InverseDynamics(cfg.embed_dim, cfg.num_actions) \
            if cfg.inverse_dynamics else None
        self.target_encoder: nn.Module | None = None  # built by init_target_encoder()
        # where the weights came from (set by load_iwm; None = random init)
        self.provenance: dict[str, Any] | None = None
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("pix_scale", (1.0 / (255.0 * std)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pix_shift", (-mean / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("all_idx", torch.arange(cfg.num_patches)[None], persistent=False)
        # Plain attributes (not submodules), so the state dict holds each weight once.
        encode_fn, predict_fn = self.encode_features, self.predictor
        if compile:
            encode_fn, predict_fn = torch.compile(encode_fn), torch.compile(predict_fn)
        object.__setattr__(self, "_encode_fn", encode_fn)
        object.__setattr__(self, "_predict_fn", predict_fn)
        self._encode_graphs = GraphCache(self._encode_device)
        self._step_graphs = GraphCache(self._step_device)

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

    @property
    def cpu_amp(self) -> bool:
        """bf16 autocast on a CPU too (precision ``bf16``)."""
        return self.precision == "bf16"

    def inference_autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context inference runs in (bf16 per :attr:`amp` / :attr:`cpu_amp`,
        or none); code that calls the encoder or predictor modules directly (iwm-eval) runs
        them in it too."""
        if self.amp and self.device.type == "cuda":  # no weight-cast cache: graph-capture safe
            return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
        if self.cpu_amp and self.device.type == "cpu":
            return torch.autocast("cpu", dtype=torch.bfloat16)
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
        if self.inverse is not None:
            parts["inverse"] = self.inverse
        if self.target_encoder is not None:
            parts["target_encoder"] = self.target_encoder
        return {k: _count_params(m) for k, m in parts.items()}

    def describe(self) -> dict[str, Any]:
        """Plain-data summary for health replies and logs."""
        return {"config": self.config.to_dict(),
                "checkpoint": checkpoint_summary(self.provenance),  # flat: fits the wire
                "embed_dim": self.embed_dim,
                "num_patches": self.num_patches, "params": self.num_params(),
                "device": str(self.device), "amp": self.amp, "precision": self.precision,
                "compiled": self.compiled,
                "cuda_graphs": self._use_graphs()}

    # -- training

    def init_target_encoder(self) -> nn.Module:
        """Build (once) the EMA target encoder as a frozen copy of the encoder."""
        if self.target_encoder is None:
            self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        return self.target_encoder

    def make_ema(self, total_steps: int) -> EMA:
        """EMA from the encoder into the target encoder with the config's momentum schedule."""
        return EMA(self.encoder, self.init_target_encoder(), total_steps,
                   self.config.ema_momentum_start, self.config.ema_momentum_end)

    def forward(self, batch: dict[str, Tensor], objective: Objective | None = None
                ) -> dict[str, Tensor]:
        """Training losses of a batch (views: Phase 1; frames: Phase 3); ``"loss"`` is the total.

        Images in the batch are preprocessed float (B, [K+1,] 3, S, S) (see :meth:`preprocess`).
        """
        if self.precision == "int8":
            raise RuntimeError("an int8 model is for inference only; train a float one")
        obj = objective or Objective()
        if "seq_frames" in batch:
            return action_loss(self, batch, obj)
        if "frames" in batch:
            out = dynamics_loss(self, batch, obj)
            if "views" in batch and obj.views_weight:
                views = views_loss(self, batch["views"], obj)
                out["views_pred"] = views["pred"]
                if "nce" in views:
                    out["views_nce"] = views["nce"]
                out["loss"] = out["loss"] + obj.views_weight * views["loss"]
            return out
        if "src" in batch:
            return views_loss(self, batch, obj)
        raise ValueError(f"batch must hold 'frames' (Phase 3), 'seq_frames' (action terms) "
                         f"or 'src'/'tgt' (Phase 1), got keys {sorted(batch)}")

    # -- encoder

    def preprocess(self, frames: ArrayLike) -> Tensor:
        """uint8 (H, W, 3) or (B, H, W, 3) frames -> normalised float32 (B, 3, S, S) on device.

        Resizes (bilinear, antialiased; aspect ratio is not kept) to ``img_size`` and applies
        the ImageNet mean/std, on the model's device.
        """
        return self._normalise(check_frames(frames).to(self.device, non_blocking=True))

    def normalise_unit(self, x: Tensor) -> Tensor:
        """Float images in [0, 1] (B, 3, S, S) (augmented views) -> the encoder's input,
        on the model's device: the same mean/std as :meth:`preprocess`."""
        return x.to(self.device) * (self.pix_scale * 255.0) + self.pix_shift

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

    def encode_features(self, x: Tensor, target: bool = False, keep: Tensor | None = None,
                        checkpointing: bool = False) -> Tensor:
        """Grad-enabled patch latents (B, N or K, D) of preprocessed images (B, 3, S, S).

        ``target``: use the EMA target encoder; ``keep`` (B, K): encode only those patches.
        """
        enc = self.encoder
        if target:
            enc = self.target_encoder
            if enc is None:
                raise RuntimeError("no target encoder: call init_target_encoder() first")
        return normed_targets(vit_patch_tokens(enc, x, keep, checkpointing))

    @torch.no_grad()
    def encode(self, frames: ArrayLike) -> tuple[Tensor, Tensor]:
        """Frames (uint8, (H, W, 3) or (B, H, W, 3), any size) -> z_cls (B, D), patches (B, N, D)."""
        u8 = check_frames(frames)  # (B, H, W, 3)
        if self._use_graphs():
            return self._encode_graphs(self.device, u8)
        return self._encode_device(u8.to(self.device, non_blocking=True))

    def _encode_device(self, u8: Tensor) -> tuple[Tensor, Tensor]:
        """Encode uint8 frames already on the device (graph-capturable)."""
        return self._encode_input(self._normalise(u8))

    @torch.no_grad()
    def encode_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Preprocessed images (B, 3, S, S) (:meth:`preprocess`) -> z_cls (B, D), patches
        (B, N, D): several models with the same input preprocess a frame once."""
        return self._encode_input(x.to(self.device))

    def same_input(self, other: IWM) -> bool:
        """Whether ``other`` takes exactly this model's :meth:`preprocess` output."""
        return (self.config.img_size == other.config.img_size and self.device == other.device
                and torch.equal(self.pix_scale, other.pix_scale.to(self.device))
                and torch.equal(self.pix_shift, other.pix_shift.to(self.device)))

    def _encode_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with self.inference_autocast():
            patches = self._encode_fn(x).float()  # (B, N, D)
        return global_latent(patches), patches

    # -- predictor

    def predict_heads(self, z_cls: Tensor, patches: Tensor | None = None,
                      cond: Tensor | None = None, action_id: Tensor | None = None) -> Tensor:
        """Grad-enabled per-head next-step patches (E, B, N, D) (checked inputs)."""
        return self._heads(*check_step_inputs(self.config, self.device, z_cls, patches, cond,
                                              action_id), self.predictor)

    def _heads(self, z: Tensor, p: Tensor | None, c: Tensor, a: Tensor | None,
               fn: Any) -> Tensor:
        """Next-frame call: context = the frame's patches at their positions (prior = the same
        patches), or its global latent alone at the global position; targets = all patches."""
        b = z.shape[0]
        tgt_idx = self.all_idx.expand(b, -1)  # (B, N)
        if p is not None:
            return fn(p, tgt_idx, tgt_idx, c, a, p)
        gidx = torch.full((b, 1), -1, dtype=torch.long, device=z.device)
        return fn(z[:, None], gidx, tgt_idx, c, a)

    def _step(self, z: Tensor, p: Tensor | None, c: Tensor, a: Tensor | None) -> Prediction:
        if self._use_graphs():
            return Prediction(*self._step_graphs(self.device, z, p, c, a))
        return Prediction(*self._step_device(z, p, c, a))

    def _step_device(self, z: Tensor, p: Tensor | None, c: Tensor, a: Tensor | None
                     ) -> tuple[Tensor, Tensor | None, Tensor]:
        """One checked predictor step on the device (graph-capturable)."""
        with self.inference_autocast():
            heads = self._heads(z, p, c, a, self._predict_fn)  # (E, B, N, D)
        heads = heads.float()
        mean = heads.mean(0)  # (B, N, D)
        return global_latent(mean), mean if p is not None else None, ensemble_spread(heads)

    @torch.no_grad()
    def infer_action(self, patches: ArrayLike, next_patches: ArrayLike) -> Tensor:
        """Inverse dynamics: action probabilities (B, num_actions) from a frame's patches
        (B, N, D) and the next frame's; RuntimeError for a model without the head."""
        if self.inverse is None:
            raise RuntimeError("this model has no inverse-dynamics head (trained without "
                               "IWMConfig.inverse_dynamics)")
        z0 = torch.as_tensor(patches, dtype=torch.float32, device=self.device)
        z1 = torch.as_tensor(next_patches, dtype=torch.float32, device=self.device)
        if z0.ndim != 3 or z0.shape != z1.shape or z0.shape[1:] != (self.num_patches,
                                                                     self.embed_dim):
            raise ValueError(f"infer_action: patches and next_patches must both be (B, "
                             f"{self.num_patches}, {self.embed_dim}), got {tuple(z0.shape)} "
                             f"and {tuple(z1.shape)}")
        with self.inference_autocast():
            return self.inverse(z0, z1).float().softmax(-1)

    @torch.no_grad()
    def predict(self, z_cls: ArrayLike, patches: ArrayLike | None = None,
                cond: ArrayLike | None = None, action_id: ArrayLike | None = None) -> Prediction:
        """Next-step latents from z_cls (B, D), optional patches (B, N, D), cond (B, cond_dim)
        (None = zeros) and action_id (B,) (-1 = no action; None = none).

        With patches the context is the whole frame; without, only its global latent.
        """
        return self._step(*check_step_inputs(self.config, self.device, z_cls, patches, cond,
                                             action_id))

    @torch.no_grad()
    def rollout(self, z_cls: ArrayLike, patches: ArrayLike | None = None,
                cond_seq: ArrayLike | None = None, action_seq: ArrayLike | None = None) -> Rollout:
        """K autoregressive steps from z_cls (B or 1, D) [+ patches (B or 1, N, D)].

        ``cond_seq`` (B, K, cond_dim) and/or ``action_seq`` (B, K) give the steps; a start
        state with batch 1 is shared by all B candidate sequences. Each step feeds the
        ensemble-mean prediction back in, so K steps equal K chained :meth:`predict` calls.
        """
        z, p, cs, acts = check_rollout_inputs(self.config, self.device, z_cls, patches,
                                              cond_seq, action_seq)
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
