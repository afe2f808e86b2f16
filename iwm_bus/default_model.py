"""The default world model shipped inside the package: ``iwm_bus/weights/default.pt``.

Trained by ``train/recipes/default.sh`` on sessions recorded from a mix of ALE and ViZDoom
games (docs/model.md has its eval table). The worker loads it when no checkpoint is given
(``--model`` / ``IWM_MODEL_PATH``) unless ``--untrained`` asks for random weights.

Beside it, the dual-stream pair (issue 11, ``train/recipes/dual.sh``): ``invariant.pt`` (the
semantic stream) and ``equivariant.pt`` (the control stream), which ``--dual`` loads.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_CHECKPOINT", "EQUIVARIANT_CHECKPOINT", "SEMANTIC_CHECKPOINT",
           "default_checkpoint", "dual_checkpoints"]

_WEIGHTS = Path(__file__).resolve().parent / "weights"
DEFAULT_CHECKPOINT = _WEIGHTS / "default.pt"
SEMANTIC_CHECKPOINT = _WEIGHTS / "invariant.pt"
EQUIVARIANT_CHECKPOINT = _WEIGHTS / "equivariant.pt"


def default_checkpoint() -> Path | None:
    """The shipped checkpoint's path, or None when this install has none."""
    return DEFAULT_CHECKPOINT if DEFAULT_CHECKPOINT.is_file() else None


def dual_checkpoints() -> tuple[Path, Path]:
    """The shipped (semantic, equivariant) pair's paths (they may be missing from an install:
    the worker's preflight says so)."""
    return SEMANTIC_CHECKPOINT, EQUIVARIANT_CHECKPOINT
