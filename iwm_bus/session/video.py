"""A recorded session as an MP4 video (PyAV, H.264), optionally with a surprise strip.

``iwm-session export run.mcap --video run.mp4`` writes the session's frames at their
recorded frame rate; ``--overlay`` (the default) adds a strip under each frame: the
surprise of the last ``width`` frames as a trace (0 at the bottom, 2 at the top) with the
current frame's value as a bar at the right edge, red above ``alert`` (docs/agent.md's
escalation scale). Needs the ``video`` extra (``pip install iwm-bus[video]``).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

from iwm_bus.bus.topics import SURPRISE
from iwm_bus.errors import SessionError
from iwm_bus.session import SessionReader

__all__ = ["STRIP_HEIGHT", "export_video", "surprise_strip"]

#: pixel rows of the surprise strip under each frame
STRIP_HEIGHT = 32


def surprise_strip(history: list[float | None], width: int, alert: float = 0.98
                   ) -> np.ndarray:
    """(STRIP_HEIGHT, width, 3) uint8: the last ``width`` surprises as a trace, the newest a
    bar at the right (nil values leave a gap)."""
    strip = np.full((STRIP_HEIGHT, width, 3), 24, np.uint8)
    if width < 8:
        return strip
    vals = history[-(width - 4):]
    scale = (STRIP_HEIGHT - 1) / 2.0  # surprise is in [0, 2]
    for x, v in enumerate(vals):
        if v is not None:
            y = STRIP_HEIGHT - 1 - int(round(min(max(v, 0.0), 2.0) * scale))
            strip[y, x] = (230, 60, 60) if v > alert else (220, 220, 220)
    last = history[-1] if history else None
    if last is not None:
        top = STRIP_HEIGHT - 1 - int(round(min(max(last, 0.0), 2.0) * scale))
        strip[top:, width - 3:] = (230, 60, 60) if last > alert else (90, 170, 250)
    return strip


def export_video(path: str | Path, out: str | Path, *, overlay: bool = True,
                 fps: float | None = None, progress: bool = True) -> int:
    """Write ``path``'s frames to ``out`` (MP4); returns the number of frames written."""
    try:
        import av
    except ImportError:
        raise SessionError("MP4 export needs PyAV: pip install 'iwm-bus[video]'") from None
    from tqdm import tqdm

    reader = SessionReader(path)
    info = reader.info()
    if not info["frames"]:
        raise SessionError(f"{reader.path}: no frames to export")
    rate = Fraction(fps or info["fps"] or 30.0).limit_denominator(1001)
    surprise = {m["seq"]: m.get("surprise") for m in reader.events(SURPRISE)} if overlay else {}
    history: list[float | None] = []
    n = 0
    container = av.open(str(out), mode="w")
    try:
        stream = None
        for rec in tqdm(reader.frame_records(), total=info["frames"], unit="frame",
                        desc=f"export {Path(out).name}", disable=not progress):
            px = reader.decode(rec)
            px = np.repeat(px, 3, axis=2) if px.shape[2] == 1 else px[:, :, :3]
            if overlay:
                history.append(surprise.get(rec.seq))
                px = np.concatenate([px, surprise_strip(history, px.shape[1])], axis=0)
            h, w = px.shape[0] + px.shape[0] % 2, px.shape[1] + px.shape[1] % 2  # yuv420p
            if px.shape[:2] != (h, w):
                px = np.pad(px, ((0, h - px.shape[0]), (0, w - px.shape[1]), (0, 0)))
            if stream is None:
                stream = container.add_stream("libx264", rate=rate)
                stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            if (h, w) != (stream.height, stream.width):
                raise SessionError(f"{reader.path}: frame {rec.seq} is {h}x{w}, the video "
                                   f"{stream.height}x{stream.width}; one size per video")
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(px), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
            n += 1
        if stream is None:
            raise SessionError(f"{reader.path}: no frame could be read")
        for packet in stream.encode():
            container.mux(packet)
    except BaseException:
        container.close()
        Path(out).unlink(missing_ok=True)  # no half-written video left behind
        raise
    container.close()
    return n
