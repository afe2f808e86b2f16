"""Training objectives of IWM: what ``IWM.forward(batch)`` computes.

Two batch kinds, told apart by their keys:

- **views** (Phase 1, I-JEPA / IWM): ``src`` and ``tgt`` images (B, 3, S, S), ``cond``
  (B, cond_dim) the augmentation parameters taking ``src`` to ``tgt``, ``ctx_idx`` (B, C) the
  kept patches of ``src``, ``tgt_idx`` (B, T) the masked target patches. The predictor sees
  the context tokens and predicts the EMA target encoder's layer-normed tokens of ``tgt`` at
  ``tgt_idx`` (smooth-L1, Assran et al. 2023).
- **dynamics** (Phase 3, V-JEPA 2-AC): ``frames`` (B, K+1, 3, S, S), ``actions`` (B, K) long
  (-1 = none) and/or ``cond`` (B, K, cond_dim). Teacher forcing predicts frame j+1 from the
  encoded frame j for every j < K; the rollout loss feeds the predictor its own prediction
  for K-1 more steps; the global loss predicts frame 1 from frame 0's global latent alone
  (what ``predict`` does without patches). Targets come from the target encoder (EMA, or
  the frozen encoder itself when ``freeze_encoder``). The context tokens come from the
  online encoder (so it learns), but the *prior* of each position (the latent the
  next-frame predictor changes) and the global latent are the target encoder's: the
  predictor maps target-space latents to target-space latents, the space inference runs in
  (the target encoder is what :mod:`train.export` ships, as I-JEPA and V-JEPA release it).

A views batch of ``views_residual`` may carry ``group`` (B,): rows of one group share their
source view and differ in the target's colour jitter alone. ``views_nce_weight`` then adds
an InfoNCE term (van den Oord et al. 2018): each row's prediction must pick its own target
among its group's, by the cosine of the layer-normed tokens: the retrieval that IWM's
augmentation MRR scores (Garrido et al. 2024), which an L2 loss teaches slowly because the
targets of one group differ little next to the prediction's error.

A dynamics batch may also carry ``views``: a views batch (the keys above) made from its own
frames; its loss is added with weight ``views_weight`` (``views_pred`` in the output). Both
tasks share the conditioning embedding without clashing: a views batch has no action
(id -1) and a dynamics batch of discrete actions has a zero vector, which is also the
identity augmentation.

Optional, both kinds: ``boot`` (E, B) per-head bootstrap weights (each ensemble head trains
on its own Poisson(1) resample of the batch, so the heads' spread measures uncertainty);
VICReg variance/covariance terms on the online encoder's context tokens (a collapse guard);
``change_weight`` (dynamics) weights target patches by how much they change from frame j
to j+1, so a static background cannot dominate the loss.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from iwm_bus.model.encoder import gather_tokens, global_latent, normed_targets

__all__ = ["Objective", "boot_weights", "change_weights", "collapse_stats", "dynamics_loss",
           "effective_rank", "group_nce", "head_loss", "pick_logits", "pick_nce", "regulariser",
           "views_loss", "vicreg_terms"]

LOSSES = ("smooth_l1", "l1", "l2")


@dataclass
class Objective:
    """Loss weights and switches of ``IWM.forward``."""

    # distance between predicted and target tokens: smooth_l1 (I-JEPA), l1 (V-JEPA 2-AC), l2
    loss: str = "smooth_l1"
    # dynamics: weight of the k-step rollout loss (V-JEPA 2-AC)
    rollout_weight: float = 1.0
    # dynamics: weight of predicting frame 1 from frame 0's global latent alone
    global_weight: float = 0.25
    # dynamics: target patch weight 1 + change_weight * (its change / the batch's mean change)
    change_weight: float = 0.0
    # VICReg variance term on the online encoder's tokens (0 = off)
    var_weight: float = 0.0
    # VICReg covariance term on the online encoder's tokens (0 = off)
    cov_weight: float = 0.0
    # keep the encoder frozen (targets and context from it, no gradient; views loss too)
    freeze_encoder: bool = False
    # activation checkpointing in the online encoder (seed: "OOM during training")
    grad_checkpointing: bool = False
    # dynamics: weight of a views loss on the same step's frames (the batch's ``views``
    # part): the dual-stream models learn actions and augmentations in one run (0 = off)
    views_weight: float = 0.0
    # views: predict every token of the target view from the whole source view, as the
    # change of each position's latent (prior = the source's target-space latent): the
    # next-frame call, with the augmentation as the "action" (False: I-JEPA block masks)
    views_residual: bool = False
    # views: weight of the InfoNCE term over each group of targets (the batch's ``group``;
    # needs ``views_residual``; 0 = off)
    views_nce_weight: float = 0.0
    # views: temperature of that term's cosine similarities
    views_nce_temperature: float = 0.02
    # action terms (:mod:`iwm_bus.model.action_terms`; a batch with ``seq_frames``):
    # counterfactual InfoNCE: the prediction under action a picks the next frame under a
    # among the distinct next frames of the same emulator state
    cf_weight: float = 0.0
    # temporal InfoNCE: the prediction picks the true next frame among the frames around it
    # (the current one included) and the other samples' (a held-action rollout step too,
    # scaled by ``rollout_weight``)
    temporal_weight: float = 0.0
    # inverse dynamics: the action from (z_t, z_t+1) (needs IWMConfig.inverse_dynamics)
    inverse_weight: float = 0.0
    # per-head regression of the next latent beside those terms (keeps the ensemble's spread
    # an uncertainty and the prediction in the latent space; ``loss`` distance)
    anchor_weight: float = 1.0
    # temperature of the action terms' cosine similarities
    nce_temperature: float = 0.1
    # counterfactual target smoothing toward the action marginal: this share of a query's
    # target moves from its own outcome to the state's outcomes in proportion to how many
    # actions lead to each (0 = off; below 0.5 its own outcome stays the most likely one)
    cf_share: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.views_residual, bool):
            raise ValueError(f"Objective.views_residual must be a bool, got {self.views_residual!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"Objective.loss must be one of {LOSSES}, got {self.loss!r}")
        for f in ("rollout_weight", "global_weight", "change_weight", "var_weight",
                  "cov_weight", "views_weight", "views_nce_weight", "cf_weight",
                  "temporal_weight", "inverse_weight", "anchor_weight"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                raise ValueError(f"Objective.{f} must be a number >= 0, got {v!r}")
        for f in ("views_nce_temperature", "nce_temperature"):
            t = getattr(self, f)
            if isinstance(t, bool) or not isinstance(t, int | float) or t <= 0:
                raise ValueError(f"Objective.{f} must be a number > 0, got {t!r}")
        if isinstance(self.cf_share, bool) or not isinstance(self.cf_share, int | float) \
                or not 0 <= self.cf_share < 0.5:
            raise ValueError(f"Objective.cf_share must be a number in [0, 0.5), got "
                             f"{self.cf_share!r}")
        if self.views_nce_weight and not self.views_residual:
            raise ValueError("Objective.views_nce_weight needs views_residual: the InfoNCE term "
                             "compares whole target views")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def action_terms(self) -> bool:
        """Whether training batches are action-term batches (counterfactual / temporal)."""
        return bool(self.cf_weight or self.temporal_weight)


def _token_error(pred: Tensor, target: Tensor, kind: str) -> Tensor:
    """Per-token error (..., T, D) -> (..., T)."""
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target.expand_as(pred), reduction="none").mean(-1)
    if kind == "l1":
        return (pred - target).abs().mean(-1)
    return (pred - target).square().mean(-1)


def head_loss(heads: Tensor, target: Tensor, boot: Tensor, kind: str,
               tok_w: Tensor | None = None) -> Tensor:
    """Bootstrap-weighted loss of heads (E, B, T, D) vs target (B, T, D); boot (E, B)."""
    err = _token_error(heads.float(), target[None].float(), kind)  # (E, B, T)
    per = (err * tok_w[None]).sum(-1) / tok_w.sum(-1)[None] if tok_w is not None \
        else err.mean(-1)  # (E, B)
    return (per * boot).mean()  # over heads and batch; / B (not / sum(boot)): DDP-exact


def vicreg_terms(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """VICReg (Bardes et al. 2022) variance and covariance terms of tokens (B, T, D)."""
    x = tokens.float().reshape(-1, tokens.shape[-1])  # (B*T, D)
    x = x - x.mean(0)
    std = (x.var(0) + 1e-4).sqrt()  # (D,)
    var = F.relu(1.0 - std).mean()
    cov = (x.T @ x) / max(x.shape[0] - 1, 1)  # (D, D)
    off = cov - torch.diag(torch.diag(cov))
    return var, off.square().sum() / x.shape[1]


def _effective_rank(x: Tensor, max_rows: int) -> Tensor:
    x = x.float().reshape(-1, x.shape[-1])[:max_rows]
    s = torch.linalg.svdvals(x - x.mean(0))
    p = s / s.sum().clamp_min(1e-12)
    return torch.exp(-(p * (p + 1e-12).log()).sum())


@torch.no_grad()
def effective_rank(x: Tensor, max_rows: int = 1024) -> float:
    """Effective rank (Roy & Vetterli 2007): exp of the entropy of the normalised singular values."""
    return float(_effective_rank(x, max_rows))


@torch.no_grad()
def collapse_stats(targets: Tensor) -> dict[str, Tensor]:
    """Per-dimension std (mean over dims) and effective rank of target tokens (B, T, D), as
    0-dim tensors on their device: reading them waits for the device, which the trainer
    does once a step for every metric together."""
    flat = targets.float().reshape(-1, targets.shape[-1])
    return {"target_std": flat.std(0).mean(), "target_rank": _effective_rank(flat, 1024)}


def boot_weights(batch: dict[str, Tensor], ensemble: int, b: int, ref: Tensor) -> Tensor:
    boot = batch.get("boot")
    return boot.to(ref) if boot is not None else ref.new_ones(ensemble, b)


def regulariser(obj: Objective, ctx: Tensor, out: dict[str, Tensor]) -> Tensor:
    if not (obj.var_weight or obj.cov_weight) or not ctx.requires_grad:
        return ctx.new_zeros(())
    var, cov = vicreg_terms(ctx)
    out["var"], out["cov"] = var.detach(), cov.detach()
    return obj.var_weight * var + obj.cov_weight * cov


def pick_logits(pred: Tensor, cands: Tensor, allowed: Tensor, temperature: float) -> Tensor:
    """Logits (R, K) of predictions (R, N, D) over candidates (K, N, D): the cosine of the
    flattened, per-token layer-normed latents (how the evaluation ranks them) over
    ``temperature``; ``-inf`` where ``allowed`` (R, K) is False."""
    p, c = (F.normalize(normed_targets(x).flatten(1), dim=1) for x in (pred, cands))
    return (p @ c.T / temperature).masked_fill(~allowed, float("-inf"))


def pick_nce(pred: Tensor, cands: Tensor, pos: Tensor, allowed: Tensor,
             temperature: float) -> Tensor:
    """InfoNCE (van den Oord et al. 2018): prediction r must pick candidate ``pos[r]`` among
    the candidates ``allowed[r]`` lets it see (see :func:`pick_logits`)."""
    return F.cross_entropy(pick_logits(pred, cands, allowed, temperature), pos)


def group_nce(pred: Tensor, target: Tensor, group: Tensor, temperature: float) -> Tensor:
    """InfoNCE of predictions (B, N, D) against targets (B, N, D): row i's positive is target
    i, its negatives the other targets of its ``group`` (B,)."""
    return pick_nce(pred, target, torch.arange(len(pred), device=pred.device),
                    group[:, None] == group[None], temperature)


def views_loss(model: Any, batch: dict[str, Tensor], obj: Objective) -> dict[str, Tensor]:
    """Phase 1: predict the target view's masked tokens from the source view's context
    (``views_residual``: all its tokens, as changes of the source's). With
    ``freeze_encoder`` the context is the frozen encoder's, without a gradient."""
    src, tgt, cond = batch["src"], batch["tgt"], batch["cond"]
    if obj.views_residual:
        idx = model.all_idx.expand(src.shape[0], -1)  # (B, N)
        with torch.no_grad():
            target = model.encode_features(tgt, target=True)  # (B, N, D)
            prior = model.encode_features(src, target=True)
        ctx = prior if obj.freeze_encoder else model.encode_features(
            src, checkpointing=obj.grad_checkpointing)
        heads = model.predictor(ctx, idx, idx, cond, None, prior=prior)  # (E, B, N, D)
    else:
        ctx_idx, tgt_idx = batch["ctx_idx"], batch["tgt_idx"]
        with torch.no_grad():
            target = gather_tokens(model.encode_features(tgt, target=True), tgt_idx)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not obj.freeze_encoder):
            ctx = model.encode_features(src, target=obj.freeze_encoder, keep=ctx_idx,
                                        checkpointing=obj.grad_checkpointing)
        heads = model.predictor(ctx, ctx_idx, tgt_idx, cond)  # (E, B, T, D)
    out: dict[str, Tensor] = {}
    pred = head_loss(heads, target, boot_weights(batch, model.config.ensemble, src.shape[0], ctx),
                      obj.loss)
    out["pred"] = pred.detach()
    loss = pred
    if obj.views_nce_weight and "group" in batch:
        nce = group_nce(heads.mean(0), target, batch["group"], obj.views_nce_temperature)
        out["nce"] = nce.detach()
        loss = loss + obj.views_nce_weight * nce
    out["loss"] = loss + regulariser(obj, ctx, out)
    out.update(collapse_stats(target))
    return out


