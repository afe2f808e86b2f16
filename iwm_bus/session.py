"""Session files: recorded frames, actions and world-model events in one MCAP file.

A session is an `MCAP <https://mcap.dev>`_ file (chunked, zstd-compressed chunks, indexed when
closed cleanly). Channels (MCAP topics), every payload a msgpack map (``message_encoding
"msgpack"``; each channel's schema is a small JSON Schema, ``schema encoding "jsonschema"``):

``frames``
    ``{seq, t_ns, encoding, height, width, channels, data, action}``: ``encoding`` is ``png``
    (lossless, default), ``zstd-raw`` (zstd of the raw ``(H, W, C)`` uint8 bytes; lossless,
    fastest) or ``jpeg`` (lossy, ``jpeg_quality``); ``action`` is the nested action map of the
    wire schema (``{vector?, action_id?}``) that produced the frame, when the source knew it.
``agent.action``
    the wire ``action`` message payload (``iwm_bus.wire``), as published on the bus.
``iwm.latent``, ``iwm.surprise``, ``iwm.mrr`` (``.suffix`` too), ``iwm.stats``
    the wire payloads the worker published (optional).

Every message's MCAP ``log_time`` is its capture time (``t_capture_ns``, wall clock;
``t_ns`` for actions), so events line up with the frames they describe; ``publish_time`` is
the time it was written. Metadata record ``iwm_bus.session`` holds the format version, the
software version, the creation time, the frame encoding and the caller's ``metadata`` (resolved
config, source spec, env id, action space), each value JSON-encoded; ``iwm_bus.session.end``
(written by ``close``) holds closing statistics such as frames the recorder missed.

Crash safety. The writer closes a chunk at ``chunk_size`` bytes or ``chunk_seconds`` of age,
whichever comes first, and hands it to the OS at once (``fsync`` optional), so a recorder that
is SIGKILLed loses at most the open chunk. The index and summary are written only by
``close``; an unclosed file has no footer, and ``mcap``'s ``make_reader`` cannot use it.
``SessionReader`` then scans the file linearly up to the last complete chunk and sets
``recovered``; ``recover`` rewrites such a file as a valid indexed MCAP.

    with SessionWriter("run.mcap", metadata={"source": {"spec": "gym:ALE/Pong-v5"}}) as w:
        w.write_frame(seq, t_ns, pixels, action=make_action(action_id=3))
    with SessionReader("run.mcap") as r:
        print(r.info())
        for frame_t, action_t, frame_t1 in r.transitions():
            ...
"""

from __future__ import annotations

import heapq
import io
import json
import os
import struct
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, NamedTuple

import msgpack
import numpy as np
import zstandard
from mcap.data_stream import ReadDataStream
from mcap.exceptions import McapError
from mcap.opcode import Opcode
from mcap.reader import make_reader
from mcap.records import Channel, Chunk, Message, Metadata, Schema
from mcap.stream_reader import breakup_chunk
from mcap.writer import CompressionType, Writer

from iwm_bus import __version__, wire
from iwm_bus.errors import SessionError
from iwm_bus.topics import ACTION, FRAME, RPC, TOPIC_KINDS, base_topic

__all__ = [
    "FORMAT_VERSION", "FRAME_ENCODINGS", "FRAMES_TOPIC", "ACTIONS_TOPIC", "Frame",
    "FrameRecord", "RecoverResult", "SessionOptions", "SessionReader", "SessionWriter",
    "Transition", "decode_frame", "encode_frame", "recover",
]

FORMAT_VERSION = 1
FRAMES_TOPIC = "frames"
ACTIONS_TOPIC = ACTION
FRAME_ENCODINGS = ("png", "zstd-raw", "jpeg")
META_NAME = "iwm_bus.session"
END_META_NAME = "iwm_bus.session.end"
RECOVER_META_NAME = "iwm_bus.session.recovered"
_MAGIC = b"\x89MCAP0\r\n"
_RECORD_HEADER = struct.Struct("<BQ")
_KNOWN_OPCODES = frozenset(int(op) for op in Opcode)
#: largest record the reader loads (a chunk holds a few MiB; a 4K raw frame is 25 MiB)
_MAX_RECORD_BYTES = 1 << 30
_FRAME_FIELDS = ("seq", "t_ns", "encoding", "height", "width", "channels", "data", "action")
_FRAME_SCHEMA = {
    "title": "iwm_bus.session.frame", "type": "object",
    "properties": {"seq": {"type": "integer"}, "t_ns": {"type": "integer"},
                   "encoding": {"enum": list(FRAME_ENCODINGS)},
                   "height": {"type": "integer"}, "width": {"type": "integer"},
                   "channels": {"enum": [1, 3, 4]}, "data": {"contentEncoding": "binary"},
                   "action": {"type": ["object", "null"]}}}


