"""Session files: a run's frames, actions and the worker's messages in one MCAP file.

``reader`` (the format, :class:`SessionReader`, ``recover``, ``convert``), ``writer``
(:class:`SessionWriter`), ``codec`` (frame and message encodings, no files), ``scan`` (the
index of a file, or of what a killed recorder left), ``video`` (MP4 export) and ``cli`` (the
``iwm-session`` command, imported only by its console script).

    from iwm_bus.session import SessionReader, SessionWriter
"""

from iwm_bus.extras import require

require("sidecar", "iwm_bus.session", "mcap", "zstandard", "tqdm")  # one clear line if not installed

from iwm_bus.session.codec import (
    ACTIONS_TOPIC,
    FORMAT_VERSION,
    FRAME_ENCODINGS,
    FRAMES_TOPIC,
    Frame,
    FrameRecord,
    Transition,
    decode_frame,
    encode_frame,
)
from iwm_bus.session.reader import ConvertResult, RecoverResult, SessionReader, convert, recover
from iwm_bus.session.writer import SessionOptions, SessionWriter

__all__ = [
    "ACTIONS_TOPIC", "FORMAT_VERSION", "FRAME_ENCODINGS", "FRAMES_TOPIC", "ConvertResult",
    "Frame", "FrameRecord", "RecoverResult", "SessionOptions", "SessionReader",
    "SessionWriter", "Transition", "convert", "decode_frame", "encode_frame", "recover",
]
