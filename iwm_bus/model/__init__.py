"""The IWM world model (torch + timm; ``import iwm_bus`` itself stays torch-free).

- :mod:`~iwm_bus.model.config` - :class:`IWMConfig`, variants (names for predictor depths).
- :mod:`~iwm_bus.model.encoder` - timm ViT with a token mask (context) -> patch latents.
- :mod:`~iwm_bus.model.predictor` - context + mask tokens at target positions, conditioned
  on an augmentation/action vector and discrete action ids; independent ensemble heads.
- :mod:`~iwm_bus.model.objective` - the training losses behind ``IWM.forward``.
- :mod:`~iwm_bus.model.ema` - the EMA target encoder's pure momentum schedule.
- :mod:`~iwm_bus.model.iwm` - :class:`IWM`: ``encode``/``predict``/``rollout``, ``forward``.
- :mod:`~iwm_bus.model.checkpoint` - safe checkpoints (no pickled code).
- :mod:`~iwm_bus.model.cuda_graphs` - CUDA-graph replay for batch-1 inference.
- :mod:`~iwm_bus.model.precision` - inference precision: fp32, bf16 autocast, int8 (CPU).
"""

from iwm_bus.extras import require

require("sidecar", "iwm_bus.model", "torch", "timm")  # one clear line in a client-only install

from iwm_bus.model.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    load_checkpoint,
    load_iwm,
    read_header,
    save_checkpoint,
)
from iwm_bus.model.config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VARIANT_DEPTHS,
    VARIANTS,
    IWMConfig,
    pad_cond,
    variant_for_depth,
)
from iwm_bus.model.ema import EMA, ema_momentum
from iwm_bus.model.factory import create_iwm_model
from iwm_bus.model.iwm import IWM, Prediction, Rollout
from iwm_bus.model.objective import Objective, effective_rank
from iwm_bus.model.precision import PRECISIONS, set_precision
from iwm_bus.model.predictor import IWMPredictor, ensemble_spread

__all__ = [
    "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "EMA", "IMAGENET_MEAN", "IMAGENET_STD", "IWM",
    "PRECISIONS", "VARIANTS", "VARIANT_DEPTHS", "IWMConfig", "IWMPredictor", "Objective", "Prediction",
    "Rollout", "create_iwm_model", "effective_rank", "ema_momentum", "ensemble_spread",
    "load_checkpoint", "load_iwm", "pad_cond", "read_header", "save_checkpoint", "set_precision",
    "variant_for_depth",
]
