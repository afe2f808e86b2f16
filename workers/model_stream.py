"""One world model's view of the frame stream: encode, predict, surprise, MRR.

The encoder worker holds one :class:`ModelStream` per model it serves: one normally, two with
``--dual`` (the equivariant stream for control, the semantic one for the LLM; issue 11).
Each keeps what its model's numbers depend on (the previous frame's patch latents, the MRR
bank, the rollout chains, the running MRR, the per-patch surprise statistics) and turns a
frame plus the action that produced it into one :class:`StreamResult`. Frames are read from
the ring and preprocessed once for all streams (:func:`shared_input`); nothing here touches a
socket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from iwm_bus import metrics
from iwm_bus.model import IWM
from workers.stream import HORIZON, MRR_WINDOW, Action, HorizonMRR, LatentBank, frame_key

__all__ = ["MAX_GAP", "ModelStream", "StreamResult", "checkpoint_abstraction", "finite",
           "shared_input", "step_batch"]

#: realtime: a frame more than this many frames after the last processed one gets no
#: surprise (nil); closer ones are predicted through the skipped frames
MAX_GAP = 8


def finite(x: float | None) -> float | None:
    """``x`` as a float, or None when it is None, NaN or infinite (nil on the wire)."""
    return None if x is None or not math.isfinite(x) else float(x)


def checkpoint_abstraction(model: IWM) -> float | None:
    """:func:`iwm_bus.metrics.abstraction_index` of a checkpoint's own held-out evaluation
    (the eval summary ``train.export`` puts in it); None without one, and None for a model
    never trained on augmented views (Phase 3 alone, like iwm-default-v1): its predictor
    ignoring an augmentation it never saw says nothing about where it sits."""
    prov = model.provenance or {}
    run = prov.get("run_config") or {}
    views = (run.get("train") or {}).get("phase") == 1 or \
        bool((run.get("objective") or {}).get("views_weight"))
    if not views:
        return None
    aug = (prov.get("eval") or {}).get("augmentation_mrr") or {}
    try:
        return metrics.abstraction_index(float(aug["model"]), float(aug["chance"]))
    except (KeyError, TypeError, ValueError):
        return None


def shared_input(models: list[IWM], frame: Any) -> torch.Tensor | None:
    """The frame preprocessed once for all ``models`` (same device, input size and pixel
    normalisation, checked when the worker starts), or None when each model must take the
    raw frame itself (CUDA graphs capture the preprocessing with the encoder)."""
    first = models[0]
    if first._use_graphs():
        return None
    return first.preprocess(frame)


@dataclass(frozen=True)
class StreamResult:
    """One model's numbers for one frame (what the worker publishes for it)."""

    z_cls: np.ndarray  # (D,)
    patches: np.ndarray  # (N, D) float32
    surprise: float | None  # nil: no prediction (first frame, or a gap over MAX_GAP)
    surprise_z: float | None  # nil while warming up and for predictions through a gap
    pred_seq: int | None  # the frame the prediction was made from
    rr: float | None  # reciprocal rank among the bank
    mrr: float | None  # running mean of rr
    k: int  # bank size the rank was taken in


