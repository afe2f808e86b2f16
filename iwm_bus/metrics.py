"""World-model metrics: surprise and (mean) reciprocal rank. numpy only at import.

Defined once here and used by the worker (per frame), the trainer (evaluation) and the
agent side. Every function takes numpy arrays (float32 or float64; anything ``np.asarray``
accepts); the ``*_torch`` variants take tensors and import torch only when called.

**Surprise** between a predicted latent ``p`` and the observed one ``o`` (both width D)::

    surprise(p, o) = || LN(p) - LN(o) ||_2 / sqrt(D)

where ``LN(x) = (x - mean(x)) / sqrt(var(x) + eps)`` is a layer norm without affine. Both
normalised vectors have norm sqrt(D), so surprise is the RMS per-dimension difference and lies
in [0, 2] whatever D is; it equals ``sqrt(2 * (1 - r))`` with r the Pearson correlation of
p and o: 0 = perfect prediction, ~1.41 = unrelated, 2 = anti-correlated. (The seed guide used
raw ``||p - o||``, whose scale depends on D and the encoder; thresholds such as its
``> 2.0`` must be re-chosen on this scale.)

**Standardised surprise** (``surprise_z``, :class:`SurpriseZ`): a frame's surprise against
what this stream's model usually gets wrong *at each patch*. With ``e_i`` the per-patch
surprise (:func:`patch_errors`) and ``mu_i``, ``sd_i`` an exponential moving mean / standard
deviation of ``e_i`` over the stream's recent frames (rate ``alpha``)::

    surprise_z = RMS_i( max(0, (e_i - mu_i) / (sd_i + floor)) )

Raw surprise has a different scale in every game (a scrolling shooter's ordinary error is a
still puzzle's scene cut), so one threshold on it cannot separate the two; surprise_z is in
units of the stream's own spread. The moving statistics learn from clipped errors (at most
``clip`` spreads above the mean), so one cut does not blind them for the next frames. It is
NaN for the first ``warmup`` frames of a stream.

**Reciprocal rank** of the observed latent among ``[observed] + candidates`` ranked by
cosine similarity to the prediction: ``1 / rank`` with rank 1 the most similar. Ties count
against the observed latent (pessimistic), so a candidate identical to it costs a rank:
leave the observed latent itself out of the candidate bank. **MRR** is the mean over a batch;
the IWM evaluation protocol uses a bank of 256 candidates. K (the number of candidates) is
part of any reported MRR: with K candidates chance level is about ``H(K+1) / (K+1)``.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np

__all__ = [
    "RunningMean",
    "abstraction_index",
    "SurpriseZ",
    "auroc",
    "patch_surprise",
    "patch_surprise_torch",
    "cosine_similarity",
    "layer_norm",
    "mrr",
    "errors_surprise",
    "patch_errors",
    "reciprocal_rank",
    "reciprocal_ranks",
    "reciprocal_ranks_torch",
    "surprise",
    "surprise_torch",
]

EPS = 1e-6
TIES = ("against", "truth")


def _as_float(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False)


def layer_norm(x: Any, eps: float = EPS) -> np.ndarray:
    """Zero mean, unit variance along the last axis (no affine); float64."""
    x = _as_float(x, "x")
    mu = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps)


def surprise(pred: Any, observed: Any) -> float | np.ndarray:
    """Surprise (module docstring): (D,) -> float, (B, D) -> (B,) float64 array."""
    p, o = _as_float(pred, "pred"), _as_float(observed, "observed")
    if p.shape != o.shape or p.ndim not in (1, 2) or p.shape[-1] == 0:
        raise ValueError(f"pred and observed must both be (D,) or (B, D), got {p.shape} "
                         f"and {o.shape}")
    d = p.shape[-1]
    dist = np.linalg.norm(layer_norm(p) - layer_norm(o), axis=-1) / math.sqrt(d)
    return float(dist) if p.ndim == 1 else dist


def patch_errors(pred: Any, observed: Any) -> np.ndarray:
    """:func:`surprise` of each patch: (N, D) -> (N,), (B, N, D) -> (B, N), float64."""
    p, o = _as_float(pred, "pred"), _as_float(observed, "observed")
    if p.shape != o.shape or p.ndim not in (2, 3):
        raise ValueError(f"pred and observed must both be (N, D) or (B, N, D), got {p.shape} "
                         f"and {o.shape}")
    return np.linalg.norm(layer_norm(p) - layer_norm(o), axis=-1) / math.sqrt(p.shape[-1])


def patch_surprise(pred: Any, observed: Any) -> float | np.ndarray:
    """Surprise of a frame's patch latents: the RMS over patches of :func:`surprise`.

    (N, D) -> float, (B, N, D) -> (B,). With N = 1 it is :func:`surprise` of that token.
    """
    return errors_surprise(patch_errors(pred, observed))


def errors_surprise(errors: Any) -> float | np.ndarray:
    """:func:`patch_surprise` from per-patch errors already at hand (:func:`patch_errors`):
    their RMS over patches; (N,) -> float, (B, N) -> (B,)."""
    out = np.sqrt(np.mean(_as_float(errors, "errors") ** 2, axis=-1))
    return float(out) if out.ndim == 0 else out


def abstraction_index(aug_mrr: float, chance: float) -> float:
    """Where a world model sits between invariant (1) and equivariant (0).

    From its augmentation MRR (IWM, Garrido et al. 2024: how well the predictor, told the
    augmentation, picks the right target view among ``bank`` views of the same image with
    other colour jitter; ``train.evaluate.augmentation_mrr``) and that bank's chance MRR:
    ``1 - clip((aug_mrr - chance) / (1 - chance), 0, 1)``. 1 = the prediction ignores the
    conditioning (nothing beyond chance: abstract, invariant), 0 = it always picks the
    right view (equivariant).
    """
    if not (0 < chance < 1) or not math.isfinite(aug_mrr):
        raise ValueError(f"need a finite aug_mrr and 0 < chance < 1, got {aug_mrr}, {chance}")
    return 1.0 - min(1.0, max(0.0, (aug_mrr - chance) / (1.0 - chance)))


def auroc(negatives: Any, positives: Any) -> float:
    """Area under the ROC curve of scores: P(positive > negative), ties counting 1/2."""
    neg, pos = _as_float(negatives, "negatives").ravel(), _as_float(positives, "positives").ravel()
    if not len(neg) or not len(pos):
        raise ValueError("auroc needs at least one negative and one positive score")
    allv = np.concatenate([neg, pos])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    i = 0
    while i < len(sorted_v):  # average ranks over ties
        j = i
        while j + 1 < len(sorted_v) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r_pos = ranks[len(neg):].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def cosine_similarity(a: Any, b: Any) -> np.ndarray:
    """Cosine similarity along the last axis with broadcasting; zero vectors give 0."""
    a, b = _as_float(a, "a"), _as_float(b, "b")
    na = np.linalg.norm(a, axis=-1, keepdims=True)
    nb = np.linalg.norm(b, axis=-1, keepdims=True)
    return np.sum((a / np.maximum(na, EPS)) * (b / np.maximum(nb, EPS)), axis=-1)


def _check_ties(ties: str) -> None:
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")


def reciprocal_ranks(pred: Any, observed: Any, candidates: Any,
                     ties: str = "against") -> np.ndarray:
    """Per-row reciprocal rank, (B,) float64.

    pred (B, D), observed (B, D), candidates (B, K, D) per row or (K, D) shared by all rows
    (K may be 0, giving 1.0). ``ties``: ``"against"`` the observed latent (a candidate as
    similar as it costs a rank) or in favour of the ``"truth"`` (only strictly more similar
    candidates count), for banks that may hold copies of the observed latent.
    """
    _check_ties(ties)
    p, o, c = _as_float(pred, "pred"), _as_float(observed, "observed"), _as_float(candidates, "candidates")
    if p.ndim != 2 or o.shape != p.shape:
        raise ValueError(f"pred and observed must both be (B, D), got {p.shape} and {o.shape}")
    b, d = p.shape
    if c.ndim == 2:
        c = np.broadcast_to(c, (b, *c.shape))
    if c.ndim != 3 or c.shape[0] != b or c.shape[2] != d:
        raise ValueError(f"candidates must be ({b}, K, {d}) or (K, {d}), got {c.shape}")
    # The observed latent and the candidates are scored by one expression, so identical
    # vectors get identical scores and the tie rule below is exact.
    pool = np.concatenate([o[:, None], c], axis=1)  # (B, 1 + K, D)
    sims = cosine_similarity(pool, p[:, None])  # (B, 1 + K)
    beats = sims[:, 1:] >= sims[:, :1] if ties == "against" else sims[:, 1:] > sims[:, :1]
    rank = 1 + np.sum(beats, axis=1)  # (B,)
    return 1.0 / rank


def reciprocal_rank(pred: Any, observed: Any, candidates: Any, ties: str = "against") -> float:
    """Reciprocal rank for one prediction: pred (D,), observed (D,), candidates (K, D)."""
    p, o = np.asarray(pred), np.asarray(observed)
    c = np.asarray(candidates)
    if p.ndim != 1 or c.ndim != 2:
        raise ValueError(f"pred must be (D,) and candidates (K, D), got {p.shape} and {c.shape}")
    return float(reciprocal_ranks(p[None], o[None], c[None], ties)[0])


def mrr(pred: Any, observed: Any, candidates: Any) -> float:
    """Mean reciprocal rank over a batch (see :func:`reciprocal_ranks` for the shapes)."""
    return float(np.mean(reciprocal_ranks(pred, observed, candidates)))


class RunningMean:
    """Mean of the values seen so far, or of the last ``window`` values.

    ``update(x)`` takes a number or an array of numbers (each counts once) and returns the
    current mean; non-finite values raise ValueError. ``value`` is NaN before any update.
    """

    def __init__(self, window: int | None = None) -> None:
        if window is not None and (isinstance(window, bool) or window < 1):
            raise ValueError(f"window must be None or >= 1, got {window!r}")
        self.window = window
        self.count = 0  # values seen in total
        self._total = 0.0  # sum of all values (window None) or of the window's values
        self._since_exact = 0  # updates since the windowed sum was last recomputed exactly
        self._recent: deque[float] = deque(maxlen=window)

    def update(self, x: Any) -> float:
        vals = np.asarray(x, dtype=np.float64).ravel()
        if not np.isfinite(vals).all():
            raise ValueError(f"RunningMean.update got a non-finite value: {x!r}")
        self.count += vals.size
        if self.window is None:
            self._total += math.fsum(vals.tolist())
            return self.value
        for v in vals.tolist():  # O(1) per value: add the new one, subtract the evicted one
            if len(self._recent) == self.window:
                self._total -= self._recent[0]
            self._recent.append(v)
            self._total += v
        self._since_exact += vals.size
        if self._since_exact >= self.window:  # bound the rounding drift of the running sum
            self._total, self._since_exact = math.fsum(self._recent), 0
        return self.value

    @property
    def value(self) -> float:
        n = self.count if self.window is None else len(self._recent)
        return self._total / n if n else math.nan

    def reset(self) -> None:
        self.count, self._total, self._since_exact = 0, 0.0, 0
        self._recent.clear()

    def __repr__(self) -> str:
        return f"RunningMean(window={self.window}, count={self.count}, value={self.value:.4f})"


class SurpriseZ:
    """Standardised surprise of a frame stream (module docstring), one state per stream.

    ``errors`` are per-patch surprises, (N,) for one stream or (B, N) for B independent
    streams (evaluation scores many at once). ``score`` standardises against the statistics
    so far; ``update`` then folds the frame in. The defaults were chosen on held-out play
    of the game mix (docs/agent.md).
    """

    def __init__(self, alpha: float = 0.1, floor: float = 0.03, clip: float = 3.0,
                 warmup: int = 10) -> None:
        if not 0 < alpha <= 1 or floor <= 0 or clip <= 0 or warmup < 1:
            raise ValueError(f"SurpriseZ needs 0 < alpha <= 1, floor > 0, clip > 0, "
                             f"warmup >= 1; got {alpha}, {floor}, {clip}, {warmup}")
        self.alpha, self.floor, self.clip, self.warmup = alpha, floor, clip, warmup
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self._mu: np.ndarray | float = 0.0
        self._var: np.ndarray | float = 0.0

    def _spread(self) -> np.ndarray | float:
        return np.sqrt(self._var) + self.floor

    def score(self, errors: Any) -> float | np.ndarray:
        """surprise_z of ``errors`` (NaN while warming up); the state is not changed."""
        e = _as_float(errors, "errors")
        if self.count < self.warmup:
            out = np.full(e.shape[:-1], math.nan)
        else:
            z = np.maximum((e - self._mu) / self._spread(), 0.0)
            out = np.sqrt(np.mean(z ** 2, axis=-1))
        return float(out) if out.ndim == 0 else out

    def update(self, errors: Any) -> None:
        """Fold one frame's ``errors`` into the moving mean and variance (a frame with a
        non-finite error is skipped: it would poison the statistics for good)."""
        e = _as_float(errors, "errors")
        if not np.isfinite(e).all():
            return
        if self.count >= self.warmup:
            e = np.minimum(e, self._mu + self.clip * self._spread())
        a = max(self.alpha, 1.0 / (self.count + 1))  # a plain mean until 1/alpha frames
        d = e - self._mu
        self._mu = self._mu + a * d
        self._var = (1 - a) * (self._var + a * d * d)
        self.count += 1

    def __call__(self, errors: Any) -> float | np.ndarray:
        """``score`` then ``update``: the online use, one frame at a time."""
        out = self.score(errors)
        self.update(errors)
        return out


# ----------------------------------------------------------------------------- torch versions


def surprise_torch(pred: Any, observed: Any) -> Any:
    """:func:`surprise` on tensors (..., D) -> (...), on their device, float32."""
    import torch.nn.functional as F

    d = pred.shape[-1]
    diff = F.layer_norm(pred.float(), (d,), eps=EPS) - F.layer_norm(observed.float(), (d,), eps=EPS)
    return diff.norm(dim=-1) / math.sqrt(d)


def patch_surprise_torch(pred: Any, observed: Any) -> Any:
    """:func:`patch_surprise` on tensors (..., N, D) -> (...), float32."""
    return surprise_torch(pred, observed).square().mean(-1).sqrt()


def reciprocal_ranks_torch(pred: Any, observed: Any, candidates: Any,
                           ties: str = "against") -> Any:
    """:func:`reciprocal_ranks` on tensors: pred/observed (B, D), candidates (B, K, D) or (K, D)."""
    import torch

    _check_ties(ties)
    import torch.nn.functional as F

    b = pred.shape[0]
    if candidates.ndim == 2:
        candidates = candidates.expand(b, *candidates.shape)
    pool = F.normalize(torch.cat([observed[:, None], candidates], dim=1).float(), dim=-1, eps=EPS)
    p = F.normalize(pred.float(), dim=-1, eps=EPS)
    sims = (pool * p[:, None]).sum(-1)  # (B, 1 + K)
    beats = sims[:, 1:] >= sims[:, :1] if ties == "against" else sims[:, 1:] > sims[:, :1]
    rank = 1 + beats.sum(1)  # (B,)
    return 1.0 / rank.float()
