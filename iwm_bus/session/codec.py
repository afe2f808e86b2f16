"""Session records: the format constants, frame encodings and payload (de)serialisation.

Frames are stored ``png`` (lossless), ``zstd-raw`` (zstd of the raw ``(H, W, C)`` uint8
bytes) or ``jpeg`` (lossy), each as a msgpack map with the nested wire action map that
produced it. Format 2 adds *viewer copies* for standard MCAP tools (Foxglove): each frame
as a ``foxglove.CompressedImage`` protobuf (``viewer_image``) and the plottable numbers of
surprise, MRR and action messages as plain JSON objects (``plot_message``, ``plot_schema``).
Pure functions over bytes and arrays; no files. See ``iwm_bus.session``.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import msgpack
import numpy as np
import zstandard

from iwm_bus.bus import wire
from iwm_bus.bus.topics import ACTION, MRR, SURPRISE, base_topic

#: 1: msgpack channels only; 2: plus the viewer channels (``/viewer/...``)
FORMAT_VERSION = 2
FRAMES_TOPIC = "frames"
ACTIONS_TOPIC = ACTION
FRAME_ENCODINGS = ("png", "zstd-raw", "jpeg")
META_NAME = "iwm_bus.session"
END_META_NAME = "iwm_bus.session.end"
RECOVER_META_NAME = "iwm_bus.session.recovered"
CONVERT_META_NAME = "iwm_bus.session.converted"
#: topics of the viewer copies start with this; readers of the data skip them
VIEWER_PREFIX = "/viewer/"
VIEWER_FRAMES_TOPIC = VIEWER_PREFIX + "frames"
#: the schema of the viewer frames (``foxglove.CompressedImage``, message encoding protobuf)
IMAGE_SCHEMA_NAME = "foxglove.CompressedImage"
#: wire topics with a JSON viewer copy, and its topic name (``.suffix`` becomes ``/suffix``)
PLOT_TOPICS = {SURPRISE: "surprise", MRR: "mrr", ACTION: "action"}
_FRAME_FIELDS = ("seq", "t_ns", "encoding", "height", "width", "channels", "data", "action")
FRAME_SCHEMA = {
    "title": "iwm_bus.session.frame", "type": "object",
    "properties": {"seq": {"type": "integer"}, "t_ns": {"type": "integer"},
                   "encoding": {"enum": list(FRAME_ENCODINGS)},
                   "height": {"type": "integer"}, "width": {"type": "integer"},
                   "channels": {"enum": [1, 3, 4]}, "data": {"contentEncoding": "binary"},
                   "action": {"type": ["object", "null"]}}}


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


def as_frame_array(pixels: Any) -> np.ndarray:
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8:
        raise ValueError(f"frame must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or min(arr.shape[:2]) < 1:
        raise ValueError(f"frame must be (H, W) or (H, W, C) with C in 1, 3, 4; got {arr.shape}")
    return np.ascontiguousarray(arr)


def encode_action(action: Mapping[str, Any] | None) -> dict[str, Any] | None:
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
    if not isinstance(value, dict):  # keys a newer writer added are left out
        raise ValueError(f"frame action must be a map of vector/action_id, got {value!r:.80}")
    out: dict[str, Any] = {}
    if value.get("vector") is not None:
        out["vector"] = wire.decode_array(value["vector"])
    if value.get("action_id") is not None:
        if not isinstance(value["action_id"], int):
            raise ValueError("frame action_id must be an int")
        out["action_id"] = value["action_id"]
    return out


def wire_action(msg: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The nested action map ``{vector?, action_id?}`` of a wire action message."""
    if msg is None:
        return None
    out = {k: msg[k] for k in ("vector", "action_id") if msg.get(k) is not None}
    return out or None


def frame_record(data: bytes, unknown: wire.Unknowns | None = None) -> FrameRecord:
    """A stored frame record; fields a newer writer added are left out (counted in
    ``unknown``), as the wire's compatibility rule says (docs/wire.md)."""
    body = msgpack.unpackb(data, raw=False, strict_map_key=True, max_ext_len=0)
    if not isinstance(body, dict) or not body.keys() >= set(_FRAME_FIELDS):
        keys = sorted(body) if isinstance(body, dict) else type(body).__name__
        raise ValueError(f"frame record must have fields {_FRAME_FIELDS}, got {keys}")
    if unknown is not None and len(body) > len(_FRAME_FIELDS):
        unknown.fields += 1
        unknown.last = f"frame record {sorted(set(body) - set(_FRAME_FIELDS))}"
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


