"""Losses that make the world model use its actions: what ``IWM.forward`` computes for a batch
with ``seq_frames`` (``Objective.action_terms``).

A next-latent regression barely feels an action: it changes 0.1-1 % of an Atari frame's
pixels, and an error averaged over every patch and the scene's own motion is dominated by the
rest. These terms rank instead, in the space the evaluation ranks in (cosine of per-token
layer-normed, flattened patch latents), so the few patches an action moves decide the loss:

- **counterfactual** (``cf_weight``): from one cloned emulator state, the next frame under
  every action; the prediction under action a must pick the next frame under a among that
  state's *distinct* next frames, the other actions' outcomes being the hard negatives
  (counterfactual InfoNCE; candidates encoded by the online encoder with gradient, as CPC,
  van den Oord et al. 2018, and contrastive structured world models, Kipf et al. 2020);
  ``cf_share`` smooths its target toward the outcomes most actions share (:func:`shared_targets`);
- **temporal** (``temporal_weight``): on factual play, the prediction from (z_t, a_t) must pick
  z_t+1 among z_t-1 .. z_t+2 of its own episode and every other sample's, so copy-last
  (z_t) is a negative; a second, held-action rollout step from the prediction itself
  (V-JEPA 2-AC's rollout loss, here as a ranking) must pick z_t+2 (``rollout_weight``);
- **inverse dynamics** (``inverse_weight``, ICM, Pathak et al. 2017): the action from
  (z_t, z_t+1) on factual pairs, and on counterfactual pairs as a set (any action that leads
  to that outcome is right: synonyms of a game's action set);
- **anchor** (``anchor_weight``): each ensemble head regresses the next latent (bootstrap
  weights, change-weighted patches), so predictions stay in the latent space and the
  heads' spread stays an uncertainty.

Batch keys (uint8-derived float images already normalised, on the model's device):

- ``seq_frames`` (B, 4, 3, S, S): frames t-1, t, t+1, t+2; ``seq_actions`` (B, 4) long: the
  action that produced each frame (-1 none); ``seq_same`` (B, 2, 4B) bool: candidate j is a
  pixel copy of the positive t+1 (row 0) or t+2 (row 1): not counted as a negative;
- ``cf_cur`` (C, 3, S, S) states; ``cf_out`` (Q, 3, S, S) their distinct next frames;
  ``cf_out_state`` (Q,) the state of each; ``cf_out_actions`` (Q, A) bool, the actions
  leading to each; ``cf_q_state`` / ``cf_q_action`` / ``cf_q_pos`` (R,): the queries;
- ``boot`` (E, B) optional bootstrap weights of the seq part.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from iwm_bus.model.inverse import set_cross_entropy
from iwm_bus.model.objective import (
    Objective,
    boot_weights,
    change_weights,
    collapse_stats,
    head_loss,
    pick_logits,
    regulariser,
)

__all__ = ["SEQ_LEN", "action_loss", "shared_targets"]

#: frames of a factual sample: t-1, t, t+1, t+2
SEQ_LEN = 4


def _accuracy(logits: Tensor, pos: Tensor) -> Tensor:
    return (logits.argmax(-1) == pos).float().mean().detach()


def action_loss(model: Any, batch: dict[str, Tensor], obj: Objective) -> dict[str, Tensor]:
    """The action terms of one batch (module doc); ``"loss"`` is their weighted sum."""
    cfg, t = model.config, obj.nce_temperature
    seq, acts = batch["seq_frames"], batch["seq_actions"]
    b = seq.shape[0]
    has_cf = obj.cf_weight > 0 and "cf_cur" in batch
    images = [seq.flatten(0, 1)]
    if has_cf:
        images += [batch["cf_cur"], batch["cf_out"]]
    # one encoder call for every image of the step (fewer, larger kernels)
    z_all = model.encode_features(torch.cat(images), checkpointing=obj.grad_checkpointing)
    z = z_all[:b * SEQ_LEN].unflatten(0, (b, SEQ_LEN))  # (B, 4, N, D)
    cands = z_all[:b * SEQ_LEN]  # (4B, N, D)
    out: dict[str, Tensor] = {}
    boot = boot_weights(batch, cfg.ensemble, b, seq)

    def step(zq: Tensor, a: Tensor) -> Tensor:  # (R, N, D), (R,) -> heads (E, R, N, D)
        r = zq.shape[0]
        idx = model.all_idx.expand(r, -1)
        return model.predictor(zq, idx, idx, zq.new_zeros(r, cfg.cond_dim), a, prior=zq)

    # temporal: z_t -> z_t+1, then a held-action step from the prediction -> z_t+2
    h1 = step(z[:, 1], acts[:, 2])  # (E, B, N, D)
    h2 = step(h1.mean(0), acts[:, 3])
    self_idx = torch.arange(b * SEQ_LEN, device=seq.device)
    total = seq.new_zeros(())
    for k, (h, name, w) in enumerate(((h1, "temporal", 1.0), (h2, "rollout", obj.rollout_weight))):
        pos = torch.arange(b, device=seq.device) * SEQ_LEN + 2 + k
        allowed = ~batch["seq_same"][:, k] | (self_idx[None] == pos[:, None])  # (B, 4B)
        logits = pick_logits(h.mean(0), cands, allowed, t)
        nce = F.cross_entropy(logits, pos)
        tgt = z[:, 2 + k].detach()
        anchor = head_loss(h, tgt, boot, obj.loss,
                           change_weights(z[:, 1 + k].detach(), tgt, obj.change_weight))
        out[name], out[f"{name}_acc"] = nce.detach(), _accuracy(logits, pos)
        out[f"{name}_anchor"] = anchor.detach()
        total = total + w * (obj.temporal_weight * nce + obj.anchor_weight * anchor)
    if has_cf:
        c = batch["cf_cur"].shape[0]
        zc = z_all[b * SEQ_LEN:b * SEQ_LEN + c]  # (C, N, D)
        zo = z_all[b * SEQ_LEN + c:]  # (Q, N, D)
        qs, qp = batch["cf_q_state"], batch["cf_q_pos"]
        hq = step(zc[qs], batch["cf_q_action"])  # (E, R, N, D)
        allowed = batch["cf_out_state"][None] == qs[:, None]  # (R, Q)
        logits = pick_logits(hq.mean(0), zo, allowed, t)
        if obj.cf_share:
            target = shared_targets(qp, allowed, batch["cf_out_actions"], obj.cf_share)
            cf = -(target * logits.log_softmax(-1).masked_fill(~allowed, 0.0)).sum(-1).mean()
        else:
            cf = F.cross_entropy(logits, qp)
        out["cf"], out["cf_acc"] = cf.detach(), _accuracy(logits, qp)
        total = total + obj.cf_weight * cf
        if obj.anchor_weight:
            ones = hq.new_ones(cfg.ensemble, hq.shape[1])
            total = total + obj.anchor_weight * head_loss(hq, zo[qp].detach(), ones, obj.loss)
    if obj.inverse_weight and model.inverse is not None:
        inv = _inverse(model, z, acts, out)
        if has_cf:
            inv_cf = set_cross_entropy(model.inverse(zc[batch["cf_out_state"]], zo),
                                       batch["cf_out_actions"])
            out["inverse_cf"] = inv_cf.detach()
            inv = inv + inv_cf
        total = total + obj.inverse_weight * inv
    out["loss"] = total + regulariser(obj, z_all, out)
    out.update(collapse_stats(z.detach().flatten(0, 1)))
    return out


def shared_targets(pos: Tensor, allowed: Tensor, out_actions: Tensor, share: float) -> Tensor:
    """Counterfactual targets (R, Q) smoothed toward the action marginal: ``1 - share`` on
    each query's own outcome ``pos`` (R,), ``share`` over the outcomes its state ``allowed``
    (R, Q) in proportion to how many actions lead to each (``out_actions`` (Q, A) bool).

    Where a model knows what the action does, the best prediction still picks its own outcome
    first (for ``share`` < 0.5); where it cannot know (a game it has not seen), the loss
    rewards leaning toward the outcome most actions share (the action-blind oracle's pick)
    instead of a confident guess. Label smoothing (Szegedy et al. 2016), toward the actions'
    marginal instead of uniform."""
    counts = out_actions.sum(-1).float()
    marginal = counts[None] * allowed  # (R, Q)
    marginal = marginal / marginal.sum(-1, keepdim=True)
    own = F.one_hot(pos, allowed.shape[1]).to(marginal.dtype)
    return (1.0 - share) * own + share * marginal


def _inverse(model: Any, z: Tensor, acts: Tensor, out: dict[str, Tensor]) -> Tensor:
    """Cross-entropy of the inverse head on the factual pairs (t-1, t), (t, t+1), (t+1, t+2)
    whose action is known. Every pair goes through the head and those of no action (-1, an
    episode's first frame) weigh 0: a boolean index would wait for the device on a GPU."""
    z0 = z[:, :-1].flatten(0, 1)  # (3B, N, D)
    z1 = z[:, 1:].flatten(0, 1)
    a = acts[:, 1:].flatten()  # (3B,)
    known = (a >= 0).float()  # (3B,)
    n = known.sum().clamp_min(1.0)
    logits = model.inverse(z0, z1)  # (3B, A)
    nll = F.cross_entropy(logits, a.clamp_min(0), reduction="none")  # (3B,)
    loss = (nll * known).sum() / n
    out["inverse"] = loss.detach()
    out["inverse_acc"] = ((logits.argmax(-1) == a).float() * known).sum().detach() / n
    return loss
