"""Wire schema: round trips of every message kind, and malformed input only raises WireError.

    .venv/bin/pytest tests/test_wire.py -q
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum
from types import MappingProxyType
from typing import Any

import msgpack
import numpy as np
import pytest
from fuzz import mutated
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from iwm_bus.bus import topics, wire
from iwm_bus.errors import UnknownMessage, WireError

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
KINDS = sorted(wire.SCHEMA)
#: one topic that carries each kind
TOPIC_OF = {kind: topic for topic, kinds in topics.TOPIC_KINDS.items() for kind in kinds}

# ------------------------------------------------------------------ strategies

INT64 = st.integers(-(2**63), 2**63 - 1)
FLOATS = st.floats(allow_nan=False)  # NaN != NaN would break plain equality; arrays allow it
TEXT = st.text(max_size=12)
ARRAYS = st.sampled_from(sorted(wire.DTYPES)).flatmap(
    lambda dt: hnp.arrays(np.dtype(dt), hnp.array_shapes(min_dims=0, max_dims=wire.MAX_NDIM,
                                                         min_side=0, max_side=4)))
_KEYS = TEXT.filter(lambda k: k not in wire.ARRAY_KEYS)
_LEAF = st.none() | st.booleans() | INT64 | FLOATS | TEXT | st.binary(max_size=12) | ARRAYS
_LEVEL1 = _LEAF | st.lists(_LEAF, max_size=3) | st.dictionaries(_KEYS, _LEAF, max_size=3)
_LEVEL2 = _LEAF | st.lists(_LEVEL1, max_size=3) | st.dictionaries(_KEYS, _LEVEL1, max_size=3)
FREE_MAPS = st.dictionaries(_KEYS, _LEVEL2, max_size=4)
ACTIONS = st.fixed_dictionaries({}, optional={"vector": ARRAYS | st.none(),
                                              "action_id": INT64 | st.none()})
BASE = {"int": INT64, "number": INT64 | FLOATS, "str": TEXT, "bool": st.booleans(),
        "map": FREE_MAPS, "array": ARRAYS, "action": ACTIONS}


def message_strategy(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    """Valid messages of ``kind``, built from SCHEMA: optional fields absent, None or set."""
    fields = wire.SCHEMA[kind]
    required = {n: BASE[s] for n, s in fields.items() if not s.endswith("?")}
    optional = {n: BASE[s.rstrip("?")] | st.none() for n, s in fields.items() if s.endswith("?")}
    return st.fixed_dictionaries({"kind": st.just(kind), **required}, optional=optional)


def assert_same(sent: Any, got: Any, where: str = "msg") -> None:
    """Deep equality; arrays compared with np.array_equal and must come back read-only."""
    if isinstance(sent, np.ndarray):
        assert isinstance(got, np.ndarray), where
        assert got.dtype == sent.dtype and got.shape == sent.shape, where
        assert np.array_equal(sent, got, equal_nan=sent.dtype.kind == "f"), where
        assert not got.flags.writeable, f"{where} must be read-only"
    elif isinstance(sent, dict):
        assert isinstance(got, dict) and set(got) == set(sent), where
        for key in sent:
            assert_same(sent[key], got[key], f"{where}.{key}")
    elif isinstance(sent, list):
        assert isinstance(got, list) and len(got) == len(sent), where
        for i, (a, b) in enumerate(zip(sent, got, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert type(got) is type(sent) and got == sent, f"{where}: {sent!r} != {got!r}"


# ------------------------------------------------------------------ valid messages

_SAMPLE = {"int": 3, "number": 0.5, "str": "s", "bool": True, "map": {"a": 1, "b": [1.5]},
           "array": np.arange(6, dtype="<f4").reshape(2, 3),
           "action": {"vector": np.ones(3, "<f4"), "action_id": 2}}


def sample(kind: str) -> dict[str, Any]:
    """A valid message of ``kind`` with every field (optional ones included) set."""
    return {"kind": kind, **{n: _SAMPLE[s.rstrip("?")] for n, s in wire.SCHEMA[kind].items()}}


def raw_body(kind: str) -> dict[str, Any]:
    """``sample(kind)`` as the plain msgpack body (what a foreign publisher would send)."""
    return msgpack.unpackb(wire.pack(TOPIC_OF[kind], sample(kind))[1], raw=False)


def raw(topic: str | bytes, body: Any) -> list[bytes]:
    """Frames of ``body`` packed with bare msgpack, bypassing pack's validation."""
    t = topic.encode() if isinstance(topic, str) else topic
    return [t, msgpack.packb(body, use_bin_type=True)]


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(data=st.data())
def test_round_trip_every_kind(kind: str, data: st.DataObject) -> None:
    msg = data.draw(message_strategy(kind))
    topic = TOPIC_OF[kind] + data.draw(st.sampled_from(["", ".invariant"]))
    frames = wire.pack(topic, msg)
    assert frames[0] == topic.encode()
    got_topic, got = wire.unpack(frames)
    assert got_topic == topic
    assert got.pop("v") == wire.VERSION
    assert_same(msg, got)