# ---------------------------------------------------------------- frames


class Frame(NamedTuple):
    """A decoded frame: ``pixels`` is ``(H, W, C)`` uint8; ``action`` produced it (or None)."""

    seq: int
    t_ns: int
    pixels: np.ndarray
    action: dict[str, Any] | None


class FrameRecord(NamedTuple):
    """A frame as stored (still encoded); ``decode()`` gives the pixels."""

    seq: int
    t_ns: int
    encoding: str
    height: int
    width: int
    channels: int
    data: bytes
    action: dict[str, Any] | None

    def decode(self) -> np.ndarray:
        return decode_frame(self.encoding, self.data, self.height, self.width, self.channels)

    def to_frame(self) -> Frame:
        return Frame(self.seq, self.t_ns, self.decode(), self.action)


class Transition(NamedTuple):
    """``(frame_t, action_t, frame_t+1)``: ``action`` is what produced ``next_frame``."""

    frame: Frame
    action: dict[str, Any] | None
    next_frame: Frame


def _pil_mode(channels: int) -> str:
    return {1: "L", 3: "RGB", 4: "RGBA"}[channels]


def encode_frame(pixels: np.ndarray, encoding: str, *, jpeg_quality: int = 90,
                 png_level: int = 1, zstd_level: int = 3) -> bytes:
    """Encode one ``(H, W, C)`` uint8 frame (C in 1, 3, 4) as ``encoding``."""
    h, w, c = pixels.shape
    if encoding == "zstd-raw":
        return zstandard.ZstdCompressor(level=zstd_level).compress(pixels.tobytes())
    from PIL import Image  # pillow import costs ~50 ms; only writers and readers of frames pay

    img = Image.fromarray(pixels[:, :, 0] if c == 1 else pixels, mode=_pil_mode(c))
    buf = io.BytesIO()
    if encoding == "png":
        img.save(buf, format="PNG", compress_level=png_level)
    elif encoding == "jpeg":
        if c == 4:
            raise ValueError("jpeg cannot hold 4-channel frames; use png or zstd-raw")
        img.save(buf, format="JPEG", quality=jpeg_quality)
    else:
        raise ValueError(f"frame encoding {encoding!r} unknown; use one of {FRAME_ENCODINGS}")
    return buf.getvalue()


def decode_frame(encoding: str, data: bytes, height: int, width: int,
                 channels: int) -> np.ndarray:
    """Decode a stored frame to a writable ``(height, width, channels)`` uint8 array.

    ``ValueError`` when the bytes do not decode to that shape.
    """
    nbytes = height * width * channels
    if encoding == "zstd-raw":
        try:
            raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=nbytes)
        except zstandard.ZstdError as e:
            raise ValueError(f"zstd-raw frame does not decompress: {e}") from e
        if len(raw) != nbytes:
            raise ValueError(f"zstd-raw frame holds {len(raw)} bytes, header says {nbytes}")
        return np.frombuffer(bytearray(raw), np.uint8).reshape(height, width, channels)
    if encoding not in ("png", "jpeg"):
        raise ValueError(f"frame encoding {encoding!r} unknown")
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.array(img.convert(_pil_mode(channels)))  # a writable copy
    except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for bad image bytes
        raise ValueError(f"{encoding} frame does not decode: {e}") from e
    arr = arr.reshape(arr.shape[0], arr.shape[1], channels)
    if arr.shape != (height, width, channels):
        raise ValueError(f"{encoding} frame is {arr.shape}, header says "
                         f"{(height, width, channels)}")
    return arr


