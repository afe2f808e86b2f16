"""Named training presets: partial :class:`~train.config.RunConfig` dicts.

``iwm-train --preset NAME`` starts from one; env vars and flags override it.

- ``cpu-default``: the shipped default model: ``cpu-tiny``'s encoder with a 3-layer predictor,
  Phase 3 on the recorded game mix with change-weighted targets (``train/recipes/default.sh``).
- ``cpu-tiny``: ViT-Ti (6 blocks, patch 8) at 64 px, 4-layer predictor: minutes on 2 CPU cores.
- ``gpu-core``: ViT-S/16 at 224 px with the ``core`` 8-layer predictor (an H200 or similar).
- ``gpu-equivariant``: as gpu-core with the 16-layer ``equivariant`` predictor and strong
  destructive augmentations (IWM's equivariant recipe).
- ``gpu-invariant``: 4-layer ``invariant`` predictor, weak augmentations (no destructive ones).
- ``cpu-invariant`` / ``cpu-equivariant``: the two streams of the shipped dual-stream pair
  (issue 11, ``train/recipes/dual.sh``), each started from the shipped default's encoder with
  a new predictor and trained on the same game mix on actions (Phase 3) *and* augmentation
  views of the same frames (``views_weight``). ``invariant``: 4 layers, weak augmentations
  (colour jitter only) whose parameters the predictor is not told, so the encoder learns to
  ignore them; ``equivariant``: 16 narrow layers (96 wide: the compute of ~4 of width 192),
  strong + destructive augmentations, told to the predictor, whose views task is the
  next-frame call (``views_residual``: every token, as the change of the source view's;
  with I-JEPA block masks it had not begun to use the conditioning after 200 steps:
  augmentation MRR 0.0240 against chance 0.0239).
- ``cpu-actions-conv`` / ``gpu-actions-conv``: the action-aware default (issue 23): a small
  conv encoder with the counterfactual, temporal and inverse terms; the GPU one goes on from
  the shipped default (weights and predictor) at batch 256 + 256 states (``train/recipes/gpu.sh``).
- ``gpu-dual-invariant`` / ``gpu-dual-equivariant``: the same two models and objectives on one
  GPU: batch 256, up to 30k steps, usually cut by ``--minutes`` (``train/recipes/dual_gpu.sh``).
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["PRESETS", "preset"]

_TINY_MODEL = {"variant": "invariant", "encoder_name": "vit_tiny_patch16_224", "img_size": 64,
               "patch_size": 8, "encoder_depth": 6, "pred_depth": 4, "pred_dim": 192,
               "pred_heads": 3, "num_actions": 18}
_GPU_TRAIN = {"device": "cuda", "batch_size": 256, "lr": 1e-3, "warmup_steps": 500,
              "steps": 20000, "ckpt_every": 1000, "k_steps": 3}
_GUARD = {"var_weight": 1.0, "cov_weight": 0.005}  # VICReg collapse guard
# the dual-stream pair: Phase 3 + augmentation views, from the shipped default's encoder
_DUAL_TRAIN = {"phase": 3, "batch_size": 32, "lr": 5e-4, "warmup_steps": 50, "steps": 600,
               "ckpt_every": 100, "log_every": 20, "k_steps": 2}
_DUAL_OBJECTIVE = {**_GUARD, "change_weight": 2.0, "views_weight": 1.0}
# the same pair on one GPU (an H200 here): 8x the batch, a 16-core host decoding the data;
# ``--minutes`` fits the schedule to the time the machine is lent for
_DUAL_GPU_TRAIN = {**_DUAL_TRAIN, "device": "cuda", "batch_size": 256, "lr": 1e-3,
                   "warmup_steps": 300, "steps": 30000, "ckpt_every": 1000, "log_every": 100,
                   "load_workers": 8}
# the two streams' models, augmentations and losses (their presets add a schedule)
_INVARIANT = {
    "model": {**_TINY_MODEL, "variant": "invariant", "pred_depth": 4},
    "aug": {"gray_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0, "condition": False},
    "objective": _DUAL_OBJECTIVE,
}
_EQUIVARIANT = {
    "model": {**_TINY_MODEL, "variant": "equivariant", "pred_depth": 16, "pred_dim": 96},
    "aug": {"gray_p": 0.2, "blur_p": 0.5, "solarize_p": 0.2},
    "objective": {**_DUAL_OBJECTIVE, "views_residual": True},
}
_GPU_MODEL = {"encoder_name": "vit_small_patch16_224", "img_size": 224, "pred_dim": 384,
              "pred_heads": 6, "num_actions": 18}

# the action-aware default (issue 23): the cpu-default model with the action in every predictor
# block and an inverse-dynamics head, trained on counterfactual + temporal InfoNCE, inverse
# dynamics and a regression anchor (``iwm_bus.model.action_terms``); from the previous default
_ACTIONS_MODEL = {**_TINY_MODEL, "variant": "custom", "pred_depth": 3,
                  "action_every_layer": True, "local_mix": True, "inverse_dynamics": True,
                  "action_init_std": 1.0, "layer_cond_init_std": 0.02,
                  "ema_momentum_start": 0.98, "ema_momentum_end": 0.995}
_ACTIONS_OBJECTIVE = {**_GUARD, "change_weight": 2.0, "cf_weight": 1.0, "temporal_weight": 1.0,
                      "inverse_weight": 0.5, "anchor_weight": 1.0, "rollout_weight": 0.5,
                      "nce_temperature": 0.02}
_ACTIONS_TRAIN = {"phase": 3, "batch_size": 16, "cf_states": 16, "cf_outcomes": 6,
                  "cf_extra": 2, "lr": 1e-3, "warmup_steps": 30, "steps": 800,
                  "init_predictor": False,
                  "ckpt_every": 100, "log_every": 20, "cpu_amp": True}

# the same terms on the small conv encoder (``iwm_bus.model.conv_encoder``), trained from
# scratch: a 64-channel 8x8 map at 64 px and a 3-block predictor 128 wide (~0.9 M parameters)
_CONV_ACTIONS_MODEL = {**_ACTIONS_MODEL, "encoder_name": "iwm_conv64", "patch_size": None,
                       "encoder_depth": 2, "pred_dim": 128, "pred_heads": 4}

PRESETS: dict[str, dict[str, Any]] = {
    "cpu-actions-conv": {"model": _CONV_ACTIONS_MODEL,
                         "train": {**_ACTIONS_TRAIN, "batch_size": 24, "cf_states": 24,
                                   "warmup_steps": 100, "steps": 2200, "ckpt_every": 200},
                         "objective": {**_ACTIONS_OBJECTIVE, "nce_temperature": 0.1}},
    # the action-aware default (issue 23, train/recipes/actions.sh): ~1.5 s a step here;
    # ``--minutes`` fits the schedule to the time given
    "cpu-actions": {"model": _ACTIONS_MODEL, "train": _ACTIONS_TRAIN,
                    "objective": _ACTIONS_OBJECTIVE},
    # iwm-default-v3's conv model and terms on one GPU, going on from it (the lease plan's
    # default, train/recipes/gpu.sh): 10x the batch, so a few minutes of a lent GPU draw more
    # counterfactual states than v3's whole CPU schedule did
    "gpu-actions-conv": {"model": _CONV_ACTIONS_MODEL,
                         "objective": {**_ACTIONS_OBJECTIVE, "nce_temperature": 0.1},
                         "train": {**_ACTIONS_TRAIN, "device": "cuda", "batch_size": 256,
                                   "cf_states": 256, "lr": 5e-4, "warmup_steps": 100,
                                   "steps": 20000, "ckpt_every": 1000, "log_every": 100,
                                   "load_workers": 8, "init_predictor": True}},
    # the same on one GPU: 16x the batch
    "gpu-actions": {"model": _ACTIONS_MODEL, "objective": _ACTIONS_OBJECTIVE,
                    "train": {**_ACTIONS_TRAIN, "device": "cuda", "batch_size": 256,
                              "cf_states": 256, "lr": 1e-3, "warmup_steps": 300,
                              "steps": 20000, "ckpt_every": 1000, "log_every": 100,
                              "load_workers": 8}},
    # the shipped default (issue 10): Phase 3 on the recorded game mix, about an hour here
    # (iwm-default-v1 is its last step, 2400)
    "cpu-default": {
        "model": {**_TINY_MODEL, "variant": "custom", "pred_depth": 3},
        "train": {"phase": 3, "batch_size": 32, "lr": 5e-4, "warmup_steps": 100,
                  "steps": 2400, "ckpt_every": 200, "log_every": 20, "k_steps": 2},
        "objective": {**_GUARD, "change_weight": 2.0},
    },
    "cpu-invariant": {**_INVARIANT, "train": _DUAL_TRAIN},
    "cpu-equivariant": {**_EQUIVARIANT, "train": _DUAL_TRAIN},
    "gpu-dual-invariant": {**_INVARIANT, "train": _DUAL_GPU_TRAIN},
    "gpu-dual-equivariant": {**_EQUIVARIANT, "train": _DUAL_GPU_TRAIN},
    "cpu-tiny": {
        "model": _TINY_MODEL,
        "train": {"batch_size": 32, "lr": 5e-4, "warmup_steps": 50, "steps": 600,
                  "ckpt_every": 100, "k_steps": 2},
        "objective": _GUARD,
    },
    "gpu-core": {
        "model": {**_GPU_MODEL, "variant": "core", "pred_depth": 8},
        "train": _GPU_TRAIN,
        "objective": _GUARD,
    },
    "gpu-equivariant": {
        "model": {**_GPU_MODEL, "variant": "equivariant", "pred_depth": 16},
        "train": _GPU_TRAIN,
        "aug": {"gray_p": 0.2, "blur_p": 0.5, "solarize_p": 0.2},
        "objective": _GUARD,
    },
    "gpu-invariant": {
        "model": {**_GPU_MODEL, "variant": "invariant", "pred_depth": 4},
        "train": _GPU_TRAIN,
        "aug": {"gray_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0},
        "objective": _GUARD,
    },
}


def preset(name: str) -> dict[str, Any]:
    """A deep copy of preset ``name``; ValueError naming the known ones otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