@pytest.mark.parametrize("dtype", sorted(wire.DTYPES))
def test_round_trip_each_dtype_and_shape(dtype: str) -> None:
    for shape in [(), (0,), (768,), (2, 3), (1, 2, 3, 4), (2, 1, 2, 1, 2)]:
        arr = (np.arange(int(np.prod(shape))) % 100).astype(dtype).reshape(shape)
        _, got = wire.unpack(wire.pack(topics.STATS, {"t_ns": 1, "source": "t",
                                                      "values": {"a": arr}}))
        assert_same(arr, got["values"]["a"])


def test_big_endian_arrays_travel_little_endian() -> None:
    z = np.arange(4, dtype=">f4")
    _, got = wire.unpack(wire.pack(topics.LATENT, {"seq": 1, "t_capture_ns": 1,
                                                   "t_publish_ns": 2, "z_cls": z,
                                                   "variant": "core"}))
    assert got["z_cls"].dtype == np.dtype("<f4")
    assert np.array_equal(got["z_cls"], z)


def test_make_action() -> None:
    assert wire.make_action() is None
    act = wire.make_action([1, 2], 4)
    assert act["vector"].dtype == np.float32 and act["action_id"] == 4
    assert wire.make_action(action_id=0) == {"action_id": 0}
    msg = {**sample("frame"), "action": act}
    _, got = wire.unpack(wire.pack(topics.FRAME, msg))
    assert_same(act, got["action"])
    with pytest.raises(WireError, match="1-D"):
        wire.make_action(np.zeros((2, 2)))


# ------------------------------------------------------------------ malformed: bytes


@FUZZ
@given(payload=st.binary(max_size=512), topic=st.sampled_from(sorted(topics.TOPIC_KINDS)))
def test_random_payload_raises_wire_error(payload: bytes, topic: str) -> None:
    with pytest.raises(WireError):
        wire.unpack([topic.encode(), payload])


@FUZZ
@given(frames=st.lists(st.binary(max_size=64), max_size=4))
def test_random_frames_raise_wire_error(frames: list[bytes]) -> None:
    with pytest.raises(WireError):
        wire.unpack(frames)


@FUZZ
@given(kind=st.sampled_from(KINDS), data=st.data())
def test_mutated_payload_is_valid_or_wire_error(kind: str, data: st.DataObject) -> None:
    topic, payload = wire.pack(TOPIC_OF[kind], sample(kind))
    buf = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 4))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    try:
        got_topic, got = wire.unpack([topic, bytes(buf)])
    except WireError:
        return
    assert got_topic == TOPIC_OF[kind] and got["kind"] in wire.SCHEMA  # still valid


@pytest.mark.parametrize("kind", KINDS)
def test_every_truncation_raises_wire_error(kind: str) -> None:
    topic, payload = wire.pack(TOPIC_OF[kind], sample(kind))
    for n in range(len(payload)):
        with pytest.raises(WireError):
            wire.unpack([topic, payload[:n]])


@pytest.mark.parametrize("frames", [
    [], [b"iwm.frame"], [b"iwm.frame", b"\x80", b"extra"], [None, None], [1, 2],
    [b"iwm.stats", 5], [b"iwm.stats", "not bytes"], None,
], ids=repr)
def test_bad_frame_lists_raise_wire_error(frames: Any) -> None:
    with pytest.raises(WireError):
        wire.unpack(frames)


@pytest.mark.parametrize("topic", [b"", b"iwm.nope", b"iwm.framez", b"agent", b"x" * 300,
                                   b"\xff\xfeiwm.frame", b"iwm.frame.\xc3"], ids=repr)
