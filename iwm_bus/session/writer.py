"""Session writer: frames, actions and events appended to a new MCAP file in chunks.

With ``viewer`` (the default) every frame is also written as a ``foxglove.CompressedImage``
on ``/viewer/frames`` and every surprise, MRR and action message as a JSON object on
``/viewer/...``, so that standard MCAP viewers show and plot the session (format 2). See
``iwm_bus.session`` for the file format and its crash safety.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import msgpack
from mcap.writer import CompressionType, Writer

from iwm_bus import __version__
from iwm_bus.bus import wire
from iwm_bus.bus.topics import ACTION, FRAME, RPC, TOPIC_KINDS, base_topic
from iwm_bus.errors import SessionError
from iwm_bus.session.codec import (
    END_META_NAME,
    FORMAT_VERSION,
    FRAME_ENCODINGS,
    FRAME_SCHEMA,
    FRAMES_TOPIC,
    IMAGE_SCHEMA_NAME,
    META_NAME,
    VIEWER_FRAMES_TOPIC,
    FrameRecord,
    as_frame_array,
    encode_action,
    encode_frame,
    image_schema,
    plot_message,
    plot_schema,
    plot_topic,
    viewer_image,
)


@dataclass(frozen=True)
class SessionOptions:
    # frame encoding: png (lossless), zstd-raw (lossless, fastest, larger) or jpeg (lossy)
    frame_encoding: str = "png"
    # JPEG quality 1..100 (frame_encoding="jpeg")
    jpeg_quality: int = 90
    # PNG zlib level 0..9 (1: fast, a little larger than the default 6)
    png_level: int = 1
    # zstd level for zstd-raw frames, 1..22
    zstd_level: int = 3
    # close a chunk when it holds this many bytes (bounds what a crash can lose)
    chunk_size: int = 1 << 20
    # ... or when its oldest message is this many seconds old
    chunk_seconds: float = 1.0
    # compression of MCAP chunks: zstd or none
    chunk_compression: str = "zstd"
    # fsync after every chunk (survives power loss, not only a killed process)
    fsync: bool = False
    # also write the viewer copies (/viewer/frames as foxglove.CompressedImage, /viewer/...
    # JSON numbers) that Foxglove and other MCAP tools display; PNG frames are stored twice
    viewer: bool = True

    def __post_init__(self) -> None:
        checks = [
            ("frame_encoding", self.frame_encoding in FRAME_ENCODINGS, f"one of {FRAME_ENCODINGS}"),
            ("jpeg_quality", 1 <= self.jpeg_quality <= 100, "in 1..100"),
            ("png_level", 0 <= self.png_level <= 9, "in 0..9"),
            ("zstd_level", 1 <= self.zstd_level <= 22, "in 1..22"),
            ("chunk_size", 4096 <= self.chunk_size <= 256 << 20, "in 4 KiB..256 MiB"),
            ("chunk_seconds", 0.01 <= self.chunk_seconds <= 3600, "in 0.01..3600"),
            ("chunk_compression", self.chunk_compression in ("zstd", "none"), "zstd or none"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"SessionOptions.{name}={getattr(self, name)!r}: must be {why}")


def _json_schema_for(kind: str) -> bytes:
    fields = wire.SCHEMA[kind]
    props = {name: {"description": spec} for name, spec in fields.items()}
    return json.dumps({"title": f"iwm_bus.wire.{kind}", "type": "object",
                       "properties": props}).encode()


class SessionWriter:
    """Append frames, actions and events to a new session file (see the module docstring).

    Not thread-safe. ``close()`` (or leaving the ``with`` block) writes the index; until
    then the file is readable up to its last complete chunk.
    """

    def __init__(self, path: str | os.PathLike[str], *, metadata: Mapping[str, Any] | None = None,
                 overwrite: bool = False, options: SessionOptions | None = None,
                 **option_overrides: Any) -> None:
        self.path = Path(path)
        self.options = options or SessionOptions(**option_overrides)
        if options is not None and option_overrides:
            raise TypeError("pass either options= or individual option keywords, not both")
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} exists; choose a new session path "
                                  "(sessions are never overwritten silently)")
        self._file: IO[bytes] = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        compression = (CompressionType.ZSTD if self.options.chunk_compression == "zstd"
                       else CompressionType.NONE)
        # chunks are closed by _maybe_flush (size or age), never by mcap on its own
        self._mcap = Writer(self._file, chunk_size=1 << 62, compression=compression)
        self._mcap.start(profile="iwm-bus", library=f"iwm-bus/{__version__}")
        self._channels: dict[str, int] = {}
        self._schemas: dict[str, int] = {}
        self._pending = 0
        self._chunk_opened: float | None = None
        self.frames_written = 0
        self.bytes_frames = 0
        self.messages_written = 0
        self.chunks_written = 0
        self.closed = False
        self._mcap.add_metadata(META_NAME, self._header_metadata(metadata or {}))
        self._file.flush()

    def _header_metadata(self, user: Mapping[str, Any]) -> dict[str, str]:
        now = time.time()
        head = {"format": "iwm-bus-session", "format_version": FORMAT_VERSION,
                "software_version": __version__, "wire_schema": wire.version_text(),
                "created_utc": datetime.fromtimestamp(now, timezone.utc).isoformat(),
                "created_unix_ns": time.time_ns(), "clock": "wall (time.time_ns)",
                "frame_encoding": self.options.frame_encoding,
                "options": asdict(self.options)}
        clash = set(head) & set(user)
        if clash:
            raise ValueError(f"metadata keys {sorted(clash)} are reserved by the session format")
        try:
            return {k: json.dumps(v, default=str) for k, v in {**head, **user}.items()}
        except (TypeError, ValueError) as e:
            raise ValueError(f"session metadata must be JSON-able: {e}") from e

    def _channel(self, topic: str, kind: str) -> int:
        """The channel of ``topic``: msgpack for data, protobuf / json for viewer copies."""
        cid = self._channels.get(topic)
        if cid is None:
            sid = self._schemas.get(kind)
            if sid is None:
                if kind == "viewer-image":
                    sid = self._mcap.register_schema(IMAGE_SCHEMA_NAME, "protobuf",
                                                     image_schema())
                elif kind.startswith("viewer-"):
                    sub = kind.removeprefix("viewer-")
                    sid = self._mcap.register_schema(f"iwm_bus.viewer.{sub}", "jsonschema",
                                                     plot_schema(sub))
                else:
                    data = json.dumps(FRAME_SCHEMA).encode() if kind == "frame-record" \
                        else _json_schema_for(kind)
                    sid = self._mcap.register_schema(f"iwm_bus.{kind}", "jsonschema", data)
                self._schemas[kind] = sid
            encoding = ("protobuf" if kind == "viewer-image" else
                        "json" if kind.startswith("viewer-") else "msgpack")
            cid = self._mcap.register_channel(topic, encoding, sid, {"kind": kind})
            self._channels[topic] = cid
        return cid

    def _add(self, topic: str, kind: str, log_time: int, payload: bytes, seq: int = 0,
             publish_time: int | None = None) -> None:
        if self.closed:
            raise SessionError(f"{self.path}: session writer is closed")
        if not isinstance(log_time, int) or log_time < 0:
            raise ValueError(f"log time must be a non-negative int (ns), got {log_time!r}")
        cid = self._channel(topic, kind)
        self._mcap.add_message(cid, log_time=log_time, data=payload,
                               publish_time=time.time_ns() if publish_time is None
                               else publish_time, sequence=seq & 0xFFFFFFFF)
        self.messages_written += 1
        self._pending += len(payload) + 31
        if self._chunk_opened is None:
            self._chunk_opened = time.monotonic()
        self.flush_if_due()

    def write_frame(self, seq: int, t_ns: int, pixels: Any,
                    action: Mapping[str, Any] | None = None) -> int:
        """Encode and append frame ``seq`` captured at ``t_ns``; returns the stored bytes."""
        arr = as_frame_array(pixels)
        o = self.options
        data = encode_frame(arr, o.frame_encoding, jpeg_quality=o.jpeg_quality,
                            png_level=o.png_level, zstd_level=o.zstd_level)
        h, w, c = arr.shape
        payload = msgpack.packb(
            {"seq": int(seq), "t_ns": int(t_ns), "encoding": o.frame_encoding, "height": h,
             "width": w, "channels": c, "data": data, "action": encode_action(action)},
            use_bin_type=True)
        self._add(FRAMES_TOPIC, "frame-record", int(t_ns), payload, int(seq))
        self.frames_written += 1
        self.bytes_frames += len(payload)
        if o.viewer:
            self._add_viewer_frame(FrameRecord(int(seq), int(t_ns), o.frame_encoding, h, w, c,
                                               data, None))
        return len(payload)

    def _add_viewer_frame(self, rec: FrameRecord, publish_time: int | None = None) -> None:
        self._add(VIEWER_FRAMES_TOPIC, "viewer-image", rec.t_ns,
                  viewer_image(rec, self.options.png_level), rec.seq, publish_time)

    def _add_viewer_event(self, topic: str, kind: str, log_time: int, msg: Mapping[str, Any],
                          publish_time: int | None = None) -> None:
        """The JSON copy of a wire message, when its topic has one (``plot_topic``)."""
        target = plot_topic(topic)
        if target is not None and kind in ("surprise", "mrr", "action"):
            seq = msg.get("seq", 0)
            self._add(target, f"viewer-{kind}", log_time, plot_message(kind, log_time, msg),
                      seq if isinstance(seq, int) else 0, publish_time)

    def write_action(self, t_ns: int | None, action_msg: Mapping[str, Any]) -> None:
        """Append a wire ``action`` message (as received on ``agent.action``)."""
        self.write_event(ACTION, action_msg["t_ns"] if t_ns is None else t_ns, action_msg)

    def write_event(self, topic: str, t_ns: int, msg: Mapping[str, Any]) -> None:
        """Append a wire message on ``topic`` (``iwm.surprise``, ``iwm.latent``, ...).

        ``msg`` is validated with ``iwm_bus.bus.wire.pack``; ``WireError`` if it does not fit.
        """
        _, payload = wire.pack(topic, msg)  # WireError for unknown topics, bad messages
        if base_topic(topic) in (RPC, FRAME):
            raise ValueError(f"topic {topic!r} is not recorded as an event; frames go "
                             "through write_frame")
        kind = msg.get("kind") or TOPIC_KINDS[base_topic(topic)][0]
        seq = msg.get("seq", 0)
        self._add(topic, kind, int(t_ns), payload, seq if isinstance(seq, int) else 0)
        if self.options.viewer:
            self._add_viewer_event(topic, kind, int(t_ns), msg)

    def flush_if_due(self) -> bool:
        """Close the open chunk if it reached ``chunk_size`` bytes or ``chunk_seconds``."""
        if self._chunk_opened is None:
            return False
        if (self._pending >= self.options.chunk_size
                or time.monotonic() - self._chunk_opened >= self.options.chunk_seconds):
            self.flush()
            return True
        return False

    def flush(self) -> None:
        """Close the open chunk and hand it to the OS (and the disk, with ``fsync``)."""
        if self._chunk_opened is not None:
            self.chunks_written += 1
        self._mcap.flush()
        self._file.flush()
        if self.options.fsync:
            os.fsync(self._file.fileno())
        self._pending = 0
        self._chunk_opened = None

    def close(self, end_metadata: Mapping[str, Any] | None = None) -> None:
        """Write the last chunk, ``end_metadata`` (JSON-able), the index; close the file."""
        if self.closed:
            return
        try:
            self.flush()
            end = {"frames": self.frames_written, "messages": self.messages_written,
                   "closed_utc": datetime.now(timezone.utc).isoformat(),
                   **(end_metadata or {})}
            self._mcap.add_metadata(END_META_NAME,
                                    {k: json.dumps(v, default=str) for k, v in end.items()})
            self._mcap.finish()
            self._file.flush()
            if self.options.fsync:
                os.fsync(self._file.fileno())
        finally:
            self.closed = True
            self._file.close()

    def __enter__(self) -> SessionWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"SessionWriter({str(self.path)!r}, frames={self.frames_written}, "
                f"chunks={self.chunks_written})")
