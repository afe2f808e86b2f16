"""A checkpoint's provenance in short: what ``health`` replies and ``IWM.describe`` carry.

``train.export`` stores under a checkpoint's ``extra["info"]`` its name, training data, whole
run config and eval summary (iwm-eval's JSON), which ``load_iwm`` keeps as
``model.provenance`` with the path. That nests six levels and more, and grows with every
number the eval learns to measure; a health reply, which holds one per stream, must fit the
wire (``iwm_bus.bus.wire.MAX_DEPTH``, ``MAX_MESSAGE_BYTES``). ``checkpoint_summary`` keeps
one flat map per checkpoint:

    {"name": "iwm-equivariant-v1", "path": ".../equivariant.pt", "step": 864,
     "recipe": "train/recipes/dual_gpu.sh", "action_vocab": "iwm-18", "phase": 3,
     "eval": {"next_latent_mrr.model": 0.342, "next_latent_mrr.copy_last": 0.276, ...,
              "surprise_auroc.z": 0.958},
     "config": {"train.steps": 30000, "train.batch_size": 256, "objective.views_weight": 1.0}}

Every value is a number, a string, a bool or None, and ``eval`` and ``config`` are flat maps
with dotted keys, so a summary nests two levels and stays a few KB whatever the checkpoint
holds. The whole provenance stays in the file: ``load_checkpoint(path)["extra"]["info"]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["RUN_KEYS", "checkpoint_summary"]

#: the run-config entries a summary keeps (section.key), when they are plain values
RUN_KEYS = ("train.phase", "train.steps", "train.epochs", "train.batch_size", "train.lr",
            "train.k_steps", "train.seed", "train.init_from", "objective.loss",
            "objective.views_weight", "objective.views_nce_weight", "objective.freeze_encoder",
            "model.img_size", "model.encoder_depth", "model.pred_depth", "model.ensemble")
#: at most this many eval numbers, and strings cut to this many characters
MAX_EVAL_NUMBERS = 64
MAX_TEXT = 256
_TOP = ("name", "path", "step", "recipe", "action_vocab")


def checkpoint_summary(provenance: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The flat summary of ``model.provenance`` (see the module docstring); None for None
    (a model with random weights)."""
    if provenance is None:
        return None
    out = {key: _plain(provenance.get(key)) for key in _TOP}
    run = _section(provenance, "run_config")
    out["phase"] = _plain(_section(provenance, "data").get("phase",
                                                           _section(run, "train").get("phase")))
    out["eval"] = _eval_numbers(_section(provenance, "eval"))
    config = {}
    for key in RUN_KEYS:
        section, name = key.split(".")
        value = _plain(_section(run, section).get(name))
        if value is not None:
            config[key] = value
    out["config"] = config
    return out


def _eval_numbers(ev: Mapping[str, Any]) -> dict[str, float]:
    """The headline numbers of an eval summary, one level: each group's own numbers
    (``next_latent_mrr.model``, ``next_latent_mrr.copy_last``) and each sub-group's ``model``
    number (``surprise_auroc.z``); percentile tables and deeper detail stay in the file."""
    out: dict[str, float] = {}
    for group, values in ev.items():
        if _number(values):
            out[str(group)] = values
        elif isinstance(values, Mapping):
            for key, value in values.items():
                if _number(value):
                    out[f"{group}.{key}"] = value
                elif isinstance(value, Mapping) and _number(value.get("model")):
                    out[f"{group}.{key}"] = value["model"]
    return dict(list(out.items())[:MAX_EVAL_NUMBERS])


def _section(parent: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = parent.get(key)
    return value if isinstance(value, Mapping) else {}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _plain(value: Any) -> Any:
    """``value`` when it is a plain scalar (a string cut to MAX_TEXT), else None."""
    if isinstance(value, str):
        return value[:MAX_TEXT]
    return value if isinstance(value, (int, float, bool)) else None
