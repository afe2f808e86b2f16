"""World-model evaluation on held-out data, each number beside its trivial baseline.

Latents are compared as whole frames: a frame's patch latents (N, D), each token
layer-normed, flattened to one vector; ranking is by cosine similarity with ties in favour
of the truth (a candidate identical to the true latent does not cost a rank).

- **Augmentation MRR** (IWM protocol, Garrido et al. 2024): per image, one source view and a
  bank of ``bank`` target views of the same crop under different colour jitters; the
  prediction from the source view conditioned on target k's parameters must retrieve
  target k. Baseline: the same predictor with the conditioning zeroed, and chance. Also how
  the prediction moves with the augmentation, around the bank's mean: ``response`` = its
  mean displacement over the targets' (0 = ignores it, 1 = moves as much as the targets)
  and ``alignment`` = the mean cosine between the two displacements (0 = unrelated,
  1 = the right direction): finer than the MRR, which stays at chance until the movement
  outgrows the differences between the targets themselves.
- **Next-latent MRR**: the true next latent among ``bank`` latents of the same session
  around it (temporal neighbours, the current frame included). Baselines: copy-last (the
  prediction is the current latent) and action-shuffled (the model fed another
  transition's action).
- **Action discrimination**: from cloned emulator states, the next frame under every action;
  the rank of the true next latent among the distinct next latents, per game and split into
  games seen in training (held-out episodes) and unseen games. Baselines: copy-last, chance
  (the mean of 1/rank for a uniformly random rank), the action-blind oracle (outcomes ranked
  by how many actions share them: what no model that ignores the action beats), the
  outcomes' centroid, and the model fed a wrong action or none. Also the inverse-dynamics
  head's accuracy on the same states beside the best constant action.
- **Surprise AUROC**: surprise (:func:`iwm_bus.metrics.patch_surprise`) on normal
  transitions vs transitions whose next frame was replaced by a frame ``cut_gap`` or more
  frames away in the same episode; copy-last's distance as the baseline detector. Also for
  the standardised surprise the worker publishes (:class:`iwm_bus.metrics.SurpriseZ`), each
  scored after the ``z_history`` transitions before it, as a worker that had been running
  that long would; pooled over all games, as one threshold would be.
- **Uncertainty vs error**: Pearson correlation of the ensemble spread and the surprise on
  held-out transitions. **Collapse**: per-dimension std and effective rank of the latents.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from iwm_bus import metrics
from iwm_bus.model import IWM, effective_rank
from train.augment import AugConfig, apply_views, cond_vector, sample_params, with_target_jitters
from train.data import FrameStore, resize_u8

__all__ = ["EvalConfig", "action_discrimination", "action_discrimination_games",
           "augmentation_mrr", "chance_mrr", "evaluate", "next_latent_mrr", "oracle_rr",
           "summary", "surprise_auroc"]


@dataclass
class EvalConfig:
    """Sizes of the evaluation."""

    # candidates per ranking (IWM protocol: 256)
    bank: int = 256
    # held-out transitions scored for next-latent MRR, AUROC and uncertainty
    max_transitions: int = 1024
    # images for augmentation MRR (each costs ``bank`` target encodes)
    aug_images: int = 8
    # a cut's frame is at least this many frames away (5 s at 15 fps)
    cut_gap: int = 75
    # ordinary transitions a standardised surprise has seen before the one it scores
    z_history: int = 30
    # augmentation MRR through the next-frame call (every token, as the change of the
    # source's; a model trained with ``objective.views_residual``) instead of the views call
    aug_residual: bool = False
    # encoder/predictor batch
    batch: int = 64
    # seed of every sample drawn
    seed: int = 0

    def __post_init__(self) -> None:
        for f in ("bank", "max_transitions", "aug_images", "cut_gap", "z_history", "batch"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"EvalConfig.{f} must be an int >= 1, got {v!r}")


def chance_mrr(n: int) -> float:
    """Expected reciprocal rank of a uniformly random rank among n: H(n) / n."""
    return sum(1.0 / r for r in range(1, n + 1)) / n


def flat(patches: Tensor) -> Tensor:
    """(..., N, D) patch latents -> (..., N*D), each token layer-normed."""
    return F.layer_norm(patches.float(), patches.shape[-1:]).flatten(-2)


def rr_truth(pred: Tensor, true: Tensor, cands: Tensor) -> Tensor:
    """Reciprocal ranks, ties in favour of the truth: pred/true (B, F), cands (B, K, F)."""
    return metrics.reciprocal_ranks_torch(pred, true, cands, ties="truth")


@torch.no_grad()
def encode_all(model: IWM, frames: Tensor, batch: int = 64) -> Tensor:
    """Patch latents (M, N, D) of uint8 frames (M, H, W, 3), on the CPU."""
    out = [model.encode(frames[i:i + batch])[1].cpu() for i in range(0, len(frames), batch)]
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def predict_all(model: IWM, patches: Tensor, actions: Tensor | None, cond: Tensor | None,
                batch: int = 64) -> tuple[Tensor, Tensor]:
    """Next-step predicted patches (B, N, D) and uncertainty (B,) for a batch of transitions."""
    preds, uncs = [], []
    for i in range(0, len(patches), batch):
        p = patches[i:i + batch]
        a = actions[i:i + batch] if actions is not None and model.config.num_actions else None
        c = cond[i:i + batch] if cond is not None else None
        out = model.predict(p.mean(1), p, c, a)
        preds.append(out.patches.cpu())
        uncs.append(out.uncertainty.cpu())
    return torch.cat(preds), torch.cat(uncs)


# ----------------------------------------------------------------------------- augmentation


@torch.no_grad()
def augmentation_mrr(model: IWM, store: FrameStore, cfg: EvalConfig,
                     aug: AugConfig | None = None) -> dict[str, float]:
    """IWM's augmentation MRR (module doc) with the zero-conditioning baseline and chance."""
    aug = aug or AugConfig()
    gen = torch.Generator().manual_seed(cfg.seed)
    pick = torch.randperm(len(store), generator=gen)[:cfg.aug_images]
    idx = model.all_idx
    rr_model, rr_zero, gain, align = [], [], [], []
    for i in pick.tolist():
        params = with_target_jitters(gen, sample_params(gen, 1, aug), cfg.bank, aug)
        img = store.frames[i:i + 1].expand(cfg.bank, -1, -1, -1)
        src, tgt = apply_views(img, params)
        src, tgt = model.normalise_unit(src[:1]), model.normalise_unit(tgt)
        with model.inference_autocast():  # the model's precision, not the views' or ranks'
            targets = torch.cat([model.encode_features(tgt[j:j + cfg.batch], target=False)
                                 for j in range(0, cfg.bank, cfg.batch)]).float()  # (K, N, D)
            ctx = model.encode_features(src)  # (1, N, D)
        cond = cond_vector(params, model.config.cond_dim).to(model.device)  # (K, C)
        for c, out in ((cond, rr_model), (torch.zeros_like(cond), rr_zero)):
            preds = []
            for j in range(0, cfg.bank, cfg.batch):
                cj = c[j:j + cfg.batch]
                b = len(cj)
                c_b = ctx.expand(b, -1, -1)
                with model.inference_autocast():
                    heads = model.predictor(c_b, idx.expand(b, -1), idx.expand(b, -1), cj, None,
                                            c_b if cfg.aug_residual else None)  # (E, b, N, D)
                preds.append(heads.float().mean(0))
            pf, tf = flat(torch.cat(preds)), flat(targets)  # (K, F)
            others = torch.stack([torch.cat([tf[:k], tf[k + 1:]]) for k in range(len(tf))])
            out.append(rr_truth(pf, tf, others).mean().item())
            if out is rr_model:  # how the prediction moves with the augmentation
                dp, dt = pf - pf.mean(0), tf - tf.mean(0)  # (K, F): around the bank's means
                gain.append((dp.norm(dim=1).mean() / dt.norm(dim=1).mean()).item())
                align.append(F.cosine_similarity(dp, dt, dim=1).mean().item())
    return {"model": float(np.mean(rr_model)), "zero_cond": float(np.mean(rr_zero)),
            "chance": chance_mrr(cfg.bank), "response": float(np.mean(gain)),
            "alignment": float(np.mean(align))}


