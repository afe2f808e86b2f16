"""Sources outside the process: the desktop (mss), animated images and image folders (Pillow).

Opened through ``workers.sources.open_source`` with ``screen[:monitor]``, ``video:PATH`` or
``folder:PATH``; mss and Pillow are imported only when a source is made::

    src = open_source("folder:frames/", loop=True)
    frame = src.reset()                   # actions from frames/actions.csv when it exists
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from iwm_bus.bus.wire import make_action
from iwm_bus.errors import WireError
from workers.sources.base import SourceBase, SourceError, SourceFrame, as_rgb_frame, bad_spec

__all__ = [
    "ACTIONS_CSV", "IMAGE_SUFFIXES", "FolderSource", "ScreenSource", "VideoSource",
    "read_actions_csv",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
ACTIONS_CSV = "actions.csv"
_VIDEO_HINT = ("video: reads what Pillow reads (animated GIF, WebP, PNG/APNG, TIFF); for MP4 "
               "and other codecs extract frames first (ffmpeg -i in.mp4 DIR/%06d.png) and use "
               "folder:DIR")


class ScreenSource(SourceBase):
    """Desktop capture with mss: one grab per frame of ``monitor`` (0 = all monitors).

    Needs a display; without one the constructor raises SourceError saying "no display".
    Actions are ignored (the agent acts on the game itself).
    """

    def __init__(self, monitor: int = 1, *, spec: str | None = None) -> None:
        super().__init__(spec or f"screen:{monitor}")
        try:
            import mss
            from mss.exception import ScreenShotError
        except ImportError as e:
            raise SourceError(f"{self.spec}: mss is not installed ({e}); "
                              "pip install 'iwm-bus[screen]'") from e
        factory = getattr(mss, "MSS", None) or mss.mss
        try:
            self._sct = factory()
            monitors = self._sct.monitors
        except (ScreenShotError, OSError) as e:
            raise SourceError(
                f"{self.spec}: no display: {e}. Screen capture needs a desktop session "
                "(DISPLAY or WAYLAND_DISPLAY); on a headless machine use gym:, video: or "
                "folder:") from e
        if not 0 <= monitor < len(monitors):
            self._sct.close()
            raise bad_spec(self.spec, f"monitor {monitor} does not exist; this display has "
                                       f"{len(monitors) - 1} (0 = all of them)")
        self._error_type = ScreenShotError
        self._monitor = monitors[monitor]

    def reset(self) -> SourceFrame:
        return SourceFrame(self._grab())

    def step(self, action: dict[str, Any] | None) -> SourceFrame:
        return SourceFrame(self._grab())

    def close(self) -> None:
        sct, self._sct = getattr(self, "_sct", None), None
        if sct is not None:
            sct.close()

    def _grab(self) -> np.ndarray:
        if self._sct is None:
            raise SourceError(f"{self.spec}: the source is closed")
        try:
            shot = self._sct.grab(self._monitor)
        except (self._error_type, OSError) as e:
            raise SourceError(f"{self.spec}: screen grab failed: {e}") from e
        bgra = np.frombuffer(shot.bgra, np.uint8).reshape(shot.height, shot.width, 4)
        return np.ascontiguousarray(bgra[:, :, 2::-1])  # BGRA -> RGB


# ---------------------------------------------------------------- recorded footage


class VideoSource(SourceBase):
    """Frames of an animated image read with Pillow (GIF, WebP, PNG/APNG, TIFF).

    ``t_recorded_ns`` follows the per-frame durations stored in the file (None when it
    stores none), so ``--rate`` paces the footage; with ``loop`` the clock keeps running
    across passes. Actions are ignored.
    """

    def __init__(self, path: str | Path, *, loop: bool = False, spec: str | None = None) -> None:
        super().__init__(spec or f"video:{path}")
        from PIL import Image, UnidentifiedImageError

        self.path, self.loop = Path(path), loop
        try:
            self._im = Image.open(self.path)
        except UnidentifiedImageError as e:
            raise bad_spec(self.spec, f"Pillow cannot read {str(self.path)!r} as an image "
                                       f"({e}). {_VIDEO_HINT}") from e
        except OSError as e:
            raise SourceError(f"{self.spec}: cannot open {self.path}: {e}") from e
        # frames in the file
        self.n_frames = int(getattr(self._im, "n_frames", 1))
        self._i = 0
        self._clock_ms: float | None = 0.0

    def reset(self) -> SourceFrame:
        self._i, self._clock_ms = 0, 0.0
        return self._read()

    def step(self, action: dict[str, Any] | None) -> SourceFrame | None:
        duration = self._im.info.get("duration")
        if self._clock_ms is not None and isinstance(duration, (int, float)) and duration > 0:
            self._clock_ms += float(duration)
        else:
            self._clock_ms = None  # the file stores no timing
        self._i += 1
        if self._i >= self.n_frames:
            if not self.loop:
                return None
            self.episodes += 1
            self._i = 0
        return self._read()

    def close(self) -> None:
        self._im.close()

    def _read(self) -> SourceFrame:
        try:
            self._im.seek(self._i)
            pixels = np.asarray(self._im.convert("RGB"))
        except (OSError, EOFError, ValueError) as e:
            raise SourceError(f"{self.spec}: cannot decode frame {self._i} of {self.path}: "
                              f"{e}") from e
        t_ns = None if self._clock_ms is None else int(round(self._clock_ms * 1e6))
        return SourceFrame(as_rgb_frame(pixels, self.spec), None, t_ns)


def _natural_key(path: Path) -> list[Any]:
    """frame2.png before frame10.png (digits compare as numbers)."""
    return [int(part) if i % 2 else part.lower()
            for i, part in enumerate(re.split(r"(\d+)", path.name))]


class FolderSource(SourceBase):
    """An image sequence: the PNG/JPG files of a folder in natural order (all one size).

    An optional ``actions.csv`` beside them makes the source know its actions: a header row,
    then one row per frame that has an action. Columns: ``frame`` (0-based index in the
    sorted list; the row is the action that PRODUCED that frame), ``action_id`` and/or
    vector components ``v0, v1, ...``. Actions from the agent are ignored.
    """

    def __init__(self, path: str | Path, *, loop: bool = False, spec: str | None = None) -> None:
        super().__init__(spec or f"folder:{path}")
        from PIL import Image

        self._image = Image
        self.path, self.loop = Path(path), loop
        self.files = sorted((p for p in self.path.iterdir()
                             if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                            key=_natural_key)
        if not self.files:
            raise bad_spec(self.spec, f"no PNG/JPG images in {str(self.path)!r}")
        self.size = self._check_sizes()
        csv_path = self.path / ACTIONS_CSV
        self.actions = read_actions_csv(csv_path, len(self.files)) if csv_path.exists() else {}
        self.knows_actions = csv_path.exists()
        self._i = 0

    def reset(self) -> SourceFrame:
        self._i = 0
        return self._read()

    def step(self, action: dict[str, Any] | None) -> SourceFrame | None:
        self._i += 1
        if self._i >= len(self.files):
            if not self.loop:
                return None
            self.episodes += 1
            self._i = 0
        return self._read()

    def _check_sizes(self) -> tuple[int, int]:
        """(width, height) shared by every image (reads headers only)."""
        sizes: dict[tuple[int, int], Path] = {}
        for file in self.files:
            try:
                with self._image.open(file) as im:
                    sizes.setdefault(im.size, file)
            except OSError as e:
                raise SourceError(f"{self.spec}: cannot read {file}: {e}") from e
            if len(sizes) > 1:
                (s0, f0), (s1, f1) = sizes.items()
                raise bad_spec(self.spec, f"images differ in size: {f0.name} is "
                                           f"{s0[0]}x{s0[1]}, {f1.name} is {s1[0]}x{s1[1]}")
        return next(iter(sizes))

    def _read(self) -> SourceFrame:
        file = self.files[self._i]
        try:
            with self._image.open(file) as im:
                pixels = np.asarray(im.convert("RGB"))
        except OSError as e:
            raise SourceError(f"{self.spec}: cannot read {file}: {e}") from e
        if (pixels.shape[1], pixels.shape[0]) != self.size:
            raise SourceError(f"{self.spec}: {file.name} changed size while running")
        return SourceFrame(as_rgb_frame(pixels, self.spec), self.actions.get(self._i))


def read_actions_csv(path: Path, n_frames: int) -> dict[int, dict[str, Any]]:
    """{frame index: wire action map} from an actions.csv (see FolderSource)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = columns
        vcols = sorted((c for c in columns if re.fullmatch(r"v\d+", c)), key=lambda c: int(c[1:]))
        unknown = set(columns) - {"frame", "action_id"} - set(vcols)
        if "frame" not in columns or unknown or not ("action_id" in columns or vcols):
            raise ValueError(f"{path}: header {columns} must be 'frame' plus 'action_id' and/or "
                             "vector columns v0, v1, ...")
        if vcols != [f"v{i}" for i in range(len(vcols))]:
            raise ValueError(f"{path}: vector columns must be v0..v{len(vcols) - 1}, got {vcols}")
        out: dict[int, dict[str, Any]] = {}
        for line, row in enumerate(reader, start=2):
            try:
                frame, action = _parse_action_row(row, vcols)
            except (ValueError, WireError) as e:
                raise ValueError(f"{path}:{line}: {e}") from None
            if not 0 <= frame < n_frames:
                raise ValueError(f"{path}:{line}: frame {frame} is outside 0..{n_frames - 1}")
            if frame in out:
                raise ValueError(f"{path}:{line}: frame {frame} has a second row")
            if action is not None:
                out[frame] = action
    return out


def _parse_action_row(row: dict[str, str | None], vcols: list[str]) -> tuple[int, Any]:
    frame = int((row.get("frame") or "").strip())
    text_id = (row.get("action_id") or "").strip()
    values = [(row.get(c) or "").strip() for c in vcols]
    if any(values) and not all(values):
        raise ValueError("vector columns must be all filled or all empty")
    vector = [float(v) for v in values] if vcols and all(values) else None
    if vector is not None and not all(math.isfinite(v) for v in vector):
        raise ValueError("vector holds NaN or infinity")
    return frame, make_action(vector, int(text_id) if text_id else None)
