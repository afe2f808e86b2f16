"""Session file index: from an MCAP summary, or a crash-tolerant linear scan.

A cleanly closed session is opened through its summary (``_open_indexed``). A file without
one (its recorder was killed) is read front to back up to its last complete chunk
(``_scan``); the result says so (``recovered``) and why. See ``iwm_bus.session``.
"""

from __future__ import annotations

import io
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import zstandard
from mcap.data_stream import ReadDataStream
from mcap.exceptions import McapError
from mcap.opcode import Opcode
from mcap.reader import make_reader
from mcap.records import Channel, Chunk, Message, Metadata, Schema
from mcap.stream_reader import breakup_chunk

from iwm_bus.errors import SessionError

_MAGIC = b"\x89MCAP0\r\n"
_RECORD_HEADER = struct.Struct("<BQ")
_KNOWN_OPCODES = frozenset(int(op) for op in Opcode)
#: largest record the reader loads (a chunk holds a few MiB; a 4K raw frame is 25 MiB)
_MAX_RECORD_BYTES = 1 << 30


@dataclass
class ChunkRef:
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
    chunks: list[ChunkRef] = field(default_factory=list)
    metadata: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    # True when the file had no usable index and was scanned up to its last complete chunk
    recovered: bool = False
    # why it was scanned, and where the readable part ends
    problem: str | None = None
    readable_bytes: int = 0


def bad(path: Path, problem: str) -> SessionError:
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
            index.chunks.append(ChunkRef(ci.chunk_start_offset, ci.message_start_time,
                                          ci.message_end_time, ids))
        index.metadata = [(m.name, dict(m.metadata)) for m in reader.iter_metadata()]
    except (McapError, struct.error, ValueError, UnicodeDecodeError, KeyError, EOFError) as e:
        return f"the summary is unreadable ({type(e).__name__}: {e})"
    return index


def read_record(f: IO[bytes], pos: int, size: int) -> tuple[int, bytes] | str:
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


def chunk_records(body: bytes) -> tuple[Chunk, list[Any]]:
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
            got = read_record(f, pos, size)
            if isinstance(got, str):
                stop = f"{reason}; {got}"
                break
            opcode, body = got
            if pos == len(_MAGIC) and opcode != Opcode.HEADER:
                raise ValueError(f"first record is {Opcode(opcode).name}, not HEADER")
            if opcode == Opcode.CHUNK:
                chunk, records = chunk_records(body)
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
                    index.chunks.append(ChunkRef(pos, chunk.message_start_time,
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
            raise bad(path, f"corrupted MCAP record at byte {pos}: {e}") from e
        pos += _RECORD_HEADER.size + len(body)
    if not index.chunks and not complete:
        raise bad(path, f"no complete chunk to read ({stop}); the recording holds nothing")
    index.problem = stop
    index.readable_bytes = pos
    return index


def build_index(path: Path) -> _Index:
    try:
        size = path.stat().st_size
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise bad(path, "no such session file") from None
    except OSError as e:
        raise bad(path, f"cannot open: {e}") from e
    with f:
        magic = f.read(len(_MAGIC))
        if magic != _MAGIC:
            what = "empty" if size == 0 else "too short" if size < len(_MAGIC) else \
                f"starts with {magic[:8]!r}"
            raise bad(path, f"not an MCAP session file ({what}; expected the MCAP magic)")
        got = _open_indexed(f, size)
        return got if isinstance(got, _Index) else _scan(path, f, size, got)