# ----------------------------------------------------------------------------- sessions


def _transitions(store: FrameStore, cfg: EvalConfig) -> Tensor:
    """Up to ``max_transitions`` indices t with t -> t+1 linked, evenly spaced."""
    t = (store.linked[1:]).nonzero().flatten()
    if len(t) > cfg.max_transitions:
        t = t[torch.linspace(0, len(t) - 1, cfg.max_transitions).long()]
    return t


def _session_window(store: FrameStore, t: int, bank: int) -> Tensor:
    """``bank`` indices of other frames of ``t``'s session, centred on it."""
    members = (store.session == store.session[t]).nonzero().flatten()
    pos = int((members == t).nonzero()[0])
    lo = max(0, min(pos - bank // 2, len(members) - bank - 1))
    window = members[lo:lo + bank + 1]
    return window[window != t][:bank]


def _session_rr(store: FrameStore, fl: Tensor, queries: Tensor, true_idx: Tensor, bank: int,
                chunk: int = 16) -> Tensor:
    """Reciprocal ranks of ``fl[true_idx]`` among ``bank`` same-session frames around it, for
    queries (B, F); banks are built ``chunk`` rows at a time (a bank of 256 frames of 64 x
    192 latents is 12 MB a row)."""
    out = []
    for i in range(0, len(true_idx), chunk):
        rows = [_session_window(store, int(t), bank) for t in true_idx[i:i + chunk]]
        k = min(len(r) for r in rows)
        cands = torch.stack([fl[r[:k]] for r in rows])  # (b, K, F)
        out.append(rr_truth(queries[i:i + chunk], fl[true_idx[i:i + chunk]], cands))
    return torch.cat(out)


@torch.no_grad()
def next_latent_mrr(model: IWM, store: FrameStore, cfg: EvalConfig,
                    lat: Tensor | None = None) -> dict[str, Any]:
    """Next-latent MRR vs copy-last and action-shuffled; also returns the raw series."""
    lat = encode_all(model, store.frames, cfg.batch) if lat is None else lat  # (M, N, D)
    t = _transitions(store, cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    acts, conds = store.action_id[t + 1], store.vector[t + 1]
    pred, unc = predict_all(model, lat[t], acts, conds, cfg.batch)
    perm = torch.randperm(len(t), generator=gen)
    shuffled = acts[perm]
    same = shuffled == acts  # a shuffle that kept the action is no shuffle: take the next id
    n_act = max(model.config.num_actions, 1)
    shuffled[same] = (shuffled[same] + 1) % n_act
    pred_sh, _ = predict_all(model, lat[t], shuffled, conds[perm], cfg.batch)
    fl = flat(lat)  # (M, F)
    k = min(cfg.bank, int(torch.bincount(store.session).min()) - 1)
    out = {"model": _session_rr(store, fl, flat(pred), t + 1, cfg.bank).mean().item(),
           "copy_last": _session_rr(store, fl, fl[t], t + 1, cfg.bank).mean().item(),
           "shuffled": _session_rr(store, fl, flat(pred_sh), t + 1, cfg.bank).mean().item(),
           "chance": chance_mrr(k + 1), "n": len(t)}
    surprise = metrics.patch_surprise_torch(pred, lat[t + 1]).numpy()
    out["_surprise"], out["_uncertainty"] = surprise, unc.numpy()
    return out


@torch.no_grad()
def surprise_auroc(model: IWM, store: FrameStore, cfg: EvalConfig,
                   lat: Tensor | None = None) -> dict[str, Any]:
    """AUROC of surprise on injected same-episode cuts (>= cut_gap frames away) vs normal."""
    lat = encode_all(model, store.frames, cfg.batch) if lat is None else lat
    t = _transitions(store, cfg)
    ep = store.episodes()
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    src, cut = [], []
    for ti in t.tolist():
        far = ((ep == ep[ti + 1]) & ((torch.arange(len(ep)) - (ti + 1)).abs() >= cfg.cut_gap))
        far = far.nonzero().flatten()
        if len(far):
            src.append(ti)
            cut.append(int(far[torch.randint(len(far), (), generator=gen)]))
    if not src:
        return {"model": float("nan"), "copy_last": float("nan"), "n_cuts": 0}
    ts, tc = torch.tensor(src), torch.tensor(cut)
    acts, conds = store.action_id[ts + 1], store.vector[ts + 1]
    pred, _ = predict_all(model, lat[ts], acts, conds, cfg.batch)
    normal = metrics.patch_surprise_torch(pred, lat[ts + 1]).numpy()
    cuts = metrics.patch_surprise_torch(pred, lat[tc]).numpy()
    copy_n = metrics.patch_surprise_torch(lat[ts], lat[ts + 1]).numpy()
    copy_c = metrics.patch_surprise_torch(lat[ts], lat[tc]).numpy()
    pct = np.percentile(normal, [50, 95, 99, 99.9])
    out = {"model": metrics.auroc(normal, cuts), "copy_last": metrics.auroc(copy_n, copy_c),
           "n_cuts": len(src), "normal_pct": {"p50": float(pct[0]), "p95": float(pct[1]),
                                              "p99": float(pct[2]), "p99.9": float(pct[3])},
           "cuts_above_p99.9": float(np.mean(cuts > pct[3])),
           "_normal": normal, "_cuts": cuts}
    out["z"] = _surprise_z_auroc(model, store, cfg, lat, ts, tc, pred)
    return out


def _surprise_z_auroc(model: IWM, store: FrameStore, cfg: EvalConfig, lat: Tensor,
                      ts: Tensor, tc: Tensor, pred: Tensor) -> dict[str, Any]:
    """The AUROC of :class:`~iwm_bus.metrics.SurpriseZ` on the same cuts, each stream state
    built from the ``z_history`` linked transitions before the scored one."""
    h = cfg.z_history
    back = torch.arange(-h, 0)  # the history's transitions t - h .. t - 1
    starts = ts[:, None] + back  # (B, h)
    ok = (starts >= 0).all(1)
    ok &= store.linked[(starts + 1).clamp(min=0)].all(1)
    if not ok.any():
        return {"model": float("nan"), "n_cuts": 0}
    starts, ts, tc, pred = starts[ok], ts[ok], tc[ok], pred[ok]
    flat_s = starts.flatten()
    hp, _ = predict_all(model, lat[flat_s], store.action_id[flat_s + 1],
                        store.vector[flat_s + 1], cfg.batch)
    hist = metrics.surprise_torch(hp, lat[flat_s + 1]).numpy().reshape(len(ts), h, -1)
    sz = metrics.SurpriseZ(warmup=min(h, metrics.SurpriseZ().warmup))
    for k in range(h):
        sz.update(hist[:, k])
    normal = sz.score(metrics.surprise_torch(pred, lat[ts + 1]).numpy())
    cuts = sz.score(metrics.surprise_torch(pred, lat[tc]).numpy())
    pct = np.percentile(normal, [50, 95, 99, 99.9])
    return {"model": metrics.auroc(normal, cuts), "n_cuts": len(ts),
            "normal_pct": {"p50": float(pct[0]), "p95": float(pct[1]), "p99": float(pct[2]),
                           "p99.9": float(pct[3])},
            "cuts_above_p99.9": float(np.mean(cuts > pct[3])),
            "_normal": normal, "_cuts": cuts}


# ----------------------------------------------------------------------------- counterfactuals


def oracle_rr(outcome_of: np.ndarray) -> np.ndarray:
    """The action-blind oracle's expected reciprocal rank of each action's true outcome.

    It ranks a state's distinct outcomes by how many actions lead to each (ties in random
    order), the best any ranking that ignores the action can do in expectation: with m
    outcomes shared by more actions and t tied with the truth, E[1/rank] = mean_j 1/(m + j).
    """
    counts = np.bincount(outcome_of)
    out = np.empty(len(outcome_of))
    for a, g in enumerate(outcome_of):
        m, t = int((counts > counts[g]).sum()), int((counts == counts[g]).sum())
        out[a] = np.mean(1.0 / (m + np.arange(1, t + 1)))
    return out


_DISCRIMINATION_ROWS = ("model", "copy_last", "chance", "oracle", "centroid", "shuffled",
                        "no_action", "inverse", "inverse_majority")


@torch.no_grad()
def action_discrimination(model: IWM, sets: Sequence[Any], cfg: EvalConfig) -> dict[str, Any]:
    """Rank of the true next latent among the distinct counterfactual next latents.

    ``sets``: objects with ``frame`` (H, W, 3) and ``next_frames`` (A, H, W, 3) uint8, the
    next frame under action a = 0..A-1 from one cloned state; states with one outcome are
    skipped. Each action of a state is one query (outcomes that many actions share weigh
    more). Beside the model: copy-last, chance, the action-blind oracle (:func:`oracle_rr`),
    the outcomes' centroid, the model fed another action (``shuffled``) and no action
    (``no_action``). ``inverse``: the inverse-dynamics head's accuracy on (state, outcome)
    pairs, right when its top action leads to that outcome, beside the best constant action
    (``inverse_majority``); None for a model without the head.
    """
    from train.counterfactual import first_actions, outcome_index

    s = model.config.img_size
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    rows: dict[str, list[float]] = {k: [] for k in _DISCRIMINATION_ROWS}
    const_hits = []
    for cs in sets:
        nxt = np.asarray(cs.next_frames)
        n_act = min(len(nxt), model.config.num_actions) if model.config.num_actions else len(nxt)
        inverse = outcome_index(nxt)[:n_act]
        n_distinct = int(inverse.max()) + 1
        if n_distinct < 2:
            continue
        frames = resize_u8(np.concatenate([np.asarray(cs.frame)[None],
                                           nxt[first_actions(inverse)]]), s)
        lat = encode_all(model, frames, cfg.batch)  # (1 + G, N, D)
        cur, cands = lat[:1], flat(lat[1:])  # (1, N, D), (G, F)
        truth = torch.as_tensor(inverse)
        others = torch.stack([cands[torch.arange(n_distinct) != g] for g in truth.tolist()])

        def rr(pred_flat: Tensor, cands: Tensor = cands, truth: Tensor = truth,
               others: Tensor = others) -> float:
            return rr_truth(pred_flat, cands[truth], others).mean().item()

        acts = torch.arange(n_act)
        use_acts = model.config.num_actions > 0
        pred, _ = predict_all(model, cur.expand(n_act, -1, -1), acts if use_acts else None,
                              None, cfg.batch)
        rows["model"].append(rr(flat(pred)))
        rows["copy_last"].append(rr(flat(cur).expand(n_act, -1)))
        rows["chance"].append(chance_mrr(n_distinct))
        rows["oracle"].append(float(oracle_rr(inverse).mean()))
        rows["centroid"].append(rr(cands.mean(0, keepdim=True).expand(n_act, -1)))
        if use_acts:
            shift = torch.randint(1, n_act, (n_act,), generator=gen)
            sh, _ = predict_all(model, cur.expand(n_act, -1, -1), (acts + shift) % n_act,
                                None, cfg.batch)
            rows["shuffled"].append(rr(flat(sh)))
            none, _ = predict_all(model, cur.expand(n_act, -1, -1),
                                  torch.full((n_act,), -1), None, cfg.batch)
            rows["no_action"].append(rr(flat(none)))
        same = inverse[:, None] == inverse[None, :]  # (A, A): action c leads where a does
        const_hits.append(same.mean(0))  # per constant action c: share of queries it gets
        if model.inverse is not None:
            probs = model.infer_action(cur.expand(n_distinct, -1, -1), lat[1:])  # (G, A)
            top = probs[:, :n_act].argmax(-1).numpy()  # (G,)
            rows["inverse"].append(float(np.mean(inverse[top[inverse]] == inverse)))
    if not rows["model"]:
        return {**{k: None for k in _DISCRIMINATION_ROWS}, "n_states": 0}
    out: dict[str, Any] = {k: (float(np.mean(v)) if v else None) for k, v in rows.items()}
    # no head: the row is n/a, its baseline too
    out["inverse_majority"] = float(np.max(np.mean(const_hits, 0))) if rows["inverse"] else None
    out["n_states"] = len(rows["model"])
    return out


def action_discrimination_games(model: IWM, games: Mapping[str, Sequence[Any]],
                                unseen: Collection[str], cfg: EvalConfig) -> dict[str, Any]:
    """:func:`action_discrimination` per game, and its means over the ``seen`` games (in the
    training mix; held-out episodes) and the ``unseen`` ones (never trained on), each game
    weighing the same; the top-level rows are the mean over all games."""
    per = {g: action_discrimination(model, sets, cfg) for g, sets in games.items()}
    out: dict[str, Any] = {}

    def mean(names: Sequence[str]) -> dict[str, Any]:
        res: dict[str, Any] = {}
        for k in _DISCRIMINATION_ROWS:
            vals = [per[g][k] for g in names if per[g].get(k) is not None]
            res[k] = float(np.mean(vals)) if vals else None
        res["n_states"] = int(sum(per[g]["n_states"] for g in names))
        res["games"] = list(names)
        return res

    out.update(mean(list(per)))
    for split, names in (("seen", [g for g in per if g not in unseen]),
                         ("unseen", [g for g in per if g in unseen])):
        if names:
            out[split] = mean(names)
    out["per_game"] = per
    return out


# ----------------------------------------------------------------------------- all


@torch.no_grad()
def evaluate(model: IWM, cfg: EvalConfig, sessions: FrameStore | None = None,
             images: FrameStore | None = None,
             counterfactuals: Mapping[str, Sequence[Any]] | Sequence[Any] = (),
             unseen: Collection[str] = ()) -> dict[str, Any]:
    """Every evaluation the data allows; keys starting with ``_`` hold raw series.

    ``counterfactuals``: counterfactual sets by game (or one list: one game, ``"all"``);
    ``unseen``: the games of those never trained on."""
    model.eval()
    out: dict[str, Any] = {}
    aug_src = images if images is not None else sessions
    if aug_src is not None and len(aug_src):
        aug = out["augmentation_mrr"] = augmentation_mrr(model, aug_src, cfg)
        aug["abstraction_index"] = metrics.abstraction_index(aug["model"], aug["chance"])
    if sessions is not None and sessions.linked.any():
        lat = encode_all(model, sessions.frames, cfg.batch)
        nl = next_latent_mrr(model, sessions, cfg, lat)
        sa = surprise_auroc(model, sessions, cfg, lat)
        su, un = nl.pop("_surprise"), nl.pop("_uncertainty")
        out["next_latent_mrr"], out["surprise_auroc"] = nl, sa
        corr = float(np.corrcoef(un, su)[0, 1]) if un.std() > 0 and su.std() > 0 else float("nan")
        out["uncertainty"] = {"corr_with_surprise": corr, "mean": float(un.mean()),
                              "surprise_mean": float(su.mean())}
        out["_surprise"], out["_uncertainty"] = su, un
        fl = lat.reshape(-1, lat.shape[-1])
        out["latents"] = {"std": float(fl.std(0).mean()),
                          "effective_rank": effective_rank(fl[torch.randperm(
                              len(fl), generator=torch.Generator().manual_seed(cfg.seed))[:2048]]),
                          "dim": int(lat.shape[-1])}
    if counterfactuals:
        games = counterfactuals if isinstance(counterfactuals, Mapping) \
            else {"all": counterfactuals}
        out["action_discrimination"] = action_discrimination_games(model, games, unseen, cfg)
    return out


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The results without raw series (what goes into JSON files and checkpoints)."""
    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if not k.startswith("_")}
        if isinstance(v, float) and math.isnan(v):
            return None
        return v
    return clean({k: v for k, v in results.items() if not k.startswith("_")})