def test_bad_topics_raise_wire_error(topic: bytes) -> None:
    with pytest.raises(WireError, match="topic"):
        wire.unpack(raw(topic, raw_body("frame")))


def test_payload_not_a_map_raises_wire_error() -> None:
    for body in [[1, 2], 5, "frame", None, b"x"]:
        with pytest.raises(WireError, match="not a map"):
            wire.unpack(raw(topics.FRAME, body))


# ------------------------------------------------------------------ malformed: fields

_WRONG = {"int": ["1", 1.5, True, [1], {"a": 1}, b"1"],
          "number": ["0.5", True, [0.5], {}],
          "str": [1, b"bytes", ["s"], True],
          "bool": [1, 0, "true", []],
          "map": [[], "m", 1, True],
          "array": ["x", 1, [1.0, 2.0], {"dtype": "<f4", "shape": [1]},
                    {"dtype": "<f4", "shape": [1], "data": b"\0" * 4, "x": 1}],
          "action": [[], "a", 1, {"action_id": "x"}, {"vector": [1.0]}]}
FIELDS = [(kind, name, spec) for kind in KINDS for name, spec in wire.SCHEMA[kind].items()]


@pytest.mark.parametrize("kind,name,spec", FIELDS, ids=[f"{k}.{n}" for k, n, _ in FIELDS])
def test_wrong_type_per_field(kind: str, name: str, spec: str) -> None:
    for bad in _WRONG[spec.rstrip("?")]:
        body = {**raw_body(kind), name: bad}
        with pytest.raises(WireError, match=rf"{kind}\.{name}"):
            wire.unpack(raw(TOPIC_OF[kind], body))
        with pytest.raises(WireError, match=rf"{kind}\.{name}"):
            wire.pack(TOPIC_OF[kind], {**sample(kind), name: bad})


@pytest.mark.parametrize("kind,name,spec", [f for f in FIELDS if not f[2].endswith("?")],
                         ids=[f"{k}.{n}" for k, n, s in FIELDS if not s.endswith("?")])
def test_missing_or_nil_required_field(kind: str, name: str, spec: str) -> None:
    body = raw_body(kind)
    missing = {k: v for k, v in body.items() if k != name}
    for bad in (missing, {**body, name: None}):
        with pytest.raises(WireError, match=rf"{kind}\.{name} is missing"):
            wire.unpack(raw(TOPIC_OF[kind], bad))
    with pytest.raises(WireError, match=rf"{kind}\.{name}"):
        wire.pack(TOPIC_OF[kind], {k: v for k, v in sample(kind).items() if k != name})


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_field_left_out_on_receipt_refused_on_sending(kind: str) -> None:
    """The compatibility rule (tests/bus/test_compat.py): a newer writer's field is ignored."""
    _, got = wire.unpack(raw(TOPIC_OF[kind], {**raw_body(kind), "bogus": 1}))
    assert "bogus" not in got and got["kind"] == kind
    with pytest.raises(WireError, match="unknown fields"):
        wire.pack(TOPIC_OF[kind], {**sample(kind), "bogus": 1})


@pytest.mark.parametrize("version", [0, 2, "1", 1.0, True, None, [1]], ids=repr)
def test_unknown_version_rejected(version: Any) -> None:
    with pytest.raises(WireError, match="version"):
        wire.unpack(raw(topics.FRAME, {**raw_body("frame"), "v": version}))
    without = {k: v for k, v in raw_body("frame").items() if k != "v"}
    with pytest.raises(WireError, match="version"):
        wire.unpack(raw(topics.FRAME, without))


@pytest.mark.parametrize("kind", ["nope", 7, None, ["frame"], ""], ids=repr)
def test_unknown_kind_rejected(kind: Any) -> None:
    """A kind that is a str is a newer writer's (UnknownMessage, passed over); anything else
    is malformed."""
    with pytest.raises(WireError, match="kind") as err:
        wire.unpack(raw(topics.FRAME, {**raw_body("frame"), "kind": kind}))
    assert isinstance(err.value, UnknownMessage) == isinstance(kind, str)


@pytest.mark.parametrize("kind", KINDS)
def test_topic_kind_mismatch_rejected(kind: str) -> None:
    for topic, kinds in topics.TOPIC_KINDS.items():
        if kind in kinds:
            continue
        with pytest.raises(WireError, match="carries"):
            wire.unpack(raw(topic, raw_body(kind)))
        with pytest.raises(WireError, match="carries"):
            wire.pack(topic, sample(kind))