def _as_frame_array(pixels: Any) -> np.ndarray:
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8:
        raise ValueError(f"frame must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or min(arr.shape[:2]) < 1:
        raise ValueError(f"frame must be (H, W) or (H, W, C) with C in 1, 3, 4; got {arr.shape}")
    return np.ascontiguousarray(arr)


def _encode_action(action: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The nested wire action map, validated (vector as a float32 wire array)."""
    if action is None:
        return None
    extra = set(action) - {"vector", "action_id"}
    if extra:
        raise ValueError(f"action has unknown keys {sorted(extra)}; use vector, action_id")
    out = wire.make_action(action.get("vector"), action.get("action_id"))
    if out is not None and "vector" in out:
        out["vector"] = wire.encode_array(out["vector"])
    return out


def _decode_action(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not set(value) <= {"vector", "action_id"}:
        raise ValueError(f"frame action must be a map of vector/action_id, got {value!r:.80}")
    out: dict[str, Any] = {}
    if value.get("vector") is not None:
        out["vector"] = wire.decode_array(value["vector"])
    if value.get("action_id") is not None:
        if not isinstance(value["action_id"], int):
            raise ValueError("frame action_id must be an int")
        out["action_id"] = value["action_id"]
    return out


# ---------------------------------------------------------------- writer


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
                "software_version": __version__,
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
        cid = self._channels.get(topic)
        if cid is None:
            sid = self._schemas.get(kind)
            if sid is None:
                data = json.dumps(_FRAME_SCHEMA).encode() if kind == "frame-record" \
                    else _json_schema_for(kind)
                sid = self._mcap.register_schema(f"iwm_bus.{kind}", "jsonschema", data)
                self._schemas[kind] = sid
            cid = self._mcap.register_channel(topic, "msgpack", sid, {"kind": kind})
            self._channels[topic] = cid
        return cid

    def _add(self, topic: str, kind: str, log_time: int, payload: bytes, seq: int = 0) -> None:
        if self.closed:
            raise SessionError(f"{self.path}: session writer is closed")
        if not isinstance(log_time, int) or log_time < 0:
            raise ValueError(f"log time must be a non-negative int (ns), got {log_time!r}")
        cid = self._channel(topic, kind)
        self._mcap.add_message(cid, log_time=log_time, data=payload,
                               publish_time=time.time_ns(), sequence=seq & 0xFFFFFFFF)
        self.messages_written += 1
        self._pending += len(payload) + 31
        if self._chunk_opened is None:
            self._chunk_opened = time.monotonic()
        self.flush_if_due()

    def write_frame(self, seq: int, t_ns: int, pixels: Any,
                    action: Mapping[str, Any] | None = None) -> int:
        """Encode and append frame ``seq`` captured at ``t_ns``; returns the stored bytes."""
        arr = _as_frame_array(pixels)
        o = self.options
        data = encode_frame(arr, o.frame_encoding, jpeg_quality=o.jpeg_quality,
                            png_level=o.png_level, zstd_level=o.zstd_level)
        h, w, c = arr.shape
        payload = msgpack.packb(
            {"seq": int(seq), "t_ns": int(t_ns), "encoding": o.frame_encoding, "height": h,
             "width": w, "channels": c, "data": data, "action": _encode_action(action)},
            use_bin_type=True)
        self._add(FRAMES_TOPIC, "frame-record", int(t_ns), payload, int(seq))
        self.frames_written += 1
        self.bytes_frames += len(payload)
        return len(payload)

    def write_action(self, t_ns: int | None, action_msg: Mapping[str, Any]) -> None:
        """Append a wire ``action`` message (as received on ``agent.action``)."""
        self.write_event(ACTION, action_msg["t_ns"] if t_ns is None else t_ns, action_msg)

    def write_event(self, topic: str, t_ns: int, msg: Mapping[str, Any]) -> None:
        """Append a wire message on ``topic`` (``iwm.surprise``, ``iwm.latent``, ...).

        ``msg`` is validated with ``iwm_bus.wire.pack``; ``WireError`` if it does not fit.
        """
        _, payload = wire.pack(topic, msg)  # WireError for unknown topics, bad messages
        if base_topic(topic) in (RPC, FRAME):
            raise ValueError(f"topic {topic!r} is not recorded as an event; frames go "
                             "through write_frame")
        kind = msg.get("kind") or TOPIC_KINDS[base_topic(topic)][0]
        seq = msg.get("seq", 0)
        self._add(topic, kind, int(t_ns), payload, seq if isinstance(seq, int) else 0)

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


# ---------------------------------------------------------------- reading: the index


@dataclass
class _ChunkRef:
    # file offset of the chunk record (its opcode byte)
    offset: int
    start_ns: int
    end_ns: int
    # channels with messages in the chunk (None: unknown, read it for any topic)
    channel_ids: frozenset[int] | None


@dataclass
class _Index:
    schemas: dict[int, Schema] = field(default_factory=dict)
    channels: dict[int, Channel] = field(default_factory=dict)
    chunks: list[_ChunkRef] = field(default_factory=list)
    metadata: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    # True when the file had no usable index and was scanned up to its last complete chunk
    recovered: bool = False
    # why it was scanned, and where the readable part ends
    problem: str | None = None
    readable_bytes: int = 0


def _bad(path: Path, problem: str) -> SessionError:
    return SessionError(f"{path}: {problem}")


def _open_indexed(f: IO[bytes], size: int) -> _Index | str:
    """The index from the file's summary, or the reason it cannot be used."""
    f.seek(max(0, size - len(_MAGIC)))
    if size < 2 * len(_MAGIC) or f.read(len(_MAGIC)) != _MAGIC:
        return "no footer (the writer was killed before closing it, or the file is truncated)"
    try:
        f.seek(0)
        reader = make_reader(f)
        summary = reader.get_summary()
        if summary is None or summary.statistics is None:
            return "the file has no summary section"
        stats = summary.statistics
        if stats.message_count and not summary.chunk_indexes:
            return "the summary has no chunk index"
        index = _Index(schemas=dict(summary.schemas), channels=dict(summary.channels),
                       counts=Counter(dict(stats.channel_message_counts)), readable_bytes=size)
        for ci in summary.chunk_indexes:
            if not 0 < ci.chunk_start_offset < size:
                return f"chunk index points outside the file ({ci.chunk_start_offset})"
            ids = frozenset(ci.message_index_offsets) or None
            index.chunks.append(_ChunkRef(ci.chunk_start_offset, ci.message_start_time,
                                          ci.message_end_time, ids))
        index.metadata = [(m.name, dict(m.metadata)) for m in reader.iter_metadata()]
    except (McapError, struct.error, ValueError, UnicodeDecodeError, KeyError, EOFError) as e:
        return f"the summary is unreadable ({type(e).__name__}: {e})"
    return index


def _read_record(f: IO[bytes], pos: int, size: int) -> tuple[int, bytes] | str:
    """``(opcode, body)`` of the record at ``pos``, or why it is incomplete (truncated tail)."""
    f.seek(pos)
    head = f.read(_RECORD_HEADER.size)
    if len(head) < _RECORD_HEADER.size:
        return f"{size - pos} trailing bytes at byte {pos} are not a whole record"
    opcode, length = _RECORD_HEADER.unpack(head)
    end = pos + _RECORD_HEADER.size + length
    if opcode == 0:
        f.seek(pos)
        if not f.read(min(size - pos, 1 << 20)).strip(b"\0"):
            return f"the file ends in zero bytes from byte {pos}"
    if opcode not in _KNOWN_OPCODES:
        raise ValueError(f"unknown record opcode {opcode:#04x} at byte {pos}")
    if end > size:
        return (f"the {Opcode(opcode).name} record at byte {pos} is cut off "
                f"({length} bytes declared, {size - pos - _RECORD_HEADER.size} present)")
    if length > _MAX_RECORD_BYTES:
        raise ValueError(f"record at byte {pos} claims {length} bytes (limit {_MAX_RECORD_BYTES})")
    f.seek(pos + _RECORD_HEADER.size)
    return opcode, f.read(length)


def _chunk_records(body: bytes) -> tuple[Chunk, list[Any]]:
    chunk = Chunk.read(ReadDataStream(io.BytesIO(body)))
    return chunk, breakup_chunk(chunk, validate_crc=True)


def _scan(path: Path, f: IO[bytes], size: int, reason: str) -> _Index:
    """Read the file front to back up to its last complete chunk (no summary needed)."""
    index = _Index(recovered=True)
    pos = len(_MAGIC)
    stop = f"{reason}; read linearly to byte {size}"
    complete = False  # the data section's end (DataEnd) was reached
    while pos < size:
        try:
            got = _read_record(f, pos, size)
            if isinstance(got, str):
                stop = f"{reason}; {got}"
                break
            opcode, body = got
            if pos == len(_MAGIC) and opcode != Opcode.HEADER:
                raise ValueError(f"first record is {Opcode(opcode).name}, not HEADER")
            if opcode == Opcode.CHUNK:
                chunk, records = _chunk_records(body)
                ids: set[int] = set()
                for rec in records:
                    if isinstance(rec, Channel):
                        index.channels[rec.id] = rec
                    elif isinstance(rec, Schema):
                        index.schemas[rec.id] = rec
                    elif isinstance(rec, Message):
                        ids.add(rec.channel_id)
                        index.counts[rec.channel_id] += 1
                if records:
                    index.chunks.append(_ChunkRef(pos, chunk.message_start_time,
                                                  chunk.message_end_time, frozenset(ids)))
            elif opcode == Opcode.METADATA:
                meta = Metadata.read(ReadDataStream(io.BytesIO(body)))
                index.metadata.append((meta.name, dict(meta.metadata)))
            elif opcode == Opcode.MESSAGE:
                raise ValueError("unchunked message record (not written by iwm-bus)")
            elif opcode in (Opcode.DATA_END, Opcode.FOOTER):
                stop, complete = f"{reason}; data section complete", True
                pos += _RECORD_HEADER.size + len(body)
                break
        except (McapError, struct.error, ValueError, UnicodeDecodeError, zstandard.ZstdError,
                EOFError) as e:
            raise _bad(path, f"corrupted MCAP record at byte {pos}: {e}") from e
        pos += _RECORD_HEADER.size + len(body)
    if not index.chunks and not complete:
        raise _bad(path, f"no complete chunk to read ({stop}); the recording holds nothing")
    index.problem = stop
    index.readable_bytes = pos
    return index


def _build_index(path: Path) -> _Index:
    try:
        size = path.stat().st_size
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise _bad(path, "no such session file") from None
    except OSError as e:
        raise _bad(path, f"cannot open: {e}") from e
    with f:
        magic = f.read(len(_MAGIC))
        if magic != _MAGIC:
            what = "empty" if size == 0 else "too short" if size < len(_MAGIC) else \
                f"starts with {magic[:8]!r}"
            raise _bad(path, f"not an MCAP session file ({what}; expected the MCAP magic)")
        got = _open_indexed(f, size)
        return got if isinstance(got, _Index) else _scan(path, f, size, got)


# ---------------------------------------------------------------- reader


def _wire_action(msg: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The nested action map ``{vector?, action_id?}`` of a wire action message."""
    if msg is None:
        return None
    out = {k: msg[k] for k in ("vector", "action_id") if msg.get(k) is not None}
    return out or None


class SessionReader:
    """Read a session file: frames, actions and events in time order, transitions, info.

    Opens indexed (cleanly closed) files through their MCAP summary; a file without one (its
    recorder was killed) is scanned up to its last complete chunk and ``recovered`` is True.
    Anything else that is wrong raises ``SessionError`` naming the file and the problem.
    Every iterator opens its own file handle, so several may run at once.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._index = _build_index(self.path)
        self.recovered = self._index.recovered
        self.problem = self._index.problem
        self._topic_ids: dict[str, set[int]] = {}
        for cid, ch in self._index.channels.items():
            self._topic_ids.setdefault(ch.topic, set()).add(cid)
        self.metadata = self._decoded_metadata(META_NAME)
        self.end_metadata = self._decoded_metadata(END_META_NAME) or None
        if self.metadata.get("format") != "iwm-bus-session":
            raise _bad(self.path, "is an MCAP file but not an iwm-bus session "
                       f"(no {META_NAME} metadata record)")
        if self.metadata.get("format_version", 0) > FORMAT_VERSION:
            raise _bad(self.path, f"session format {self.metadata['format_version']} is newer "
                       f"than this iwm-bus reads ({FORMAT_VERSION}); upgrade iwm-bus")

    def _decoded_metadata(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for rec_name, values in self._index.metadata:
            if rec_name != name:
                continue
            for key, text in values.items():
                try:
                    out[key] = json.loads(text)
                except json.JSONDecodeError as e:
                    raise _bad(self.path, f"metadata {name}.{key} is not JSON: {e}") from e
        return out

    # ------------------------------------------------------------ counts

    @property
    def topics(self) -> dict[str, int]:
        """Message count per topic."""
        return {t: sum(self._index.counts[c] for c in ids) for t, ids in self._topic_ids.items()}

    @property
    def num_frames(self) -> int:
        return self.topics.get(FRAMES_TOPIC, 0)

    # ------------------------------------------------------------ iteration

    def _load_chunk(self, f: IO[bytes], ref: _ChunkRef) -> list[Message]:
        try:
            got = _read_record(f, ref.offset, self._index.readable_bytes or 1 << 62)
            if isinstance(got, str) or got[0] != Opcode.CHUNK:
                raise ValueError(got if isinstance(got, str) else "no chunk record there")
            _, records = _chunk_records(got[1])
        except (McapError, struct.error, ValueError, zstandard.ZstdError, EOFError) as e:
            raise _bad(self.path, f"corrupted chunk at byte {ref.offset}: {e}") from e
        return [r for r in records if isinstance(r, Message)]

    def raw_messages(self, topics: Iterable[str] | None = None, start_ns: int | None = None,
                     end_ns: int | None = None) -> Iterator[tuple[str, Message]]:
        """``(topic, mcap Message)`` in log-time order (file order for equal times)."""
        wanted: set[int] | None = None
        if topics is not None:
            wanted = set().union(*(self._topic_ids.get(t, set()) for t in topics))
            if not wanted:
                return
        heap: list[tuple[int, int, int, int, Any]] = []
        for ref in self._index.chunks:
            if wanted is not None and ref.channel_ids is not None \
                    and not wanted & ref.channel_ids:
                continue
            if end_ns is not None and ref.start_ns >= end_ns:
                continue
            if start_ns is not None and ref.end_ns < start_ns:
                continue
            heap.append((ref.start_ns, 0, ref.offset, 0, ref))
        heapq.heapify(heap)
        with open(self.path, "rb") as f:
            while heap:
                t, kind, offset, i, item = heapq.heappop(heap)
                if kind == 1:
                    yield self._index.channels[item.channel_id].topic, item
                    continue
                for j, msg in enumerate(self._load_chunk(f, item)):
                    if wanted is not None and msg.channel_id not in wanted:
                        continue
                    if (start_ns is not None and msg.log_time < start_ns) or \
                            (end_ns is not None and msg.log_time >= end_ns):
                        continue
                    if msg.channel_id not in self._index.channels:
                        raise _bad(self.path, f"message on unknown channel {msg.channel_id}")
                    heapq.heappush(heap, (msg.log_time, 1, offset, j, msg))

    def _decode(self, topic: str, msg: Message) -> Any:
        try:
            if topic == FRAMES_TOPIC:
                return _frame_record(msg.data)
            return wire.unpack([topic.encode(), msg.data])[1]
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as e:
            raise _bad(self.path, f"bad {topic} message at t={msg.log_time}: {e}") from e

    def messages(self, topics: Iterable[str] | None = None, start_ns: int | None = None,
                 end_ns: int | None = None) -> Iterator[tuple[str, int, Any]]:
        """``(topic, log_time_ns, msg)``: frames as ``FrameRecord``, the rest as wire dicts."""
        for topic, msg in self.raw_messages(topics, start_ns, end_ns):
            yield topic, msg.log_time, self._decode(topic, msg)

    def frame_records(self, start_ns: int | None = None,
                      end_ns: int | None = None) -> Iterator[FrameRecord]:
        """Frames still encoded (cheap: no pixel decoding)."""
        for _, _, rec in self.messages([FRAMES_TOPIC], start_ns, end_ns):
            yield rec

    def frames(self, start_ns: int | None = None, end_ns: int | None = None) -> Iterator[Frame]:
        """Decoded frames in capture-time order."""
        for rec in self.frame_records(start_ns, end_ns):
            yield self._to_frame(rec)

    def _to_frame(self, rec: FrameRecord) -> Frame:
        try:
            return rec.to_frame()
        except ValueError as e:
            raise _bad(self.path, f"frame {rec.seq} does not decode: {e}") from e

    def actions(self) -> Iterator[dict[str, Any]]:
        """Recorded ``agent.action`` messages in time order."""
        for _, _, msg in self.messages([ACTIONS_TOPIC]):
            yield msg

    def events(self, topic: str) -> Iterator[dict[str, Any]]:
        """Recorded wire messages on ``topic`` (e.g. ``iwm.surprise``) in time order."""
        for _, _, msg in self.messages([topic]):
            yield msg

    def frames_with_actions(self) -> Iterator[tuple[FrameRecord, dict[str, Any] | None]]:
        """Every frame (still encoded) with the action that produced it, or None.

        That action is the one stored with the frame when the source knew it (gym, replay);
        else the last ``agent.action`` whose ``frame_seq`` is the previous frame's seq; else
        the last action recorded between the previous frame and this one.
        """
        prev: FrameRecord | None = None
        linked: dict[str, Any] | None = None
        latest: dict[str, Any] | None = None
        for topic, _, msg in self.messages([FRAMES_TOPIC, ACTIONS_TOPIC]):
            if topic == ACTIONS_TOPIC:
                if prev is not None and msg.get("frame_seq") == prev.seq:
                    linked = msg
                latest = msg if prev is not None else None
                continue
            yield msg, msg.action or _wire_action(linked) or _wire_action(latest)
            prev, linked, latest = msg, None, None

    def transition_records(self, allow_gaps: bool = False) -> Iterator[
            tuple[FrameRecord, dict[str, Any] | None, FrameRecord]]:
        """``(record_t, action_t, record_t+1)`` with the frames still encoded.

        ``action_t`` produced frame t+1 (see ``frames_with_actions``). Pairs across a seq gap
        (frames the recorder missed) are skipped unless ``allow_gaps``.
        """
        prev: FrameRecord | None = None
        for rec, action in self.frames_with_actions():
            if prev is not None and (allow_gaps or rec.seq == prev.seq + 1):
                yield prev, action, rec
            prev = rec

    def transitions(self, allow_gaps: bool = False) -> Iterator[Transition]:
        """Decoded ``(frame_t, action_t, frame_t+1)`` (see ``transition_records``)."""
        last: Frame | None = None
        for rec, action, next_rec in self.transition_records(allow_gaps):
            frame = last if last is not None and last.seq == rec.seq and \
                last.t_ns == rec.t_ns else self._to_frame(rec)
            last = self._to_frame(next_rec)
            yield Transition(frame, action, last)

    def decode(self, rec: FrameRecord) -> np.ndarray:
        """The pixels of ``rec``; ``SessionError`` naming this file if they do not decode."""
        return self._to_frame(rec).pixels

    # ------------------------------------------------------------ summary

    def info(self) -> dict[str, Any]:
        """Duration, frames, fps, size, topics, action summary, metadata (one pass, no pixels)."""
        seqs: list[int] = []
        times: list[int] = []
        shapes: Counter = Counter()
        encodings: Counter = Counter()
        frame_bytes = 0
        ids: Counter = Counter()
        vec_dims: Counter = Counter()
        n_actions = 0
        for topic, _, msg in self.messages([FRAMES_TOPIC, ACTIONS_TOPIC]):
            if topic == FRAMES_TOPIC:
                seqs.append(msg.seq)
                times.append(msg.t_ns)
                shapes[(msg.height, msg.width, msg.channels)] += 1
                encodings[msg.encoding] += 1
                frame_bytes += len(msg.data)
                if msg.action:
                    _count_action(msg.action, ids, vec_dims)
            else:
                n_actions += 1
                _count_action(msg, ids, vec_dims)
        duration = (max(times) - min(times)) / 1e9 if times else 0.0
        missing = sum(max(0, b - a - 1) for a, b in zip(seqs, seqs[1:], strict=False))
        return {
            "path": str(self.path), "size_bytes": self.path.stat().st_size,
            "recovered": self.recovered, "problem": self.problem,
            "duration_s": duration, "frames": len(seqs),
            "fps": (len(seqs) - 1) / duration if duration > 0 else 0.0,
            "seq_first": seqs[0] if seqs else None, "seq_last": seqs[-1] if seqs else None,
            "seq_missing": missing,
            "frame_shapes": {"x".join(map(str, k)): v for k, v in shapes.items()},
            "frame_encodings": dict(encodings),
            "bytes_per_frame": frame_bytes / len(seqs) if seqs else 0.0,
            "topics": self.topics,
            "actions": {"messages": n_actions, "action_ids": dict(sorted(ids.items())),
                        "vector_dims": dict(vec_dims)},
            "metadata": self.metadata, "end": self.end_metadata,
        }

    def close(self) -> None:
        """Nothing to release (iterators own their handles); kept for symmetry."""

    def __enter__(self) -> SessionReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"SessionReader({str(self.path)!r}, frames={self.num_frames}, "
                f"recovered={self.recovered})")


def _count_action(action: Mapping[str, Any], ids: Counter, dims: Counter) -> None:
    if action.get("action_id") is not None:
        ids[action["action_id"]] += 1
    if action.get("vector") is not None:
        dims[int(np.asarray(action["vector"]).shape[0])] += 1


def _frame_record(data: bytes) -> FrameRecord:
    body = msgpack.unpackb(data, raw=False, strict_map_key=True, max_ext_len=0)
    if not isinstance(body, dict) or set(body) != set(_FRAME_FIELDS):
        keys = sorted(body) if isinstance(body, dict) else type(body).__name__
        raise ValueError(f"frame record must have fields {_FRAME_FIELDS}, got {keys}")
    ints = ("seq", "t_ns", "height", "width", "channels")
    if not all(isinstance(body[k], int) and not isinstance(body[k], bool) for k in ints):
        raise ValueError(f"frame record fields {ints} must be ints")
    if body["encoding"] not in FRAME_ENCODINGS or body["channels"] not in (1, 3, 4):
        raise ValueError(f"frame encoding {body['encoding']!r} / channels "
                         f"{body['channels']!r} not supported")
    if not isinstance(body["data"], bytes) or min(body["height"], body["width"]) < 1:
        raise ValueError("frame record has no pixel data or an empty shape")
    return FrameRecord(body["seq"], body["t_ns"], body["encoding"], body["height"],
                       body["width"], body["channels"], body["data"],
                       _decode_action(body["action"]))


# ---------------------------------------------------------------- recover


class RecoverResult(NamedTuple):
    """What ``recover`` did: ``needed`` is False when the file was already valid."""

    path: Path
    needed: bool
    messages: int
    frames: int
    bytes_dropped: int
    problem: str | None


def recover(path: str | os.PathLike[str],
            out: str | os.PathLike[str] | None = None) -> RecoverResult:
    """Rewrite ``path`` (an unclosed session) as a valid, indexed MCAP file.

    Everything up to the last complete chunk is kept. ``out=None`` replaces ``path`` in place
    (atomically, through a temporary file beside it); a valid file is then left alone.
    """
    reader = SessionReader(path)
    src = reader.path
    dest = Path(out) if out is not None else src
    dropped = src.stat().st_size - reader._index.readable_bytes if reader.recovered else 0
    if not reader.recovered and dest == src:
        return RecoverResult(src, False, sum(reader.topics.values()), reader.num_frames, 0, None)
    tmp = dest.with_name(f".{dest.name}.recover-{os.getpid()}.tmp")
    try:
        count = _rewrite(reader, tmp, dropped)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return RecoverResult(dest, reader.recovered, count, reader.num_frames, dropped,
                         reader.problem)


def _rewrite(reader: SessionReader, dest: Path, dropped: int) -> int:
    """Copy every readable message and metadata record of ``reader`` into a new MCAP file."""
    index = reader._index
    with open(dest, "wb") as f:
        writer = Writer(f)
        writer.start(profile="iwm-bus", library=f"iwm-bus/{__version__} (recovered)")
        for name, values in index.metadata:
            writer.add_metadata(name, values)
        writer.add_metadata(RECOVER_META_NAME, {
            "from": json.dumps(str(reader.path)), "problem": json.dumps(reader.problem),
            "bytes_dropped": json.dumps(dropped),
            "recovered_utc": json.dumps(datetime.now(timezone.utc).isoformat())})
        schema_ids: dict[int, int] = {}
        channel_ids: dict[int, int] = {}
        count = 0
        with open(reader.path, "rb") as src:
            for ref in index.chunks:
                for msg in reader._load_chunk(src, ref):
                    ch = index.channels[msg.channel_id]
                    if ch.id not in channel_ids:
                        if ch.schema_id and ch.schema_id not in schema_ids:
                            s = index.schemas.get(ch.schema_id)
                            if s is None:
                                raise _bad(reader.path, f"channel {ch.topic!r} names missing "
                                           f"schema {ch.schema_id}")
                            schema_ids[ch.schema_id] = writer.register_schema(
                                s.name, s.encoding, s.data)
                        channel_ids[ch.id] = writer.register_channel(
                            ch.topic, ch.message_encoding, schema_ids.get(ch.schema_id, 0),
                            dict(ch.metadata))
                    writer.add_message(channel_ids[ch.id], msg.log_time, msg.data,
                                       msg.publish_time, msg.sequence)
                    count += 1
        writer.finish()
    return count
