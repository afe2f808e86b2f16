"""Capture sources behind one protocol: synthetic shapes, gymnasium games, the screen,
animated images, image folders and recorded sessions.

A source is chosen by a spec string (``SPEC_FORMS``; docs/sources.md has examples)::

    src = open_source("synthetic:64x64", seed=0)
    frame = src.reset()                   # SourceFrame: pixels (H, W, 3) uint8, action, t_recorded_ns
    frame = src.step({"action_id": 4})    # the square moves right; step() -> None = end of source
    src.close()

``step`` takes the agent's latest action as a wire action map (``{"vector": f32 array,
"action_id": int}``, see ``iwm_bus.bus.wire.make_action``) or None when no agent is connected,
in which case the source's default policy acts (seeded, so runs repeat). A malformed action
is logged (rate-limited), counted in ``bad_actions`` and replaced by the default policy; it
never stops the source. Sources that know which action produced a frame (synthetic, gym,
folder with actions.csv, replay) report it in ``SourceFrame.action``.

Errors: a bad spec or option is a ``ValueError`` that lists the valid forms; a good spec
that cannot be opened or read here (no display, missing game package, a game that crashed)
is a :class:`SourceError`.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.sources.base import (
    SPEC_FORMS,
    Source,
    SourceBase,
    SourceError,
    SourceFrame,
    as_rgb_frame,
    bad_spec,
)
from workers.sources.synthetic import SyntheticSource

if TYPE_CHECKING:  # re-exported lazily by __getattr__ below
    from workers.sources.files import ACTIONS_CSV as ACTIONS_CSV
    from workers.sources.files import IMAGE_SUFFIXES as IMAGE_SUFFIXES
    from workers.sources.files import FolderSource, ScreenSource, VideoSource
    from workers.sources.files import read_actions_csv as read_actions_csv
    from workers.sources.games import GymSource
    from workers.sources.replay import ReplaySource

__all__ = [
    "SPEC_FORMS", "FolderSource", "GymSource", "ReplaySource", "ScreenSource", "Source",
    "SourceBase", "SourceError", "SourceFrame", "SyntheticSource", "VideoSource",
    "as_rgb_frame", "bad_spec", "check_spec", "open_source",
]

#: sources whose modules need more than numpy (gymnasium, Pillow, mcap), importable from
#: here too but loaded on first use, so ``import workers.sources`` stays light
_LAZY = {
    "GymSource": "workers.sources.games",
    "ScreenSource": "workers.sources.files",
    "VideoSource": "workers.sources.files",
    "FolderSource": "workers.sources.files",
    "read_actions_csv": "workers.sources.files",
    "IMAGE_SUFFIXES": "workers.sources.files",
    "ACTIONS_CSV": "workers.sources.files",
    "ReplaySource": "workers.sources.replay",
}

SCHEMES = ("synthetic", "gym", "screen", "video", "folder", "replay")
#: options each scheme accepts besides ``seed`` (None: passed through unchecked).
#: ``loop`` is accepted everywhere; sources that never end ignore it.
OPTIONS: dict[str, frozenset[str] | None] = {
    "synthetic": frozenset({"loop", "speed", "shapes"}),
    "gym": frozenset({"loop", "max_episode_steps", "env_kwargs", "actions"}),
    "screen": frozenset({"loop"}),
    "video": frozenset({"loop"}),
    "folder": frozenset({"loop"}),
    "replay": None,
}
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")


# ---------------------------------------------------------------- spec parsing


def _parse(spec: Any) -> tuple[str, Any]:
    """(scheme, argument) with the argument parsed; ValueError for anything malformed."""
    if not isinstance(spec, str) or not spec.strip():
        raise bad_spec(spec, "must be a non-empty string")
    scheme, sep, arg = spec.partition(":")
    if scheme not in SCHEMES:
        raise bad_spec(spec, f"unknown source {scheme!r}")
    if scheme == "synthetic":
        return scheme, _parse_size(spec, arg if sep else "64x64")
    if scheme == "screen":
        if not sep:
            return scheme, 1
        if not arg.isdigit():
            raise bad_spec(spec, f"monitor must be a number >= 0, got {arg!r}")
        return scheme, int(arg)
    if not arg.strip():
        raise bad_spec(spec, f"{scheme}: needs {'an env id' if scheme == 'gym' else 'a path'}")
    if scheme == "gym":
        if any(ch.isspace() for ch in arg):
            raise bad_spec(spec, f"gym env id {arg!r} must not contain spaces")
        return scheme, arg
    return scheme, _existing_path(spec, scheme, Path(arg).expanduser())


def _parse_size(spec: str, text: str) -> tuple[int, int]:
    match = _SIZE_RE.match(text)
    if not match:
        raise bad_spec(spec, f"synthetic size must be WxH (e.g. 64x64), got {text!r}")
    width, height = int(match[1]), int(match[2])
    if not (8 <= width <= 8192 and 8 <= height <= 8192):
        raise bad_spec(spec, f"synthetic size {width}x{height} must be within 8..8192 each way")
    return width, height


def _existing_path(spec: str, scheme: str, path: Path) -> Path:
    if scheme == "folder" and not path.is_dir():
        raise bad_spec(spec, f"folder {str(path)!r} does not exist or is not a directory")
    if scheme == "video" and not path.is_file():
        raise bad_spec(spec, f"video file {str(path)!r} does not exist")
    if scheme == "replay" and not path.exists():
        raise bad_spec(spec, f"session {str(path)!r} does not exist")
    return path


def check_spec(spec: str) -> None:
    """Validate ``spec`` without opening anything (scheme, size, monitor, path exists)."""
    _parse(spec)


def open_source(spec: str, *, seed: int = 0, **options: Any) -> Source:
    """Open the source ``spec`` names (``SPEC_FORMS``); ``options`` per scheme (``OPTIONS``).

    Raises ValueError for a bad spec or option, SourceError when it cannot be opened here.
    """
    scheme, arg = _parse(spec)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise bad_spec(spec, f"seed must be an int >= 0, got {seed!r}")
    allowed = OPTIONS[scheme]
    if allowed is not None and set(options) - allowed:
        raise bad_spec(spec, f"unknown options {sorted(set(options) - allowed)} "
                              f"({scheme} takes {sorted(allowed)})")
    opts = {k: v for k, v in options.items() if k != "loop"}
    loop = bool(options.get("loop", False))
    if scheme == "synthetic":
        return SyntheticSource(*arg, seed=seed, spec=spec, **opts)
    if scheme == "gym":
        from workers.sources.games import GymSource

        return GymSource(arg, seed=seed, spec=spec, **opts)
    if scheme in ("screen", "video", "folder"):
        from workers.sources import files

        if scheme == "screen":
            return files.ScreenSource(arg, spec=spec)
        if scheme == "video":
            return files.VideoSource(arg, loop=loop, spec=spec)
        return files.FolderSource(arg, loop=loop, spec=spec)
    return _open_replay(arg, spec, options)


def __getattr__(name: str) -> Any:
    """The sources of ``_LAZY``, loaded on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def _open_replay(path: Path, spec: str, options: dict[str, Any]) -> Source:
    try:
        from workers.sources.replay import ReplaySource
    except ImportError as e:
        raise SourceError(f"{spec}: the replay source (workers.sources.replay.ReplaySource) "
                          f"cannot be imported: {e}") from e
    return ReplaySource(path, spec=spec, **options)


