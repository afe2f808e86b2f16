"""The training run's configuration: one dataclass per component, composed in :class:`RunConfig`.

A run is ``RunConfig(train, model, objective, aug, masks)``: the model's :class:`IWMConfig`
fields, the :class:`~iwm_bus.model.Objective`, the Phase 1 augmentations and masks, and
:class:`TrainConfig` below. Presets (:mod:`train.presets`) are partial dicts of these;
``iwm-train`` applies preset, then ``IWM_*`` env vars, then flags. The resolved config is
saved in every checkpoint and next to the logs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from iwm_bus.actions import NUM_ACTIONS
from iwm_bus.model import IWMConfig, Objective
from train.augment import AugConfig
from train.masks import MaskConfig

__all__ = ["ADAMW_IMPLS", "RunConfig", "TrainConfig"]

ADAMW_IMPLS = ("fused", "foreach", "loop")


def _pos_int(owner: str, name: str, v: Any, minimum: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{owner}.{name} must be an int >= {minimum}, got {v!r}")


def _nonneg(owner: str, name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
        raise ValueError(f"{owner}.{name} must be a number >= 0, got {v!r}")


@dataclass
class TrainConfig:
    """The optimisation loop: data, schedule, checkpoints, logging."""

    # 1 = augmentation-conditioned JEPA on images; 3 = action-conditioned on sessions
    phase: int = 1
    # Phase 1 image folders (PNG/JPG, recursive) and/or session files/folders (seed: IWM_DATA_DIRS)
    data_dirs: list[str] = field(default_factory=list)
    # Phase 3 recorded sessions (.mcap files or folders)
    sessions: list[str] = field(default_factory=list)
    # where checkpoints, metrics.csv, TensorBoard events and config.json go
    out_dir: str = "runs/iwm"
    # cpu | cuda | cuda:N (with DDP each rank uses cuda:LOCAL_RANK)
    device: str = "cpu"
    # global batch size, split evenly over DDP ranks (seed: IWM_BATCH_SIZE)
    batch_size: int = 32
    # passes over the data (seed: IWM_EPOCHS); ignored when steps > 0
    epochs: int = 1
    # total optimiser steps (0 = epochs * batches per epoch)
    steps: int = 0
    # peak learning rate after warmup (seed: IWM_LR)
    lr: float = 1e-3
    # learning rate at the end of the cosine decay
    min_lr: float = 1e-5
    # linear warmup steps
    warmup_steps: int = 50
    # AdamW weight decay at step 0 and at the end (cosine schedule, I-JEPA 0.04 -> 0.4)
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    # gradient-norm clip (0 = off)
    clip_grad: float = 1.0
    # seed of everything random (init, data order, augmentations, masks, bootstrap)
    seed: int = 0
    # Phase 3: transitions per training sequence (teacher forcing + K-1 rollout steps)
    k_steps: int = 2
    # action terms (objective.cf_weight): counterfactual states a step, read from the
    # ``.cf.npz`` sidecars beside the sessions (``train.record --counterfactual``)
    cf_states: int = 0
    # at most this many distinct next frames of a state go into a step
    cf_outcomes: int = 8
    # queries a state by random actions, beside one per kept outcome
    cf_extra: int = 2
    # action terms: the share of samples (factual and counterfactual) mirrored left to right,
    # their action ids mirrored too (LEFT <-> RIGHT; needs the shared 18-id vocabulary), and
    # the share recoloured (channels permuted and/or inverted): train/look.py
    mirror_p: float = 0.0
    recolour_p: float = 0.0
    # start from this checkpoint's weights (e.g. a Phase 1 model for Phase 3)
    init_from: str | None = None
    # take init_from's predictor too (False: its encoder only, a new predictor; a predictor
    # trained on regression alone has learned to copy the frame, a trap for the action terms)
    init_predictor: bool = True
    # save a checkpoint every this many steps (and at the end)
    ckpt_every: int = 200
    # log metrics every this many steps
    log_every: int = 10
    # at most this many frames are loaded (0 = all)
    max_frames: int = 0
    # session files decoded at once by spawned processes when the data loads (1 = in process)
    load_workers: int = 1
    # wall-clock budget of the training loop in minutes (0 = none; not with ddp): after
    # FIT_AFTER steps (or a tenth of the budget) the schedule's total (LR, weight decay, EMA)
    # is cut to the steps that fit, at most ``steps``
    minutes: float = 0.0
    # bf16 autocast on CUDA
    amp: bool = True
    # bf16 autocast on a CPU too (AVX512-BF16 here: a ViT-Ti step ~2-3x faster than fp32)
    cpu_amp: bool = False
    # AdamW implementation: fused (one kernel over all parameters, CPU and CUDA), foreach (a
    # few kernels an update) or loop (several ops per parameter: torch's CPU default and
    # what the trainer ran before issue 24); the same update within float rounding
    adamw: str = "fused"
    # use torch.distributed as set up by torchrun (RANK, WORLD_SIZE, LOCAL_RANK)
    ddp: bool = False
    # show a tqdm progress bar
    progress: bool = True

    def __post_init__(self) -> None:
        o = "TrainConfig"
        if self.phase not in (1, 3):
            raise ValueError(f"{o}.phase must be 1 or 3, got {self.phase!r}")
        for name in ("batch_size", "epochs", "k_steps", "ckpt_every", "log_every"):
            _pos_int(o, name, getattr(self, name))
        for name in ("load_workers", "cf_outcomes"):
            _pos_int(o, name, getattr(self, name))
        for name in ("steps", "warmup_steps", "seed", "max_frames", "cf_states", "cf_extra"):
            _pos_int(o, name, getattr(self, name), 0)
        for name in ("lr", "min_lr", "weight_decay", "weight_decay_end", "clip_grad", "minutes"):
            _nonneg(o, name, getattr(self, name))
        for name in ("mirror_p", "recolour_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{o}.{name}={getattr(self, name)} must be in [0, 1]")
        if self.min_lr > self.lr:
            raise ValueError(f"{o}.min_lr={self.min_lr} must be <= lr={self.lr}")
        if self.adamw not in ADAMW_IMPLS:
            raise ValueError(f"{o}.adamw must be one of {ADAMW_IMPLS}, got {self.adamw!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"{o}.device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.minutes and self.ddp:  # each rank would time itself and fit its own total
            raise ValueError(f"{o}.minutes does not work with ddp: the ranks' schedules would "
                             "differ; give --steps instead")
        if self.phase == 1 and not self.data_dirs:
            raise ValueError(f"{o}.data_dirs is empty: Phase 1 needs image folders or sessions "
                             "(--data_dirs or IWM_DATA_DIRS)")
        if self.phase == 3 and not self.sessions:
            raise ValueError(f"{o}.sessions is empty: Phase 3 needs recorded sessions (--sessions)")


_PARTS = {"train": TrainConfig, "model": IWMConfig, "objective": Objective, "aug": AugConfig,
          "masks": MaskConfig}


def _build(cls: type, d: Mapping[str, Any], where: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {where} keys {unknown}; known keys: {sorted(known)}")
    kwargs = {k: tuple(v) if isinstance(v, list) and k not in ("data_dirs", "sessions") else v
              for k, v in d.items()}
    return cls(**kwargs)


@dataclass
class RunConfig:
    """Everything a training run needs; ``to_dict``/``from_dict`` round-trip it."""

    train: TrainConfig
    model: IWMConfig
    objective: Objective = field(default_factory=Objective)
    aug: AugConfig = field(default_factory=AugConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)

    def __post_init__(self) -> None:
        obj, tc = self.objective, self.train
        if obj.action_terms and tc.phase != 3:
            raise ValueError("objective.cf_weight / temporal_weight train on recorded sessions: "
                             "set train.phase 3")
        if bool(obj.cf_weight) != bool(tc.cf_states):
            raise ValueError(f"objective.cf_weight={obj.cf_weight} and train.cf_states="
                             f"{tc.cf_states} go together: both > 0 (counterfactual term on) "
                             "or both 0")
        if obj.cf_weight and tc.cf_outcomes < 2:
            raise ValueError(f"train.cf_outcomes={tc.cf_outcomes} must be >= 2: the "
                             "counterfactual term tells apart two or more outcomes")
        if (tc.mirror_p or tc.recolour_p) and not obj.action_terms:
            raise ValueError("train.mirror_p / recolour_p change the looks of the action terms' "
                             "samples: they need objective.cf_weight or temporal_weight")
        if tc.mirror_p and self.model.num_actions != NUM_ACTIONS:
            raise ValueError(f"train.mirror_p mirrors the shared vocabulary's {NUM_ACTIONS} "
                             f"action ids; model.num_actions is {self.model.num_actions}")
        if obj.inverse_weight and not self.model.inverse_dynamics:
            raise ValueError("objective.inverse_weight needs model.inverse_dynamics (the head "
                             "it trains)")
        if obj.inverse_weight and not obj.action_terms:
            raise ValueError("objective.inverse_weight is an action term: it needs "
                             "objective.cf_weight or temporal_weight")
        if self.objective.views_nce_weight:
            if self.aug.target_views < 2:
                raise ValueError("objective.views_nce_weight needs aug.target_views >= 2: the "
                                 "InfoNCE term tells apart the targets of one source view")
            if not self.aug.condition:
                raise ValueError("objective.views_nce_weight needs aug.condition: without the "
                                 "parameters no prediction can tell its target from the others")
        if self.train.batch_size % self.aug.target_views:
            raise ValueError(f"aug.target_views={self.aug.target_views} does not divide "
                             f"train.batch_size={self.train.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in _PARTS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
        """Build from nested dicts; unknown sections or keys raise ValueError naming them."""
        unknown = sorted(set(d) - set(_PARTS))
        if unknown:
            raise ValueError(f"unknown config sections {unknown}; known: {sorted(_PARTS)}")
        parts = {name: _build(cls_, d.get(name, {}), name) for name, cls_ in _PARTS.items()}
        return cls(**parts)
