"""The default world model shipped inside the package: ``iwm_bus/weights/default.pt``.

Trained by ``train/recipes/default.sh`` on sessions recorded from a mix of ALE and ViZDoom
games (docs/model.md has its eval table). The worker loads it when no checkpoint is given
(``--model`` / ``IWM_MODEL_PATH``) unless ``--untrained`` asks for random weights.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_CHECKPOINT", "default_checkpoint"]

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "default.pt"


def default_checkpoint() -> Path | None:
    """The shipped checkpoint's path, or None when this install has none."""
    return DEFAULT_CHECKPOINT if DEFAULT_CHECKPOINT.is_file() else None