def test_rpc_topic_needs_explicit_kind() -> None:
    msg = {k: v for k, v in sample("rpc_request").items() if k != "kind"}
    with pytest.raises(WireError, match="carries"):
        wire.pack(topics.RPC, msg)


def _latent_with(z: dict[str, Any]) -> list[bytes]:
    body = {"v": 1, "kind": "latent", "seq": 1, "t_capture_ns": 1, "t_publish_ns": 1,
            "z_cls": z, "variant": "core"}
    return raw(topics.LATENT, body)


@pytest.mark.parametrize("z", [
    {"dtype": "<f4", "shape": [4], "data": b"\0" * 15},
    {"dtype": "<f4", "shape": [4], "data": b"\0" * 17},
    {"dtype": "<f4", "shape": [2, 2], "data": b"\0" * 4},
    {"dtype": "|u1", "shape": [], "data": b""},
    {"dtype": "<f4", "shape": [-1], "data": b""},
    {"dtype": "<f4", "shape": [1.0], "data": b"\0" * 4},
    {"dtype": "<f4", "shape": [True], "data": b"\0" * 4},
    {"dtype": "<f4", "shape": 4, "data": b"\0" * 16},
    {"dtype": "<f4", "shape": [1] * (wire.MAX_NDIM + 1), "data": b"\0" * 4},
    {"dtype": ">f4", "shape": [1], "data": b"\0" * 4},
    {"dtype": "float32", "shape": [1], "data": b"\0" * 4},
    {"dtype": "|b1", "shape": [1], "data": b"\0"},
    {"dtype": "O", "shape": [1], "data": b"\0" * 8},
    {"dtype": ["<f4"], "shape": [1], "data": b"\0" * 4},
    {"dtype": "<f4", "shape": [1], "data": "\0\0\0\0"},
], ids=lambda z: f"{z['dtype']}-{z['shape']}-{len(z['data'])}")
def test_bad_arrays_rejected(z: dict[str, Any]) -> None:
    with pytest.raises(WireError, match="latent.z_cls"):
        wire.unpack(_latent_with(z))


def test_non_string_map_keys_rejected() -> None:
    body = {**raw_body("stats"), "values": {1: 2}}
    with pytest.raises(WireError):
        wire.unpack(raw(topics.STATS, body))


def test_pack_rejects_what_cannot_travel() -> None:
    stats = {"t_ns": 1, "source": "s", "values": {}}
    bad_values = [{"a": 2**70}, {"a": "\ud800"}, {"a": object()}, {"a": np.zeros(2, bool)},
                  {"a": np.zeros((1,) * (wire.MAX_NDIM + 1), "<f4")}, {"a": np.zeros(2, "<c8")}]
    for values in bad_values:
        with pytest.raises(WireError):
            wire.pack(topics.STATS, {**stats, "values": values})
    with pytest.raises(WireError, match="mapping"):
        wire.pack(topics.STATS, [("t_ns", 1)])  # type: ignore[arg-type]
    with pytest.raises(WireError, match="topic"):
        wire.pack(b"iwm.stats", stats)  # type: ignore[arg-type]
    with pytest.raises(WireError, match="topic"):
        wire.pack("iwm.nope", stats)
    with pytest.raises(WireError):
        wire.pack("iwm.stats.\ud800", stats)


# ------------------------------------------------------------------ malformed: sizes


def _stats_with(value: Any) -> list[bytes]:
    return raw(topics.STATS, {**raw_body("stats"), "values": {"a": value}})


def _arr(shape: Any) -> dict[str, Any]:
    return {"dtype": "<f4", "shape": shape, "data": b"\0" * 16}


