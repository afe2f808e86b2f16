"""What every capture source shares: the frame, the protocol, the errors, the base class.

The sources themselves live beside this module (``synthetic``, ``games``, ``files``,
``replay``); :func:`workers.sources.open_source` picks one from a spec string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from loguru import logger

from iwm_bus.errors import IWMError
from iwm_bus.logs import worth_logging

SPEC_FORMS = (
    "synthetic[:WxH]   deterministic moving shapes and an action-driven square (default 64x64)",
    "gym:<env id>      a gymnasium env rendering RGB, e.g. gym:ALE/Pong-v5, gym:VizdoomBasic-v1",
    "screen[:monitor]  desktop capture with mss (1 = first monitor, the default; 0 = all)",
    "video:PATH        animated GIF / WebP / PNG (APNG) or multi-page TIFF, read with Pillow",
    "folder:PATH       sorted PNG/JPG images, with an optional actions.csv beside them",
    "replay:PATH       a recorded session (workers.sources.replay.ReplaySource)",
)


class SourceError(IWMError, RuntimeError):
    """A valid source spec that cannot be opened or read here (no display, missing package,
    unreadable file, a game engine that failed)."""


@dataclass
class SourceFrame:
    """One frame from a source."""

    # (H, W, 3) uint8, C-contiguous
    pixels: np.ndarray
    # wire action map {"vector"?, "action_id"?} that PRODUCED this frame, when the source knows
    action: dict[str, Any] | None = None
    # replay/video: the frame's recorded time (ns, for --rate pacing); else None
    t_recorded_ns: int | None = None


@runtime_checkable
class Source(Protocol):
    """What the capture process needs from a source (counters ``episodes`` and
    ``bad_actions`` are optional; the sources of this package have them)."""

    spec: str
    knows_actions: bool
    republish_actions: bool
    action_space: dict[str, Any]

    def reset(self) -> SourceFrame: ...

    def step(self, action: dict[str, Any] | None) -> SourceFrame | None: ...

    def close(self) -> None: ...


class SourceBase:
    """Shared counters, the rate-limited bad-action log and the context manager."""

    knows_actions = False
    republish_actions = False
    action_space: dict[str, Any] = {"type": "none"}

    def __init__(self, spec: str) -> None:
        self.spec = spec
        # completed episodes (gym) or passes through the footage (loop)
        self.episodes = 0
        # actions rejected as malformed (the default policy acted instead)
        self.bad_actions = 0

    def _bad_action(self, action: Any, why: str) -> None:
        self.bad_actions += 1
        if worth_logging(self.bad_actions):
            logger.warning("{}: bad action #{} ({}): {}; the default policy acts instead",
                           self.spec, self.bad_actions, _short(action), why)

    def close(self) -> None:
        """Release what the source holds (idempotent)."""

    def __enter__(self) -> SourceBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def as_rgb_frame(image: Any, where: str) -> np.ndarray:
    """``image`` as a fresh C-contiguous (H, W, 3) uint8 array (gray is repeated, alpha dropped)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise SourceError(f"{where}: frame dtype is {arr.dtype}, expected uint8")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or 0 in arr.shape:
        raise SourceError(f"{where}: frame shape {arr.shape} is not (H, W, 1|3|4)")
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    return np.array(arr[:, :, :3], dtype=np.uint8, order="C", copy=True)



def bad_spec(spec: Any, why: str) -> ValueError:
    """The ValueError for a malformed spec or option: ``why``, then the valid forms."""
    forms = "\n  ".join(SPEC_FORMS)
    return ValueError(f"source spec {spec!r}: {why}. Valid forms:\n  {forms}")
