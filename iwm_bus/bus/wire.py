"""Wire schema: every bus message is ``[topic, payload]`` with a msgpack map as payload.

The payload is a map ``{"v": 1, "kind": <kind>, ...fields}``. Arrays travel as a map with
exactly the keys ``dtype`` (numpy dtype string, little-endian: ``<f4``, ``<f2``, ``<f8``,
``|u1``, ``<i4``, ``<i8``), ``shape`` (list of ints) and ``data`` (raw bytes, C order), never
as lists of floats and never pickled. docs/wire.md is the reference for
subscribers in other languages; ``SCHEMA`` below is the same table in code.

``pack`` validates what it sends, ``unpack`` validates what it receives; ``unpack`` raises
``WireError`` for anything malformed and nothing else, and never allocates according to a size
it has not checked.

Compatibility (docs/wire.md): the schema is v1.``MINOR``, and ``v`` on the wire is its major
version. A reader ignores the fields it does not know (``unpack`` returns the message without
them) and passes over the kinds and topics it does not know (``UnknownMessage``, a
``WireError``); an ``Unknowns`` given to ``unpack`` counts both. A field a minor version adds
is optional (``HISTORY`` lists them); a breaking change bumps ``VERSION``, and a message from a
peer of another major is refused with ``WireVersionError``, one line naming both versions.
``pack`` stays strict: a writer sends only what its own schema has.

    frames = pack("iwm.surprise", {"seq": 7, "t_capture_ns": t, "t_publish_ns": t2,
                                   "surprise": 0.41, "action": None, "variant": "core"})
    topic, msg = unpack(frames)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack
import numpy as np

from iwm_bus.bus.topics import TOPIC_KINDS, base_topic
from iwm_bus.errors import UnknownMessage, WireError, WireVersionError

__all__ = ["ARRAY_KEYS", "DTYPES", "HISTORY", "MAX_ARRAY_ELEMENTS", "MAX_DEPTH",
           "MAX_MESSAGE_BYTES", "MAX_NDIM", "MAX_TOPIC_BYTES", "MINOR", "SCHEMA", "VERSION",
           "UnknownMessage", "Unknowns", "WireError", "WireVersionError", "decision_text",
           "decode_array", "encode_array", "make_action", "make_decision", "pack",
           "schema_at", "unpack", "version_text"]

#: the major version, ``v`` in every message: a peer of another major is refused
VERSION = 1
#: what each minor version of schema v1 added to v1.0, as "kind" (a new kind) or
#: "kind.field" (a new field, always optional); SCHEMA below is v1.MINOR. A new field or kind
#: gets a new minor here (tests/bus/test_compat.py holds v1.0 and checks the rest)
HISTORY: dict[int, tuple[str, ...]] = {
    1: ("surprise.surprise_z",),
    2: ("decision",),
    3: ("frame.ring_id",),
    4: ("ready",),
    5: ("frame.codec", "frame.lossy"),
    6: ("frame.env", "latent.env", "surprise.env", "mrr.env"),
}
MINOR = max(HISTORY)
#: largest payload accepted (a 1080p RGB frame inline is ~6 MiB)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: largest single array accepted, in elements
MAX_ARRAY_ELEMENTS = 32 * 1024 * 1024
MAX_NDIM = 5
MAX_TOPIC_BYTES = 256
MAX_DEPTH = 8
DTYPES = frozenset({"<f4", "<f2", "<f8", "|u1", "<i4", "<i8"})
ARRAY_KEYS = frozenset({"dtype", "shape", "data"})
_NP_DTYPES = {name: np.dtype(name) for name in DTYPES}
_WIRE_DTYPES = {dtype: name for name, dtype in _NP_DTYPES.items()}

# Field specs: type name, with a trailing "?" when the value may be nil (None).
# "number" accepts ints and floats (decoded as float); "array" is an array map (above);
# "action" is a nested action map; "map" is a free map (string keys, arrays decoded anywhere).
_ACTION_FIELDS = {"vector": "array?", "action_id": "int?"}
SCHEMA: dict[str, dict[str, str]] = {
    # a new frame is in the ring slot `slot`; `action` is what produced it when the source
    # knows (gym, replay); `pixels` only when the frame travels inline (remote worker);
    # `ring_id` the ring's random id (FrameRing.ring_id): another id is another capture.
    # On the gateway's link to a remote worker (iwm_bus.bus.link_frames) the pixels travel
    # in a message part of their own: `codec` says how (raw, zstd:L, jpeg:Q; nil = raw) and
    # `lossy` whether the decoded frame differs from the captured one
    "frame": {"seq": "int", "slot": "int", "t_capture_ns": "int", "height": "int",
              "width": "int", "channels": "int", "action": "action?", "pixels": "array?",
              "source": "str?", "ring_id": "int?", "codec": "str?", "lossy": "bool?",
              "env": "int?"},
    # an action the agent took; `vector` (float32, <= cond_dim) and/or discrete `action_id`
    "action": {"seq": "int", "t_ns": "int", "frame_seq": "int?", "vector": "array?",
               "action_id": "int?", "source": "str?"},
    # `env` (frame, latent, surprise, mrr): the capture stream (game) of a multi-stream
    # worker (--envs N: 0..N-1); absent with one stream. Each env's seqs are its own
    "latent": {"seq": "int", "t_capture_ns": "int", "t_publish_ns": "int", "z_cls": "array",
               "patches": "array?", "variant": "str", "env": "int?"},
    # surprise of frame `seq` against the prediction made at frame `pred_seq` with `action`;
    # nil surprise when there was no prediction (first frame, or after a gap); `surprise_z`
    # the same error standardised per patch against the stream's recent errors
    # (iwm_bus.metrics.SurpriseZ), nil while it warms up (absent from older publishers)
    "surprise": {"seq": "int", "t_capture_ns": "int", "t_publish_ns": "int",
                 "surprise": "number?", "surprise_z": "number?", "pred_seq": "int?",
                 "action": "action?", "variant": "str", "env": "int?"},
    # reciprocal rank `rr` of frame `seq` among itself and `k` other bank latents, and the
    # running mean `mrr`; nil when there was no prediction
    "mrr": {"seq": "int", "t_capture_ns": "int", "t_publish_ns": "int", "rr": "number?",
            "mrr": "number?", "k": "int", "variant": "str", "env": "int?"},
    # the arbiter's decision at frame `frame_seq` (nil: no fresh vision, `stale`): slow down
    # by `delay_s` and/or prefer the wait action, escalate (to a planner / LLM); the surprise,
    # surprise_z and running MRR it read; `reasons` "; "-joined; when the agent planned,
    # `plan_costs` the predicted cost of each candidate (float32, (N,)) and `plan_choice` the
    # index of the one it took
    "decision": {"seq": "int", "t_ns": "int", "frame_seq": "int?", "slow_down": "bool",
                 "prefer_wait": "bool", "escalate": "bool", "stale": "bool",
                 "delay_s": "number", "temporal_coherence": "number", "surprise": "number?",
                 "surprise_z": "number?", "mrr": "number?", "reasons": "str?",
                 "plan_costs": "array?", "plan_choice": "int?", "source": "str?"},
    "stats": {"t_ns": "int", "source": "str", "values": "map"},
    # a worker's word to the capture, with each stats tick: `notices` seen so far (0: a
    # fresh worker, which a lossless capture re-sends a notice to), `stream` its name when
    # it publishes a named stream
    "ready": {"t_ns": "int", "notices": "int", "restarts": "int", "stream": "str?"},
    "rpc_request": {"id": "int", "method": "str", "params": "map"},
    "rpc_reply": {"id": "int", "ok": "bool", "result": "map?", "error": "str?"},
}




def schema_at(minor: int) -> dict[str, dict[str, str]]:
    """The kinds and fields of schema v1.``minor``: SCHEMA less what later minors added (what
    a reader of that version knows; ``unpack(frames, schema=schema_at(0))`` reads as v1.0)."""
    if isinstance(minor, bool) or not isinstance(minor, int) or not 0 <= minor <= MINOR:
        raise ValueError(f"minor must be an int in 0..{MINOR}, got {minor!r}")
    later = {item for m, items in HISTORY.items() if m > minor for item in items}
    return {kind: {name: spec for name, spec in fields.items() if f"{kind}.{name}" not in later}
            for kind, fields in SCHEMA.items() if kind not in later}


def version_text() -> str:
    """This side's schema version, ``"1.6"``."""
    return f"{VERSION}.{MINOR}"