ABSURD = [
    _stats_with(_arr([2**40])),
    _stats_with(_arr([2**31] * wire.MAX_NDIM)),
    _stats_with(_arr([2**64 - 1])),
    _stats_with(_arr([wire.MAX_ARRAY_ELEMENTS + 1])),
    _latent_with(_arr([2**40, 768])),
    raw(topics.FRAME, {**raw_body("frame"), "pixels": {"dtype": "|u1", "shape": [2**20] * 3,
                                                       "data": b""}}),
    [b"iwm.stats", b"\xc6\xff\xff\xff\xff" + b"\0" * 8],  # bin32 claiming 4 GiB
    [b"iwm.stats", b"\xdb\xff\xff\xff\xff" + b"a" * 8],  # str32 claiming 4 GiB
    [b"iwm.stats", b"\xdd\xff\xff\xff\xff"],  # array32 claiming 4G items
    [b"iwm.stats", b"\xdf\xff\xff\xff\xff"],  # map32 claiming 4G entries
    [b"iwm.stats", b"\x81\xa1a\xc6\xff\xff\xff\xf0"],  # bin32 inside a map
]


def test_absurd_sizes_rejected_quickly_without_allocating() -> None:
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        for frames in ABSURD:
            with pytest.raises(WireError):
                wire.unpack(frames)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"decoding absurd sizes allocated {peak} bytes"
    assert elapsed < 2.0, f"decoding absurd sizes took {elapsed:.2f} s"


def test_oversize_payload_rejected() -> None:
    too_big = bytes(wire.MAX_MESSAGE_BYTES + 1)
    t0 = time.perf_counter()
    with pytest.raises(WireError, match="limit"):
        wire.unpack([b"iwm.frame", too_big])
    assert time.perf_counter() - t0 < 1.0


def test_deep_nesting_rejected() -> None:
    deep: Any = 1
    for _ in range(wire.MAX_DEPTH + 4):
        deep = {"a": deep}
    with pytest.raises(WireError, match="nests deeper"):
        wire.unpack(_stats_with(deep))
    with pytest.raises(WireError, match="nests deeper"):
        wire.pack(topics.STATS, {"t_ns": 1, "source": "s", "values": deep})
    deep_list: Any = 1
    for _ in range(wire.MAX_DEPTH + 4):
        deep_list = [deep_list]
    with pytest.raises(WireError, match="nests deeper"):
        wire.unpack(_stats_with(deep_list))
    # far deeper than msgpack's own stack: 100k nested one-element arrays
    with pytest.raises(WireError):
        wire.unpack([b"iwm.stats", b"\x91" * 100_000 + b"\x01"])


# ------------------------------------------------------------------ the per-kind tables

# pack and unpack first try a table per kind (wire._pack_fast / _unpack_fast) and fall back to
# the generic field-by-field path; the tables must take only what that path accepts, build
# the same payload and message, and never change an error.


