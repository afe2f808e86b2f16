"""Session files: recorded frames, actions and world-model events in one MCAP file.

A session is an `MCAP <https://mcap.dev>`_ file (chunked, zstd-compressed chunks, indexed when
closed cleanly). Data channels (MCAP topics), every payload a msgpack map (``message_encoding
"msgpack"``; each channel's schema is a small JSON Schema, ``schema encoding "jsonschema"``):

``frames``
    ``{seq, t_ns, encoding, height, width, channels, data, action}``: ``encoding`` is ``png``
    (lossless, default), ``zstd-raw`` (zstd of the raw ``(H, W, C)`` uint8 bytes; lossless,
    fastest) or ``jpeg`` (lossy, ``jpeg_quality``); ``action`` is the nested action map of the
    wire schema (``{vector?, action_id?}``) that produced the frame, when the source knew it.
``agent.action``
    the wire ``action`` message payload (``iwm_bus.bus.wire``), as published on the bus.
``iwm.latent``, ``iwm.surprise``, ``iwm.mrr`` (``.suffix`` too), ``iwm.stats``
    the wire payloads the worker published (optional).

Format 2 adds *viewer channels* (``SessionOptions.viewer``, on by default), copies that
standard MCAP tools decode without iwm-bus, because no viewer decodes msgpack:

``/viewer/frames``
    every frame as a ``foxglove.CompressedImage`` (``message_encoding "protobuf"``, schema the
    FileDescriptorSet of ``foxglove-schemas-protobuf``): the frame's own PNG or JPEG bytes,
    or, for ``zstd-raw``, its pixels as PNG (lossless).
``/viewer/surprise``, ``/viewer/mrr``, ``/viewer/action`` (``/suffix`` for ``.suffix`` streams)
    the numbers of each surprise, MRR and action message as a JSON object (``message_encoding
    "json"``, ``jsonschema`` schema): ``t_ns``, ``timestamp {sec, nsec}``, ``seq`` and the
    number fields of the wire kind (nil as null).

Why copies, not a new encoding of ``frames``: ``frames`` stays the one record replay,
``iwm-session`` and training read (any encoding, the action, exact pixels), and v1 readers'
code paths stay as they are; the price is that PNG bytes are stored twice. Latents and stats
stay msgpack only. The readers here skip the viewer channels (``topics`` leaves them out;
``viewer_topics`` lists them). Format 1 files (no viewer channels) read the same; ``convert``
adds the viewer channels to one.

Compatibility follows the wire's rule (docs/wire.md): ``format_version`` is the major
version; a newer writer may add metadata keys, frame-record fields, channels, and wire fields
and kinds in the event channels without changing it, and the readers here leave out what
they do not know and count it (``SessionReader.unknown``); a file of a newer major version
is refused with one line naming both versions.

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
import json
import os
import struct
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, NamedTuple

import msgpack
import numpy as np
import zstandard
from mcap.exceptions import McapError
from mcap.opcode import Opcode
from mcap.records import Message
from mcap.writer import Writer
from tqdm import tqdm

from iwm_bus import __version__
from iwm_bus.bus import wire
from iwm_bus.bus.topics import TOPIC_KINDS, base_topic
from iwm_bus.errors import UnknownMessage
from iwm_bus.session.codec import (
    ACTIONS_TOPIC,
    CONVERT_META_NAME,
    END_META_NAME,
    FORMAT_VERSION,
    FRAMES_TOPIC,
    META_NAME,
    RECOVER_META_NAME,
    Frame,
    FrameRecord,
    Transition,
    frame_record,
    is_viewer_topic,
    wire_action,
)
from iwm_bus.session.scan import ChunkRef, bad, build_index, chunk_records, read_record
from iwm_bus.session.writer import SessionOptions, SessionWriter

__all__ = ["ConvertResult", "RecoverResult", "SessionReader", "convert", "recover"]


def _is_wire_topic(topic: str) -> bool:
    try:
        base_topic(topic)
    except KeyError:
        return False
    return True


# ---------------------------------------------------------------- reader


class SessionReader:
    """Read a session file: frames, actions and events in time order, transitions, info.

    Opens indexed (cleanly closed) files through their MCAP summary; a file without one (its
    recorder was killed) is scanned up to its last complete chunk and ``recovered`` is True.
    Anything else that is wrong raises ``SessionError`` naming the file and the problem.
    Every iterator opens its own file handle, so several may run at once.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._index = build_index(self.path)
        self.recovered = self._index.recovered
        self.problem = self._index.problem
        self._topic_ids: dict[str, set[int]] = {}
        for cid, ch in self._index.channels.items():
            self._topic_ids.setdefault(ch.topic, set()).add(cid)
        self.metadata = self._decoded_metadata(META_NAME)
        self.end_metadata = self._decoded_metadata(END_META_NAME) or None
        # what a newer writer put in that this reader leaves out: fields of frame records
        # and events, and messages of channels or kinds it does not know
        self.unknown = wire.Unknowns()
        if self.metadata.get("format") != "iwm-bus-session":
            raise bad(self.path, "is an MCAP file but not an iwm-bus session "
                       f"(no {META_NAME} metadata record)")
        version = self.metadata.get("format_version", 1)
        if isinstance(version, bool) or not isinstance(version, int):
            raise bad(self.path, f"format_version {version!r} is not an integer")
        if version > FORMAT_VERSION:
            raise bad(self.path, f"session format {version} is newer than this iwm-bus reads "
                       f"({FORMAT_VERSION}); upgrade iwm-bus")

    def _decoded_metadata(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for rec_name, values in self._index.metadata:
            if rec_name != name:
                continue
            for key, text in values.items():
                try:
                    out[key] = json.loads(text)
                except json.JSONDecodeError as e:
                    raise bad(self.path, f"metadata {name}.{key} is not JSON: {e}") from e
        return out

    # ------------------------------------------------------------ counts

    @property
    def format_version(self) -> int:
        return int(self.metadata.get("format_version", 1))

    @property
    def topics(self) -> dict[str, int]:
        """Message count per data topic (the viewer copies are in ``viewer_topics``)."""
        return {t: sum(self._index.counts[c] for c in ids) for t, ids in self._topic_ids.items()
                if not is_viewer_topic(t)}

    @property
    def viewer_topics(self) -> dict[str, int]:
        """Message count per viewer topic (``/viewer/...``, format 2)."""
        return {t: sum(self._index.counts[c] for c in ids) for t, ids in self._topic_ids.items()
                if is_viewer_topic(t)}

    @property
    def num_frames(self) -> int:
        return self.topics.get(FRAMES_TOPIC, 0)

    # ------------------------------------------------------------ iteration

    def _load_chunk(self, f: IO[bytes], ref: ChunkRef) -> list[Message]:
        try:
            got = read_record(f, ref.offset, self._index.readable_bytes or 1 << 62)
            if isinstance(got, str) or got[0] != Opcode.CHUNK:
                raise ValueError(got if isinstance(got, str) else "no chunk record there")
            _, records = chunk_records(got[1])
        except (McapError, struct.error, ValueError, zstandard.ZstdError, EOFError) as e:
            raise bad(self.path, f"corrupted chunk at byte {ref.offset}: {e}") from e
        return [r for r in records if isinstance(r, Message)]

    def raw_messages(self, topics: Iterable[str] | None = None, start_ns: int | None = None,
                     end_ns: int | None = None) -> Iterator[tuple[str, Message]]:
        """``(topic, mcap Message)`` in log-time order (file order for equal times).

        ``topics=None``: every data topic (not the viewer copies; name those to get them).
        """
        wanted: set[int] | None = None
        if topics is None and self.viewer_topics:
            topics = list(self.topics)
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
                        raise bad(self.path, f"message on unknown channel {msg.channel_id}")
                    heapq.heappush(heap, (msg.log_time, 1, offset, j, msg))

    def _decode(self, topic: str, msg: Message) -> Any:
        """The record, or None for a channel or kind this reader does not know (counted)."""
        try:
            if topic == FRAMES_TOPIC:
                return frame_record(msg.data, self.unknown)
            if not _is_wire_topic(topic):  # a newer writer's channel
                self.unknown.kinds += 1
                self.unknown.last = f"channel {topic!r}"
                return None
            return wire.unpack([topic.encode(), msg.data], unknown=self.unknown)[1]
        except UnknownMessage:
            return None
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as e:
            raise bad(self.path, f"bad {topic} message at t={msg.log_time}: {e}") from e

    def messages(self, topics: Iterable[str] | None = None, start_ns: int | None = None,
                 end_ns: int | None = None) -> Iterator[tuple[str, int, Any]]:
        """``(topic, log_time_ns, msg)``: frames as ``FrameRecord``, the rest as wire dicts;
        messages of channels and kinds this reader does not know are passed over and
        counted in ``unknown``."""
        for topic, msg in self.raw_messages(topics, start_ns, end_ns):
            got = self._decode(topic, msg)
            if got is not None:
                yield topic, msg.log_time, got

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
            raise bad(self.path, f"frame {rec.seq} does not decode: {e}") from e

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
            yield msg, msg.action or wire_action(linked) or wire_action(latest)
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
            "topics": self.topics, "viewer_topics": self.viewer_topics,
            "format_version": self.format_version,
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
            # a progress bar on a terminal only (disable=None), never in logs or pipes
            for ref in tqdm(index.chunks, unit="chunk", desc=f"recover {reader.path.name}",
                            disable=None, leave=False):
                for msg in reader._load_chunk(src, ref):
                    ch = index.channels[msg.channel_id]
                    if ch.id not in channel_ids:
                        if ch.schema_id and ch.schema_id not in schema_ids:
                            s = index.schemas.get(ch.schema_id)
                            if s is None:
                                raise bad(reader.path, f"channel {ch.topic!r} names missing "
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


# ---------------------------------------------------------------- convert (format 1 -> 2)


class ConvertResult(NamedTuple):
    """What ``convert`` did: ``needed`` is False when the file already had viewer channels."""

    path: Path
    needed: bool
    from_version: int
    messages: int
    frames: int
    viewer_messages: int
    problem: str | None


class _CopyWriter(SessionWriter):
    """A ``SessionWriter`` whose header metadata record is given verbatim (for ``convert``)."""

    def __init__(self, path: Path, header: dict[str, str], options: SessionOptions) -> None:
        self._copied_header = header
        super().__init__(path, overwrite=True, options=options)

    def _header_metadata(self, user: Mapping[str, Any]) -> dict[str, str]:
        return self._copied_header


def _convert_options(reader: SessionReader) -> SessionOptions:
    """The session's own writer options (chunking, PNG level), with the viewer channels on."""
    saved = reader.metadata.get("options")
    known = {f for f in SessionOptions.__dataclass_fields__}
    opts = {k: v for k, v in saved.items() if k in known} if isinstance(saved, dict) else {}
    try:
        return SessionOptions(**{**opts, "viewer": True})
    except (TypeError, ValueError):
        return SessionOptions()


def convert(path: str | os.PathLike[str],
            out: str | os.PathLike[str] | None = None) -> ConvertResult:
    """Rewrite ``path`` (format 1, or any session without viewer channels) as format 2.

    Every readable data message is copied byte for byte (times and sequence numbers kept)
    and gets its viewer copy; metadata records are kept, ``format_version`` becomes 2 and a
    ``iwm_bus.session.converted`` record says from what. An unclosed file is read up to its
    last complete chunk (as ``recover`` does). ``out=None`` replaces ``path`` atomically (a
    file that already has viewer channels is then left alone); a failure leaves ``path``
    untouched and no output behind. ``SessionError`` names the file and the problem.
    """
    reader = SessionReader(path)
    src = reader.path
    dest = Path(out) if out is not None else src
    ready = reader.format_version >= FORMAT_VERSION and not reader.recovered and (
        bool(reader.viewer_topics) or reader.num_frames == 0)
    if ready and dest == src:
        return ConvertResult(src, False, reader.format_version, sum(reader.topics.values()),
                             reader.num_frames, sum(reader.viewer_topics.values()), None)
    tmp = dest.with_name(f".{dest.name}.convert-{os.getpid()}.tmp")
    try:
        counts = _convert_into(reader, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return ConvertResult(dest, True, reader.format_version, *counts, reader.problem)


def _convert_into(reader: SessionReader, dest: Path) -> tuple[int, int, int]:
    """Write ``reader``'s data and their viewer copies to ``dest``: (messages, frames, viewer)."""
    header = next(dict(v) for n, v in reader._index.metadata if n == META_NAME)
    options = _convert_options(reader)
    header["format_version"] = json.dumps(FORMAT_VERSION)
    if isinstance(reader.metadata.get("options"), dict):
        header["options"] = json.dumps({**reader.metadata["options"], "viewer": True})
    messages = frames = 0
    with _CopyWriter(dest, header, options) as w:
        for name, values in reader._index.metadata:
            if name not in (META_NAME, END_META_NAME, CONVERT_META_NAME):
                w._mcap.add_metadata(name, values)
        w._mcap.add_metadata(CONVERT_META_NAME, {
            "from": json.dumps(str(reader.path)),
            "from_format_version": json.dumps(reader.format_version),
            "problem": json.dumps(reader.problem), "software_version": json.dumps(__version__),
            "converted_utc": json.dumps(datetime.now(timezone.utc).isoformat())})
        for topic, msg in tqdm(reader.raw_messages(), total=sum(reader.topics.values()),
                               unit="msg", desc=f"convert {reader.path.name}", disable=None,
                               leave=False):
            kind = reader._index.channels[msg.channel_id].metadata.get("kind")
            if topic == FRAMES_TOPIC:
                kind = "frame-record"
            elif kind is None:
                try:
                    kind = TOPIC_KINDS[base_topic(topic)][0]
                except KeyError:
                    raise bad(reader.path, f"topic {topic!r} is not one iwm-bus records; "
                               "cannot convert it") from None
            decoded = reader._decode(topic, msg)
            w._add(topic, kind, msg.log_time, msg.data, msg.sequence, msg.publish_time)
            messages += 1
            if topic == FRAMES_TOPIC:
                frames += 1
                try:
                    w._add_viewer_frame(decoded, msg.publish_time)
                except ValueError as e:
                    raise bad(reader.path, f"frame {decoded.seq} does not decode: {e}") from e
            elif decoded is not None:  # None: a kind this reader does not know (copied)
                w._add_viewer_event(topic, kind, msg.log_time, decoded, msg.publish_time)
        w.frames_written = frames
        viewer = w.messages_written - messages
        w.close(end_metadata=reader.end_metadata)
    return messages, frames, viewer