class ModelStream:
    """One model's per-frame state and step (see the module doc)."""

    def __init__(self, model: IWM, name: str, mrr_bank: int, horizon: int = HORIZON) -> None:
        """``horizon``: the rollout horizons measured (``HorizonMRR``); 1 = the per-frame MRR
        alone, no rollout chains (a stream whose model answers no RPC ``rollout``)."""
        self.model, self.name = model, name
        self.bank = LatentBank(mrr_bank, model.num_patches * model.embed_dim)
        self.horizon = HorizonMRR(horizon)
        self.mrr = metrics.RunningMean(MRR_WINDOW)
        self.surprise_z = metrics.SurpriseZ()
        self.surprise_last: float | None = None
        self.abstraction_index = checkpoint_abstraction(model)
        self._prev: tuple[int, np.ndarray] | None = None  # (seq, patches) last processed

    @property
    def variant(self) -> str:
        return self.model.config.variant

    def clear(self) -> None:
        """A new frame stream (the capture restarted): forget everything frame-related."""
        self._prev = None
        self.bank.clear()
        self.horizon.clear()
        self.surprise_z.reset()

    def step(self, seq: int, frame: Any, x: torch.Tensor | None, action: Action) -> StreamResult:
        """Encode frame ``seq`` (``x``: its shared preprocessed input, or None to take the raw
        ``frame``), score the prediction made from the previous frame under ``action``,
        and remember it for the next."""
        z_t, patches_t = self.model.encode(frame) if x is None \
            else self.model.encode_input(x)  # (1, D), (1, N, D); both under no_grad
        z = z_t[0].cpu().numpy()  # (D,)
        p = patches_t[0].cpu().numpy()  # (N, D)
        starts = self.starts(seq)
        preds = None if starts is None else self._predict(starts, action, self.gap(seq))
        return self.finish(seq, z, p, preds)

    def starts(self, seq: int) -> np.ndarray | None:
        """The rows frame ``seq`` is predicted from, (1 + C, N, D): the last processed
        frame's patch latents, then the C live rollout chains (advanced in the same
        predictor call); None when it gets no prediction (the first frame, or a gap over
        ``MAX_GAP``)."""
        if self._prev is None or seq - self._prev[0] > MAX_GAP:
            return None
        return np.stack([self._prev[1], *self.horizon.chains()])

    def gap(self, seq: int) -> int:
        """Frames from the last processed one to ``seq`` (1 in lossless mode)."""
        assert self._prev is not None
        return seq - self._prev[0]

    def finish(self, seq: int, z: np.ndarray, p: np.ndarray,
               preds: np.ndarray | None) -> StreamResult:
        """Frame ``seq``'s numbers from its latents ``z`` (D,) / ``p`` (N, D) and ``preds``,
        the rows of :meth:`starts` predicted forward to it (None: no prediction); remembers
        the frame for the next."""
        key = frame_key(p)  # (N*D,): what MRR ranks
        surprise = surprise_z = rr = pred_seq = None
        if preds is not None:
            assert self._prev is not None
            pred_seq = self._prev[0]
            pred = preds[0]  # (N, D)
            errors = metrics.patch_errors(pred, p)  # (N,)
            surprise = metrics.errors_surprise(errors)
            if seq - pred_seq == 1:  # a prediction through skipped frames errs more by
                surprise_z = finite(self.surprise_z(errors))  # construction: not comparable
            rr = self.bank.rank(frame_key(pred), key)  # among the k most recent frames
            self.mrr.update(rr)
            self.horizon.observe(seq - pred_seq, pred, rr, list(preds[1:]), key, self.bank)
            self.surprise_last = surprise
        else:
            self.horizon.clear()
        k = len(self.bank)
        self.bank.add(key)
        self._prev = (seq, p)
        return StreamResult(z, p, surprise, surprise_z, pred_seq, rr,
                            finite(self.mrr.value) if rr is not None else None, k)

    def _predict(self, starts: np.ndarray, action: Action, steps: int) -> np.ndarray:
        """The patch latents ``steps`` frames after each of ``starts`` (B, N, D), under the
        same action (skipped frames in realtime mode are predicted through, held)."""
        b = len(starts)
        ids = np.full(b, action.action_id) if self.model.config.num_actions else None
        cond = np.repeat(action.cond[None], b, axis=0)  # (B, C)
        z_prev = starts.mean(1)  # (B, D)
        if steps == 1:
            pred = self.model.predict(z_prev, starts, cond=cond, action_id=ids)
            return pred.patches.cpu().numpy()
        roll = self.model.rollout(z_prev, starts,
                                  cond_seq=np.repeat(cond[:, None], steps, axis=1),
                                  action_seq=None if ids is None else np.repeat(ids[:, None],
                                                                               steps, axis=1))
        return roll.patches_seq[:, -1].cpu().numpy()

    def stats(self) -> dict[str, Any]:
        """This stream's part of ``iwm.stats``."""
        return {"variant": self.variant, "mrr": finite(self.mrr.value),
                "surprise_last": self.surprise_last,
                "mrr_horizon": [finite(v) for v in self.horizon.values()],
                "abstraction_index": self.abstraction_index}


def step_batch(streams: list[ModelStream], seqs: list[int], frames: np.ndarray,
               actions: list[Action]) -> list[StreamResult]:
    """:meth:`ModelStream.step` for several streams of one model at once (a multi-stream
    worker): frame ``seqs[i]`` of ``streams[i]``, taken under ``actions[i]``. One encoder
    call for all ``frames`` (B, H, W, 3) (one size: the caller groups them by size), and one
    predictor call for every stream's one-step prediction (its own previous latent, rollout
    chains and action, row by row); a prediction through skipped frames (realtime) is a
    rollout of its own. Each stream's numbers are those its own :meth:`ModelStream.step`
    gives, to floating-point tolerance."""
    model = streams[0].model
    if any(st.model is not model for st in streams) or len({id(st) for st in streams}) \
            != len(streams):
        raise ValueError("step_batch: one model, and each stream at most once a batch")
    z_t, patches_t = model.encode(frames)  # (B, D), (B, N, D)
    zs, ps = z_t.cpu().numpy(), patches_t.cpu().numpy()
    preds: list[np.ndarray | None] = [None] * len(streams)
    rows, owners = [], []  # the one-step rows: (1 + C_i, N, D) each, and their stream
    for i, (st, seq) in enumerate(zip(streams, seqs, strict=True)):
        starts = st.starts(seq)
        if starts is None:
            continue
        if st.gap(seq) == 1:
            rows.append(starts)
            owners.append(i)
        else:
            preds[i] = st._predict(starts, actions[i], st.gap(seq))
    if rows:
        starts = np.concatenate(rows)  # (R, N, D)
        cond = np.concatenate([np.repeat(actions[i].cond[None], len(r), axis=0)
                               for i, r in zip(owners, rows, strict=True)])  # (R, C)
        ids = np.concatenate([np.full(len(r), actions[i].action_id)
                              for i, r in zip(owners, rows, strict=True)]) \
            if model.config.num_actions else None  # (R,)
        out = model.predict(starts.mean(1), starts, cond=cond, action_id=ids)
        out = out.patches.cpu().numpy()  # (R, N, D)
        bounds = np.cumsum([0, *(len(r) for r in rows)])
        for j, i in enumerate(owners):
            preds[i] = out[bounds[j]:bounds[j + 1]]
    return [st.finish(seq, zs[i], ps[i], preds[i])
            for i, (st, seq) in enumerate(zip(streams, seqs, strict=True))]