# ---------------------------------------------------------------- viewer copies (format 2)


def is_viewer_topic(topic: str) -> bool:
    """True for the viewer copies (``/viewer/...``), which the session readers skip."""
    return topic.startswith(VIEWER_PREFIX)


def plot_topic(topic: str) -> str | None:
    """The viewer topic of wire topic ``topic`` (``iwm.surprise.inv`` -> ``/viewer/surprise/inv``),
    or None when the topic gets no JSON copy (latents, stats)."""
    try:
        base = base_topic(topic)
    except KeyError:
        return None
    name = PLOT_TOPICS.get(base)
    if name is None:
        return None
    suffix = topic[len(base) + 1:].replace(".", "/")
    return VIEWER_PREFIX + name + (f"/{suffix}" if suffix else "")


def image_schema() -> bytes:
    """The ``foxglove.CompressedImage`` FileDescriptorSet (schema encoding protobuf)."""
    from foxglove_schemas_protobuf.CompressedImage_pb2 import CompressedImage
    from mcap_protobuf.schema import build_file_descriptor_set

    return build_file_descriptor_set(CompressedImage).SerializeToString()


def viewer_image(rec: FrameRecord, png_level: int = 1) -> bytes:
    """``rec`` as a serialised ``foxglove.CompressedImage``: its own bytes when they are PNG or
    JPEG, else its pixels as PNG (lossless); ``timestamp`` is the capture time."""
    from foxglove_schemas_protobuf.CompressedImage_pb2 import CompressedImage

    if rec.encoding in ("png", "jpeg"):
        data, fmt = rec.data, rec.encoding
    else:
        data, fmt = encode_frame(rec.decode(), "png", png_level=png_level), "png"
    msg = CompressedImage(frame_id=FRAMES_TOPIC, data=data, format=fmt)
    msg.timestamp.FromNanoseconds(rec.t_ns)
    return msg.SerializeToString()


def _plot_fields(kind: str) -> dict[str, str]:
    """Plottable fields of wire kind ``kind``: name -> JSON Schema type."""
    out: dict[str, str] = {}
    for name, spec in wire.SCHEMA[kind].items():
        base = spec.rstrip("?")
        if name.startswith("t_") or base in ("map", "bool"):
            continue  # times become t_ns / timestamp
        if base == "action":
            out.update(action_id="integer", action_vector="array")
        else:
            out[name] = {"int": "integer", "number": "number", "str": "string",
                         "array": "array"}[base]
    return out


def plot_schema(kind: str) -> bytes:
    """JSON Schema (schema encoding ``jsonschema``) of the JSON viewer copy of ``kind``."""
    props: dict[str, Any] = {
        "t_ns": {"type": "integer", "description": "log time, ns since the Unix epoch"},
        "timestamp": {"type": "object", "title": "time", "description": "log time",
                      "properties": {"sec": {"type": "integer"}, "nsec": {"type": "integer"}}}}
    for name, typ in _plot_fields(kind).items():
        props[name] = ({"type": ["array", "null"], "items": {"type": "number"}}
                       if typ == "array" else {"type": [typ, "null"]})
    return json.dumps({"title": f"iwm_bus.viewer.{kind}", "type": "object",
                       "properties": props}).encode()


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN / inf
    return value


def _json_vector(value: Any) -> list[Any] | None:
    if value is None:
        return None
    return [_json_number(float(x)) for x in np.asarray(value, np.float64).ravel()]


def plot_message(kind: str, log_time: int, msg: Mapping[str, Any]) -> bytes:
    """A decoded wire message as its JSON viewer copy: numbers, ``seq``, the log time."""
    out: dict[str, Any] = {"t_ns": int(log_time),
                           "timestamp": {"sec": log_time // 1_000_000_000,
                                         "nsec": log_time % 1_000_000_000}}
    for name, typ in _plot_fields(kind).items():
        if name in ("action_id", "action_vector") and kind != "action":
            action = msg.get("action") or {}
            value = action.get(name.removeprefix("action_"))
        else:
            value = msg.get(name)
        if typ == "array":
            out[name] = _json_vector(value)
        elif value is None:
            out[name] = None
        elif typ == "number":
            out[name] = _json_number(float(value))
        else:
            out[name] = int(value) if typ == "integer" else str(value)
    return json.dumps(out, allow_nan=False).encode()