def change_weights(prev: Tensor, nxt: Tensor, strength: float) -> Tensor | None:
    """Patch weights (B, N) from how much each target token changes between two frames."""
    if not strength:
        return None
    d = (nxt - prev).abs().mean(-1)  # (B, N)
    return 1.0 + strength * d / d.mean().clamp_min(1e-6)


def dynamics_loss(model: Any, batch: dict[str, Tensor], obj: Objective) -> dict[str, Tensor]:
    """Phase 3: teacher-forced next step + k-step rollout + global-latent step."""
    frames = batch["frames"]  # (B, K+1, 3, S, S)
    b, k1 = frames.shape[:2]
    k = k1 - 1
    cfg = model.config
    cond = batch.get("cond")
    if cond is None:
        cond = frames.new_zeros(b, k, cfg.cond_dim)
    actions = batch.get("actions")  # (B, K) or None
    with torch.no_grad():
        target = model.encode_features(frames.flatten(0, 1), target=not obj.freeze_encoder)
        target = target.unflatten(0, (b, k1))  # (B, K+1, N, D)
    if obj.freeze_encoder:
        ctx = target[:, :k]  # (B, K, N, D)
    else:
        ctx = model.encode_features(frames[:, :k].flatten(0, 1),
                                    checkpointing=obj.grad_checkpointing).unflatten(0, (b, k))
    n = ctx.shape[2]
    boot = boot_weights(batch, cfg.ensemble, b, frames)
    idx = torch.arange(n, device=frames.device).expand(b * k, n)  # (B*K, N)
    flat_ctx = ctx.flatten(0, 1)  # (B*K, N, D)
    prior = target[:, :k].flatten(0, 1)  # (B*K, N, D): target-space latents of frames j < K
    flat_act = actions.flatten() if actions is not None else None
    heads = model.predictor(flat_ctx, idx, idx, cond.flatten(0, 1), flat_act, prior=prior)
    heads = heads.unflatten(1, (b, k))  # (E, B, K, N, D)
    out: dict[str, Tensor] = {}
    total = frames.new_zeros(())
    tf = frames.new_zeros(())
    # patch weights of each transition j -> j+1 (None: unweighted), shared by all three losses
    ws = [change_weights(target[:, j], target[:, j + 1], obj.change_weight) for j in range(k)]
    for j in range(k):
        tf = tf + head_loss(heads[:, :, j], target[:, j + 1], boot, obj.loss, ws[j]) / k
    out["pred"] = tf.detach()
    total = total + tf
    if k > 1 and obj.rollout_weight:
        z, roll, idx1 = heads[:, :, 0].mean(0), frames.new_zeros(()), idx[:b]
        for j in range(1, k):
            act = actions[:, j] if actions is not None else None
            h = model.predictor(z, idx1, idx1, cond[:, j], act, prior=z)  # (E, B, N, D)
            roll = roll + head_loss(h, target[:, j + 1], boot, obj.loss, ws[j]) / (k - 1)
            z = h.mean(0)
        out["rollout"] = roll.detach()
        total = total + obj.rollout_weight * roll
    if obj.global_weight:
        g = global_latent(target[:, 0])[:, None]  # (B, 1, D), target space like inference
        gidx = torch.full((b, 1), -1, dtype=torch.long, device=frames.device)
        act = actions[:, 0] if actions is not None else None
        h = model.predictor(g, gidx, idx[:b], cond[:, 0], act)  # (E, B, N, D)
        glob = head_loss(h, target[:, 1], boot, obj.loss, ws[0])
        out["global"] = glob.detach()
        total = total + obj.global_weight * glob
    out["loss"] = total + regulariser(obj, ctx, out)
    out.update(collapse_stats(target[:, 1:]))
    return out