@contextmanager
def generic_only() -> Iterator[None]:
    """pack / unpack with the per-kind tables off: every message takes the generic path."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(wire, "_pack_fast", lambda kind, body: None)
        patch.setattr(wire, "_unpack_fast", lambda body: None)
        yield


def _outcome(frames: list[bytes]) -> tuple[str, Any]:
    try:
        return "ok", wire.unpack(frames)
    except WireError as e:
        return "error", str(e)


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(data=st.data())
def test_tables_and_generic_path_agree(kind: str, data: st.DataObject) -> None:
    msg = data.draw(message_strategy(kind))
    frames = wire.pack(TOPIC_OF[kind], msg)
    with generic_only():
        assert wire.pack(TOPIC_OF[kind], msg) == frames  # byte for byte
    if data.draw(st.booleans()):
        frames = mutated(data, frames)
    got = _outcome(frames)
    with generic_only():
        want = _outcome(frames)
    assert got[0] == want[0], (got, want)
    if want[0] == "error":
        assert got[1] == want[1]  # the same words
    else:
        assert got[1][0] == want[1][0]
        assert_same(want[1][1], got[1][1])


_Z = np.arange(768, dtype=np.float32)
_ACT = wire.make_action([0.5, -1.0], 3)
#: what the capture and the encoder worker send for every frame (workers/capture.py
#: write_frame, workers/encoder.py _publish), and an agent's action
HOT = [
    (topics.FRAME, {"seq": 7, "slot": 3, "t_capture_ns": 10**18, "ring_id": 2**62,
                    "height": 480, "width": 640, "channels": 3, "action": None,
                    "source": "synthetic"}),
    (topics.FRAME, {"seq": 7, "slot": 3, "t_capture_ns": 1, "ring_id": 1, "height": 4,
                    "width": 4, "channels": 3, "action": _ACT, "source": "gym"}),
    (topics.LATENT, {"seq": 7, "t_capture_ns": 1, "t_publish_ns": 2, "variant": "core",
                     "z_cls": _Z, "patches": np.zeros((196, 768), np.float16)}),
    (topics.LATENT + ".inv", {"seq": 7, "t_capture_ns": 1, "t_publish_ns": 2,
                              "variant": "core", "z_cls": _Z, "patches": None}),
    (topics.SURPRISE, {"seq": 7, "t_capture_ns": 1, "t_publish_ns": 2, "variant": "core",
                       "surprise": 0.41, "surprise_z": None, "pred_seq": 6, "action": _ACT}),
    (topics.MRR, {"seq": 7, "t_capture_ns": 1, "t_publish_ns": 2, "variant": "core",
                  "rr": 0.5, "mrr": 0.25, "k": 8}),
    (topics.ACTION, {"seq": 1, "t_ns": 5, "frame_seq": 7, "vector": _Z[:4], "action_id": None,
                     "source": "agent"}),
]


@pytest.mark.parametrize(("topic", "msg"), HOT, ids=[t for t, _ in HOT])
def test_per_frame_messages_take_the_tables(topic: str, msg: dict[str, Any]) -> None:
    kind = topics.TOPIC_KINDS[topics.base_topic(topic)][0]
    assert wire._pack_fast(kind, {**msg, "v": wire.VERSION, "kind": kind}) is not None
    frames = wire.pack(topic, msg)
    assert wire._unpack_fast(msgpack.unpackb(frames[1], raw=False)) is not None
    got_topic, got = wire.unpack(frames)
    assert got_topic == topic and got.pop("v") == wire.VERSION
    assert_same({"kind": kind, **msg}, got)


def test_numpy_scalars_travel_as_python_values() -> None:
    msg = {"seq": np.int64(7), "t_capture_ns": np.uint32(1), "t_publish_ns": 2,
           "surprise": np.float32(0.5), "surprise_z": np.float64(-1.5), "pred_seq": None,
           "action": {"vector": None, "action_id": np.int16(2)}, "variant": np.str_("core")}
    _, got = wire.unpack(wire.pack(topics.SURPRISE, msg))
    assert (type(got["seq"]), type(got["t_capture_ns"]), type(got["surprise"])) == (
        int, int, float)
    assert (got["seq"], got["surprise"], got["surprise_z"]) == (7, 0.5, -1.5)
    assert got["action"] == {"vector": None, "action_id": 2} and got["variant"] == "core"
    with pytest.raises(WireError, match=r"surprise\.seq must be int"):  # a numpy bool is no int
        wire.pack(topics.SURPRISE, {**msg, "seq": np.bool_(True)})


def _latent(z: Any) -> dict[str, Any]:
    return {"seq": 1, "t_capture_ns": 1, "t_publish_ns": 2, "z_cls": z, "variant": "core"}


@pytest.mark.parametrize(("z", "match"), [
    (np.zeros(3, bool), "dtype bool cannot travel"),
    (np.zeros(3, "<c8"), "cannot travel"),
    (np.zeros(3, "<u2"), "cannot travel"),
    (np.zeros((1,) * (wire.MAX_NDIM + 1), "<f4"), "dimensions"),
    (np.zeros(wire.MAX_ARRAY_ELEMENTS + 1, "|u1"), "exceeds"),
], ids=["bool", "complex", "uint16", "ndim", "elements"])
def test_pack_refuses_arrays_that_cannot_travel(z: np.ndarray, match: str) -> None:
    with pytest.raises(WireError, match=match):
        wire.pack(topics.LATENT, _latent(z))
    frame = dict(HOT[1][1], action={"vector": z})
    with pytest.raises(WireError, match=match):
        wire.pack(topics.FRAME, frame)


class _Seq(IntEnum):
    ONE = 1


class _Array(np.ndarray):
    pass


def test_pack_still_converts_what_the_tables_leave_alone() -> None:
    z = np.arange(6, dtype=">f8").reshape(2, 3)[:, ::2]  # big-endian, not contiguous
    cases = [_latent(z), _latent(wire.encode_array(z)), MappingProxyType(_latent(z)),
             {**_latent(z), "seq": _Seq.ONE}, _latent(z.view(_Array))]
    for msg in cases:
        _, got = wire.unpack(wire.pack(topics.LATENT, msg))
        assert got["z_cls"].dtype == np.dtype("<f8") and type(got["seq"]) is int
        np.testing.assert_array_equal(got["z_cls"], z)