@dataclass
class Unknowns:
    """What a reader passed over under the compatibility rule (docs/wire.md), for its
    counters; ``unpack(frames, unknown=...)`` adds to it."""

    # messages that carried fields this side does not know (read without them)
    fields: int = 0
    # messages of a kind, or on a topic, this side does not know (passed over)
    kinds: int = 0
    # the last thing passed over: "surprise.surprise_q", "kind 'flow' on 'iwm.flow'"
    last: str | None = None


# ---------------------------------------------------------------- encoding


def encode_array(arr: np.ndarray) -> dict[str, Any]:
    """An array as the wire's ``{dtype, shape, data}`` map (little-endian, C order)."""
    arr = np.asarray(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if arr.dtype.str not in DTYPES:
        raise WireError(f"array dtype {arr.dtype} cannot travel; use one of {sorted(DTYPES)}")
    if arr.ndim > MAX_NDIM:
        raise WireError(f"array has {arr.ndim} dimensions; at most {MAX_NDIM} travel")
    return {"dtype": arr.dtype.str, "shape": list(arr.shape),
            "data": np.ascontiguousarray(arr).tobytes()}


def _to_wire(value: Any, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise WireError(f"message nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, np.ndarray):
        return encode_array(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _to_wire(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_wire(v, depth + 1) for v in value]
    return value


def pack(topic: str, msg: Mapping[str, Any]) -> list[bytes]:
    """Validate ``msg`` for ``topic`` and encode it as ``[topic, payload]``.

    ``msg`` holds the kind's fields (``SCHEMA``); ``kind`` may be omitted when the topic
    carries a single kind. Numpy arrays and scalars are converted. Raises ``WireError``.
    """
    kinds = _topic_kinds(topic)
    if type(msg) is not dict and not isinstance(msg, Mapping):  # (the ABC check is slow)
        raise WireError(f"message for {topic!r} must be a mapping, got {type(msg).__name__}")
    kind = msg.get("kind", kinds[0] if len(kinds) == 1 else None)
    if kind not in kinds:
        raise WireError(f"topic {topic!r} carries {'/'.join(kinds)} messages, not {kind!r}")
    body = _pack_fast(kind, {**msg, "v": VERSION, "kind": kind})
    if body is None:  # something to convert, or to reject with the precise error
        body = _to_wire({**msg, "v": VERSION, "kind": kind})
        _validate(body)
    try:  # ints beyond 64 bits, lone surrogates, objects msgpack cannot encode
        payload = msgpack.packb(body, use_bin_type=True)
        raw_topic = topic.encode()
    except (TypeError, ValueError, OverflowError) as e:
        raise WireError(f"{kind} message on {topic!r} cannot be encoded: {e}") from e
    if len(payload) > MAX_MESSAGE_BYTES:
        raise WireError(f"{kind} message is {len(payload)} bytes; limit {MAX_MESSAGE_BYTES}")
    return [raw_topic, payload]


# ---------------------------------------------------------------- decoding


def unpack(frames: Sequence[bytes], *, schema: Mapping[str, Mapping[str, str]] | None = None,
           unknown: Unknowns | None = None) -> tuple[str, dict[str, Any]]:
    """Decode ``[topic, payload]`` into ``(topic, msg)``; arrays come back as read-only numpy.

    Fields the schema does not know are left out of ``msg`` (in action maps too); a kind or
    topic it does not know raises ``UnknownMessage``, a peer of another major version
    ``WireVersionError``; ``unknown`` counts the first two. ``schema``: the kinds and fields
    this reader knows (default ``SCHEMA``; ``schema_at(minor)`` reads as an older version).
    Raises ``WireError`` (and nothing else) for any malformed input.
    """
    try:
        return _unpack(frames, schema, unknown)
    except WireError:
        raise
    except Exception as e:  # noqa: BLE001 - the contract is: only WireError escapes
        raise WireError(f"malformed message: {type(e).__name__}: {e}") from e


def _unpack(frames: Sequence[bytes], schema: Mapping[str, Mapping[str, str]] | None,
            unknown: Unknowns | None) -> tuple[str, dict[str, Any]]:
    if len(frames) != 2:
        raise WireError(f"expected 2 frames [topic, payload], got {len(frames)}")
    raw_topic, payload = bytes(frames[0]), frames[1]
    if len(raw_topic) > MAX_TOPIC_BYTES:
        raise WireError(f"topic is {len(raw_topic)} bytes; limit {MAX_TOPIC_BYTES}")
    if len(payload) > MAX_MESSAGE_BYTES:
        raise WireError(f"payload is {len(payload)} bytes; limit {MAX_MESSAGE_BYTES}")
    try:
        topic = raw_topic.decode()
    except UnicodeDecodeError as e:
        raise WireError("topic is not UTF-8") from e
    kinds = _known_kinds(topic)  # None: not a topic of ours
    try:
        body = msgpack.unpackb(
            payload, raw=False, strict_map_key=True, max_bin_len=MAX_MESSAGE_BYTES,
            max_str_len=1024 * 1024, max_array_len=65536, max_map_len=4096, max_ext_len=0)
    except Exception as e:  # msgpack raises a zoo of types for bad bytes
        raise WireError(f"payload on {topic!r} is not valid msgpack: {e}") from e
    if not isinstance(body, dict):
        raise WireError(f"payload on {topic!r} is a {type(body).__name__}, not a map")
    msg = _unpack_fast(body) if schema is None and kinds is not None else None
    if msg is None:  # not a plain valid message: the generic path reads it or words the error
        return topic, _read(topic, kinds, body, SCHEMA if schema is None else schema, unknown)
    if msg["kind"] not in kinds:
        raise WireError(f"topic {topic!r} carries {'/'.join(kinds)}, got {msg['kind']!r}")
    return topic, msg


def _read(topic: str, kinds: tuple[str, ...] | None, body: dict[str, Any],
          schema: Mapping[str, Mapping[str, str]], unknown: Unknowns | None) -> dict[str, Any]:
    """The generic way in: version, kind, the known fields checked, the unknown ones left out
    (counted), arrays decoded."""
    _check_version(body)
    kind = body.get("kind")
    if not isinstance(kind, str):
        raise WireError(f"message kind must be a str, got {type(kind).__name__}")
    fields = schema.get(kind)
    if kinds is None or fields is None:
        if unknown is not None:
            unknown.kinds += 1
            unknown.last = f"kind {kind!r:.40} on {topic!r}"
        if kinds is None:
            raise UnknownMessage(f"unknown topic {topic!r}; known topics: "
                                 f"{', '.join(TOPIC_KINDS)}")
        raise UnknownMessage(f"unknown message kind {kind!r:.40} on {topic!r}; this reader "
                             f"knows {', '.join(schema)}")
    if kind not in kinds:
        raise WireError(f"topic {topic!r} carries {'/'.join(kinds)}, got {kind!r}")
    extra = _validate(body, schema, strict=False)
    if extra:
        if unknown is not None:
            unknown.fields += 1
            unknown.last = f"{kind}.{extra[0]:.40}"
        body = _known_part(body, fields)
    return _decode_arrays(body, 0)


def _known_part(body: dict[str, Any], fields: Mapping[str, str]) -> dict[str, Any]:
    """``body`` without the fields (and action-map keys) that ``fields`` does not have."""
    out = {k: v for k, v in body.items() if k in fields or k in ("v", "kind")}
    for name, spec in fields.items():
        value = out.get(name)
        if spec.rstrip("?") == "action" and isinstance(value, dict):
            out[name] = {k: v for k, v in value.items() if k in _ACTION_KEYS}
    return out


def decode_array(value: Any) -> np.ndarray:
    """Decode a ``{dtype, shape, data}`` map into a read-only numpy array, checking sizes."""
    if not isinstance(value, dict) or value.keys() != ARRAY_KEYS:
        raise WireError("array must be a map with exactly the keys dtype, shape, data")
    dtype, shape, data = value["dtype"], value["shape"], value["data"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise WireError(f"array dtype {dtype!r} not allowed; one of {sorted(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise WireError(f"array shape must be a list of at most {MAX_NDIM} ints")
    for n in shape:  # a loop, not all(<genexpr>): this runs for every array received
        if not (type(n) is int or isinstance(n, int) and not isinstance(n, bool)) or n < 0:
            raise WireError(f"array shape {shape!r} must hold non-negative ints")
    count = math.prod(shape)
    if count > MAX_ARRAY_ELEMENTS:
        raise WireError(f"array of {count} elements exceeds {MAX_ARRAY_ELEMENTS}")
    if not isinstance(data, bytes):
        raise WireError("array data must be bytes (msgpack bin)")
    np_dtype = _NP_DTYPES[dtype]
    if len(data) != count * np_dtype.itemsize:
        raise WireError(f"array data is {len(data)} bytes; shape {shape} of {dtype} "
                        f"needs {count * np_dtype.itemsize}")
    flat = np.frombuffer(data, np_dtype)  # positional: numpy parses keywords slowly
    return flat if len(shape) == 1 else flat.reshape(shape)


def _decode_arrays(value: Any, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise WireError(f"message nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        if value.keys() == ARRAY_KEYS:
            return decode_array(value)
        return {k: _decode_arrays(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_arrays(v, depth + 1) for v in value]
    return value


# ---------------------------------------------------------------- validation


def _topic_kinds(topic: str) -> tuple[str, ...]:
    kinds = _KINDS_OF_TOPIC.get(topic) if type(topic) is str else None
    if kinds is not None:
        return kinds
    if not isinstance(topic, str):
        raise WireError(f"topic must be a str, got {type(topic).__name__}")
    try:
        kinds = TOPIC_KINDS[base_topic(topic)]
    except KeyError as e:
        raise WireError(str(e.args[0])) from None
    if len(_KINDS_OF_TOPIC) < _MAX_CACHED_TOPICS:  # bounded: a peer may invent suffixes
        _KINDS_OF_TOPIC[topic] = kinds
    return kinds


def _known_kinds(topic: str) -> tuple[str, ...] | None:
    """The kinds ``topic`` carries, or None when it is not one of ours (a newer writer's)."""
    try:
        return _topic_kinds(topic)
    except WireError:
        return None


_MAX_CACHED_TOPICS = 256
_KINDS_OF_TOPIC: dict[str, tuple[str, ...]] = {}


def _check_version(body: dict[str, Any]) -> None:
    version = body.get("v")
    if type(version) is int and version != VERSION:
        raise WireVersionError(f"refused a message of wire schema v{version}: this side speaks "
                               f"v{version_text()}, and another major version is not "
                               "compatible; run the same major version on both ends")
    if type(version) is not int:  # 1.0 and True are not 1
        raise WireError(f"schema version {version!r} not supported (this side speaks {VERSION})")


def _validate(body: dict[str, Any], schema: Mapping[str, Mapping[str, str]] = SCHEMA,
              strict: bool = True) -> list[str]:
    """Check ``body``'s version, kind and known fields; return the names of the fields
    ``schema`` does not know (``action.<key>`` in an action map), which ``strict`` (what
    ``pack`` sends) refuses instead."""
    _check_version(body)
    kind = body.get("kind")
    fields = schema.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise WireError(f"unknown message kind {kind!r}; known: {', '.join(schema)}")
    extra = []
    for name, spec in fields.items():
        extra += _check_field(kind, name, spec, body.get(name), strict)
    unknown = sorted(set(body) - set(fields) - {"v", "kind"})
    if strict and unknown:
        raise WireError(f"{kind} message has unknown fields {unknown}")
    return unknown + extra


def _check_field(kind: str, name: str, spec: str, value: Any, strict: bool = True
                 ) -> list[str]:
    """Check one field; the unknown keys of an action map that ``strict`` lets pass."""
    optional = spec.endswith("?")
    base = spec.rstrip("?")
    where = f"{kind}.{name}"
    extra: list[str] = []
    if value is None:
        if not optional:
            raise WireError(f"{where} is missing (or nil)")
        return extra
    if base == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif base == "str":
        ok = isinstance(value, str)
    elif base == "bool":
        ok = isinstance(value, bool)
    elif base == "map":
        ok = isinstance(value, dict)
    elif base == "array":
        try:
            decode_array(value)
        except WireError as e:
            raise WireError(f"{where}: {e}") from None
        ok = True
    elif base == "action":
        ok = isinstance(value, dict) and (not strict or value.keys() <= _ACTION_KEYS)
        if ok:
            extra = [f"{name}.{k}" for k in value if k not in _ACTION_KEYS]
            for sub, sub_spec in _ACTION_FIELDS.items():
                _check_field(where, sub, sub_spec, value.get(sub))
    else:  # pragma: no cover - a typo in SCHEMA
        raise AssertionError(f"bad spec {spec!r} for {where}")
    if not ok:
        raise WireError(f"{where} must be {base}, got {type(value).__name__}")
    return extra


# ---------------------------------------------------------------- the hot path
#
# pack and unpack first try a table built once per kind from SCHEMA: per field one dict
# lookup and one exact-type test, each array encoded or decoded once. A message the table
# does not take as it stands (a missing, nil or mistyped field, an unknown key, a Mapping or
# sequence to convert, a free map on the pack side) goes the generic way above, which
# converts, or raises the precise WireError. The table takes only what the generic path
# accepts and builds the same message, so the two ways differ in speed only.


class _KindTable(NamedTuple):
    # field (and "v", "kind") -> the exact types pack takes as they are; an ndarray or an
    # action dict is encoded afterwards
    pack_types: dict[str, frozenset[type]]
    # field -> the exact types unpack takes; the dicts of ``decoders`` are decoded afterwards
    unpack_types: dict[str, frozenset[type]]
    required: frozenset[str]
    # (field, encode) for each array and action field: the encoded value, None to refuse
    encoders: tuple[tuple[str, Callable[[Any], Any]], ...]
    # (field, decode) for each array, action and map field
    decoders: tuple[tuple[str, Callable[[Any], Any]], ...]


def _decode_action(value: dict[str, Any]) -> dict[str, Any]:
    if not value.keys() <= _ACTION_KEYS:
        raise WireError("action has unknown keys")  # the generic path words it
    out = {}
    for key, item in value.items():
        if item is not None:
            if key == "vector":
                item = decode_array(item)
            elif type(item) is not int:
                raise WireError("action_id is not an int")
        out[key] = item
    return out


def _decode_map(value: dict[str, Any]) -> dict[str, Any]:
    return _decode_arrays(value, 1)


def _encode_plain(arr: np.ndarray) -> dict[str, Any] | None:
    """``encode_array`` of an array that can travel as it is; None for anything else."""
    dtype = _WIRE_DTYPES.get(arr.dtype)  # a dict lookup: ``arr.dtype.str`` builds a str
    if dtype is None or arr.ndim > MAX_NDIM or arr.size > MAX_ARRAY_ELEMENTS:
        return None
    return {"dtype": dtype, "shape": list(arr.shape), "data": arr.tobytes()}


def _encode_action(action: dict[str, Any]) -> dict[str, Any] | None:
    if not action.keys() <= _ACTION_KEYS:
        return None
    out = {}
    for key, item in action.items():
        if item is not None:
            if key == "vector":
                if type(item) is not np.ndarray or (item := _encode_plain(item)) is None:
                    return None
            elif type(item) is not int:
                return None
        out[key] = item
    return out


def _build_table(fields: dict[str, str]) -> _KindTable:
    scalar = {"int": {int}, "number": {int, float}, "str": {str}, "bool": {bool}}
    pack_types = {"v": frozenset({int}), "kind": frozenset({str})}
    unpack_types = dict(pack_types)
    encoders, decoders = [], []
    for name, spec in fields.items():
        base, nil = spec.rstrip("?"), {type(None)} if spec.endswith("?") else set()
        packed = {"array": {np.ndarray}, "action": {dict}, "map": set()}.get(base)
        pack_types[name] = frozenset(scalar.get(base, packed) | nil)
        unpack_types[name] = frozenset(scalar.get(base, {dict}) | nil)
        if base in ("array", "action"):
            encoders.append((name, _encode_plain if base == "array" else _encode_action))
        if base in ("array", "action", "map"):
            decoders.append((name, {"array": decode_array, "action": _decode_action,
                                    "map": _decode_map}[base]))
    required = frozenset(name for name, spec in fields.items() if not spec.endswith("?"))
    return _KindTable(pack_types, unpack_types, required, tuple(encoders), tuple(decoders))


_ACTION_KEYS = frozenset(_ACTION_FIELDS)
_TABLES = {kind: _build_table(fields) for kind, fields in SCHEMA.items()}


def _pack_fast(kind: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """``body`` ready for msgpack (arrays encoded, numpy scalars as Python ones), or None
    when it needs the generic path. Changes ``body`` only when it returns it."""
    table = _TABLES.get(kind)
    if table is None:
        return None
    types, converted = table.pack_types, {}
    try:
        for name, value in body.items():
            ok = types[name]
            if type(value) not in ok:
                if not isinstance(value, np.generic) or type(value := value.item()) not in ok:
                    return None
                converted[name] = value
    except KeyError:  # a field this kind does not have
        return None
    if not body.keys() >= table.required:
        return None
    for name, encode in table.encoders:
        value = body.get(name)
        if value is not None:
            if (value := encode(value)) is None:
                return None
            converted[name] = value
    body.update(converted)
    return body


def _unpack_fast(body: dict[str, Any]) -> dict[str, Any] | None:
    """``body`` (msgpack's fresh map) validated with its arrays decoded, or None when it
    is not a plain valid message (left unchanged: the generic path words the error)."""
    version, kind = body.get("v"), body.get("kind")
    if type(version) is not int or version != VERSION or type(kind) is not str:
        return None
    table = _TABLES.get(kind)
    if table is None:
        return None
    types = table.unpack_types
    try:
        for name, value in body.items():
            if type(value) not in types[name]:
                return None
    except KeyError:  # a field this kind does not have
        return None
    if not body.keys() >= table.required:
        return None
    decoded = {}
    for name, decode in table.decoders:
        value = body.get(name)
        if value is not None:
            try:
                decoded[name] = decode(value)
            except WireError:
                return None
    body.update(decoded)
    return body


# ---------------------------------------------------------------- helpers


def make_action(vector: Any = None, action_id: int | None = None) -> dict[str, Any] | None:
    """The nested action map used in frame/surprise messages (None when there is no action)."""
    if vector is None and action_id is None:
        return None
    out: dict[str, Any] = {}
    if vector is not None:
        vec = np.asarray(vector, dtype=np.float32)
        if vec.ndim != 1:
            raise WireError(f"action vector must be 1-D, got shape {vec.shape}")
        out["vector"] = vec
    if action_id is not None:
        out["action_id"] = int(action_id)
    return out


# ---------------------------------------------------------------- agent decisions

def make_decision(seq: int, t_ns: int, *, slow_down: bool, prefer_wait: bool, escalate: bool,
                  stale: bool = False, delay_s: float = 0.0, temporal_coherence: float = 1.0,
                  frame_seq: int | None = None, surprise: float | None = None,
                  surprise_z: float | None = None, mrr: float | None = None,
                  reasons: Sequence[str] = (), plan_costs: Any = None,
                  plan_choice: int | None = None, source: str | None = None
                  ) -> dict[str, Any]:
    """A ``decision`` message (``agent.decision``); ``pack`` validates it. ``plan_costs``
    becomes a 1-D float32 array; ``plan_choice`` must index it."""
    costs = None
    if plan_costs is not None:
        costs = np.asarray(plan_costs, np.float32)
        if costs.ndim != 1 or not costs.size:
            raise WireError(f"plan_costs must be a non-empty 1-D array, got shape {costs.shape}")
    if plan_choice is not None and (costs is None or not 0 <= plan_choice < costs.size):
        raise WireError(f"plan_choice {plan_choice} does not index plan_costs "
                        f"({0 if costs is None else costs.size} candidates)")
    num = lambda x: None if x is None else float(x)  # noqa: E731
    return {"seq": int(seq), "t_ns": int(t_ns), "frame_seq": frame_seq,
            "slow_down": bool(slow_down), "prefer_wait": bool(prefer_wait),
            "escalate": bool(escalate), "stale": bool(stale), "delay_s": float(delay_s),
            "temporal_coherence": float(temporal_coherence), "surprise": num(surprise),
            "surprise_z": num(surprise_z), "mrr": num(mrr),
            "reasons": "; ".join(reasons) or None, "plan_costs": costs,
            "plan_choice": plan_choice, "source": source}


def decision_text(msg: Mapping[str, Any]) -> str:
    """One line for a ``decision`` message: what the arbiter decided and why."""
    did = ([f"slow down {msg['delay_s']:.2f} s"] if msg["slow_down"] else []) + (
        ["wait"] if msg["prefer_wait"] else []) + (["ESCALATE"] if msg["escalate"] else [])
    text = ", ".join(did) or "go on"
    if msg.get("stale"):
        text += " (stale vision)"
    if msg.get("plan_costs") is not None:
        costs = np.asarray(msg["plan_costs"])
        choice = msg.get("plan_choice")
        best = costs[choice] if choice is not None else costs.min()
        text += f"; plan: {costs.size} candidates, cost {best:.4g} (min {costs.min():.4g})"
    return text + (f": {msg['reasons']}" if msg.get("reasons") else "")
