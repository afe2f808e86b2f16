"""Replay a recorded session as a capture source (``replay:PATH``).

The capture process runs it like any other source (``workers.sources.Source``): the frames go
into the same ring and ``iwm.frame`` notices as live capture, each frame carries the recorded
action that produced it (``SourceFrame.action``), which the capture re-publishes on
``agent.action`` (``republish_actions``) and puts in the notice, so the worker predicts with
the actions actually taken; actions from a live agent are ignored. ``t_recorded_ns`` is the
frame's recorded capture time, so the capture paces it at ``CaptureConfig.rate`` x real time
(``rate`` 0 and ``fps`` 0: as fast as the worker allows). Lossless replay is the capture's
``mode="lossless"`` credit window: every frame is encoded exactly once, so two replays of one
session on CPU give the same surprise series. ``progress=True`` (for ``--rate 0``, where the
replay runs as fast as the worker allows) draws a tqdm bar of the frames replayed, on a
terminal only (``disable=None``, as ``iwm-session recover`` / ``convert`` do), never in logs
or pipes.

    iwm-launch --source replay:run.mcap --mode lossless --rate 0 --fps 0
    iwm-launch --source replay:run.mcap --rate 2 --loop

    src = ReplaySource("run.mcap", start=5.0, end=20.0)   # seconds from the first frame
    frame = src.reset()
    while frame is not None:
        frame = src.step(None)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loguru import logger
from tqdm import tqdm

from iwm_bus.errors import SessionError
from iwm_bus.session import FrameRecord, SessionReader
from workers.sources.base import SourceError, SourceFrame, as_rgb_frame

__all__ = ["ReplaySource"]


class ReplaySource:
    """Frames of a session file, in recorded order, with the actions that produced them.

    ``start`` / ``end``: seconds from the session's first frame (``end`` exclusive, None = to
    the end); ``loop``: start over at ``start`` after the last frame (``episodes`` counts the
    passes). Frames come out as RGB (gray repeated, alpha dropped), like every source.
    ``progress``: a progress bar of the frames delivered, from the first ``step()`` on (so a
    probe that only calls ``reset()`` draws nothing), where stderr is a terminal.
    Raises ``ValueError`` for bad options and ``SourceError`` when the file cannot be read.
    """

    knows_actions = True
    republish_actions = True

    def __init__(self, path: str | os.PathLike[str], *, start: float = 0.0,
                 end: float | None = None, loop: bool = False, spec: str | None = None,
                 progress: bool = False, **ignored: Any) -> None:
        self.path = Path(path)
        self.spec = spec or f"replay:{self.path}"
        if ignored:
            logger.warning("{}: ignoring options the replay source does not use: {}",
                           self.spec, sorted(ignored))
        if isinstance(start, bool) or not isinstance(start, (int, float)) or start < 0:
            raise ValueError(f"{self.spec}: start must be a number of seconds >= 0, "
                             f"got {start!r}")
        if end is not None and (isinstance(end, bool) or not isinstance(end, (int, float))
                                or end <= start):
            raise ValueError(f"{self.spec}: end must be None or a number of seconds > start "
                             f"({start}), got {end!r}")
        try:
            self.reader = SessionReader(self.path)
            first = next(self.reader.frame_records(), None)
        except SessionError as e:
            raise SourceError(f"{self.spec}: cannot replay: {e}") from e
        if first is None:
            raise SourceError(f"{self.spec}: the session holds no frames")
        if self.reader.recovered:
            logger.warning("{}: {}; replaying up to the last complete chunk (iwm-session "
                           "recover fixes the file)", self.spec, self.reader.problem)
        self.start, self.end, self.loop = float(start), end, bool(loop)
        self.t_first_ns = first.t_ns
        self._start_ns = first.t_ns + int(round(self.start * 1e9))
        self._end_ns = None if end is None else first.t_ns + int(round(float(end) * 1e9))
        source = self.reader.metadata.get("source")
        space = source.get("action_space") if isinstance(source, dict) else None
        self.action_space: dict[str, Any] = space if isinstance(space, dict) else {
            "type": "recorded"}
        # completed passes (loop), frames delivered, and ignored agent actions
        self.episodes = 0
        self.frames = 0
        self.bad_actions = 0
        self._frames: Iterator[tuple[FrameRecord, dict[str, Any] | None]] | None = None
        self.progress = bool(progress)
        self._bar: Any = None

    def _count(self, frame: SourceFrame | None, new_pass: bool) -> None:
        """Advance the progress bar (started on the first step, reset on each new pass)."""
        if not self.progress or frame is None:
            return
        if self._bar is None:
            whole = self.start == 0 and self.end is None  # else the window's size is unknown
            self._bar = tqdm(total=self.reader.num_frames if whole else None, initial=1,
                             unit="frame", desc=f"replay {self.path.name}", disable=None,
                             leave=False)
        elif new_pass:
            self._bar.reset()
        self._bar.update()

    def _window(self) -> Iterator[tuple[FrameRecord, dict[str, Any] | None]]:
        for rec, action in self.reader.frames_with_actions():
            if rec.t_ns < self._start_ns:
                continue
            if self._end_ns is not None and rec.t_ns >= self._end_ns:
                return
            yield rec, action

    def _next(self) -> SourceFrame | None:
        if self._frames is None:
            raise SourceError(f"{self.spec}: step() before reset() (or after close())")
        try:
            got = next(self._frames, None)
            if got is None:
                return None
            rec, action = got
            pixels = as_rgb_frame(self.reader.decode(rec), self.spec)
        except SessionError as e:
            raise SourceError(f"{self.spec}: {e}") from e
        self.frames += 1
        return SourceFrame(pixels, action, rec.t_ns)

    def reset(self) -> SourceFrame:
        """Rewind to ``start``; the first frame of the window."""
        self._frames = self._window()
        frame = self._next()
        if frame is None:
            raise SourceError(f"{self.spec}: no frames between start={self.start} s and "
                              f"end={self.end} s (the session lasts "
                              f"{self.reader.info()['duration_s']:.2f} s)")
        return frame

    def step(self, action: dict[str, Any] | None) -> SourceFrame | None:
        """The next recorded frame (``action`` is ignored: the recording decides)."""
        frame = self._next()
        new_pass = frame is None and self.loop
        if new_pass:
            self.episodes += 1
            self._frames = self._window()
            frame = self._next()
        elif frame is None:
            self.episodes += 1
        self._count(frame, new_pass)
        return frame

    def close(self) -> None:
        self._frames = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ReplaySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ReplaySource({str(self.path)!r}, start={self.start}, end={self.end})"
