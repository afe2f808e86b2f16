"""The wire's compatibility rule (docs/wire.md), at the level of ``wire.unpack``.

Schema v1.x: a reader ignores fields it does not know and passes over kinds it does not know
(both counted); a field a minor version adds is optional; another major is refused with one
line naming both versions. The published versions are held here as they were released, so a
change to ``SCHEMA`` that is not a recorded, optional addition fails. The same rule replayed
into the bridge, recorder, worker and session files: tests/agent/test_bridge.py,
tests/worker/test_newer_peers.py, tests/session/test_session.py.

    .venv/bin/pytest tests/bus/test_compat.py -q
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from future import NEW_ACTION_KEY, NEW_FIELDS, future, future_kind, other_major
from test_wire import KINDS, TOPIC_OF, assert_same, sample

from iwm_bus.bus import topics, wire
from iwm_bus.errors import UnknownMessage, WireError, WireVersionError

_STAMPED = {"seq": "int", "t_capture_ns": "int", "t_publish_ns": "int"}
#: schema v1.0 as released (b422310): never to change
V1_0: dict[str, dict[str, str]] = {
    "frame": {"seq": "int", "slot": "int", "t_capture_ns": "int", "height": "int",
              "width": "int", "channels": "int", "action": "action?", "pixels": "array?",
              "source": "str?"},
    "action": {"seq": "int", "t_ns": "int", "frame_seq": "int?", "vector": "array?",
               "action_id": "int?", "source": "str?"},
    "latent": {**_STAMPED, "z_cls": "array", "patches": "array?", "variant": "str"},
    "surprise": {**_STAMPED, "surprise": "number?", "pred_seq": "int?", "action": "action?",
                 "variant": "str"},
    "mrr": {**_STAMPED, "rr": "number?", "mrr": "number?", "k": "int", "variant": "str"},
    "stats": {"t_ns": "int", "source": "str", "values": "map"},
    "rpc_request": {"id": "int", "method": "str", "params": "map"},
    "rpc_reply": {"id": "int", "ok": "bool", "result": "map?", "error": "str?"},
}
#: what v1.1 .. v1.4 added, as released
V1_4: dict[str, dict[str, str]] = {
    **V1_0,
    "frame": {**V1_0["frame"], "ring_id": "int?"},
    "surprise": {**V1_0["surprise"], "surprise_z": "number?"},
    "decision": {"seq": "int", "t_ns": "int", "frame_seq": "int?", "slow_down": "bool",
                 "prefer_wait": "bool", "escalate": "bool", "stale": "bool",
                 "delay_s": "number", "temporal_coherence": "number", "surprise": "number?",
                 "surprise_z": "number?", "mrr": "number?", "reasons": "str?",
                 "plan_costs": "array?", "plan_choice": "int?", "source": "str?"},
    "ready": {"t_ns": "int", "notices": "int", "restarts": "int", "stream": "str?"},
}
#: what v1.5 added, as released: the frame header's pixel codec on the gateway's link
V1_5: dict[str, dict[str, str]] = {
    **V1_4, "frame": {**V1_4["frame"], "codec": "str?", "lossy": "bool?"},
}
#: what v1.6 added: the capture stream (env) of a multi-stream worker's notices and results
V1_6: dict[str, dict[str, str]] = {
    **V1_5, **{k: {**V1_5[k], "env": "int?"} for k in ("frame", "latent", "surprise", "mrr")},
}
V1_0_READER = wire.schema_at(0)


# ------------------------------------------------------------------ the versions


def test_released_versions_are_what_the_history_derives() -> None:
    """A field added to SCHEMA without a new minor in HISTORY, a changed type or a removed
    field changes a released version: fails here. (Add a minor in wire.HISTORY, and its
    snapshot here, for a new optional field or kind; bump VERSION for anything else.)"""
    assert wire.schema_at(0) == V1_0
    assert wire.schema_at(4) == V1_4
    assert wire.schema_at(5) == V1_5
    assert wire.schema_at(6) == V1_6
    assert sorted(wire.HISTORY) == list(range(1, wire.MINOR + 1))


def test_every_field_a_minor_added_is_optional() -> None:
    added = [item for items in wire.HISTORY.values() for item in items]
    assert len(added) == len(set(added))
    for item in added:
        kind, _, name = item.partition(".")
        assert kind in wire.SCHEMA, item
        if name:  # a new kind's own fields may be required: its readers know them
            assert wire.SCHEMA[kind][name].endswith("?"), f"{item} must be optional"
    for minor in range(1, wire.MINOR + 1):  # each minor keeps everything of the one before
        old, new = wire.schema_at(minor - 1), wire.schema_at(minor)
        for kind, fields in old.items():
            assert fields.items() <= new[kind].items(), (minor, kind)


def test_this_side_says_its_version() -> None:
    assert wire.version_text() == f"1.{wire.MINOR}" and wire.VERSION == 1


# ------------------------------------------------------------------ today -> a v1.0 reader


@pytest.mark.parametrize("kind", KINDS)
def test_todays_messages_read_by_a_v1_0_reader(kind: str) -> None:
    """Every message today's writers can send (every field set), read by a reader that knows
    only v1.0: the v1.0 fields as sent, the newer ones left out and counted; a kind v1.0
    does not know is passed over and counted, not taken for a malformed message."""
    msg = sample(kind)
    frames = wire.pack(TOPIC_OF[kind], msg)
    unknown = wire.Unknowns()
    if kind not in V1_0:
        with pytest.raises(UnknownMessage, match=kind):
            wire.unpack(frames, schema=V1_0_READER, unknown=unknown)
        assert (unknown.kinds, unknown.fields) == (1, 0)
        return
    topic, got = wire.unpack(frames, schema=V1_0_READER, unknown=unknown)
    assert topic == TOPIC_OF[kind] and got.pop("v") == 1
    assert_same({n: v for n, v in msg.items() if n == "kind" or n in V1_0[kind]}, got)
    newer = set(wire.SCHEMA[kind]) - set(V1_0[kind])
    assert (unknown.fields, unknown.kinds) == (int(bool(newer)), 0)


@pytest.mark.parametrize("kind", sorted(V1_0))
def test_the_fewest_fields_today_sends_are_a_v1_0_message(kind: str) -> None:
    required = {n: v for n, v in sample(kind).items()
                if n == "kind" or not wire.SCHEMA[kind][n].endswith("?")}
    _, got = wire.unpack(wire.pack(TOPIC_OF[kind], required), schema=V1_0_READER)
    assert set(got) - {"v", "kind"} == set(required) - {"kind"}


# ------------------------------------------------------------------ a newer writer -> today


@pytest.mark.parametrize("kind", KINDS)
def test_a_newer_writers_fields_are_left_out_and_counted(kind: str) -> None:
    msg = sample(kind)
    topic = TOPIC_OF[kind]
    unknown = wire.Unknowns()
    got_topic, got = wire.unpack(future(topic, msg), unknown=unknown)
    assert got_topic == topic and got.pop("v") == 1
    assert_same(msg, got)  # the action map without its new key too
    assert (unknown.fields, unknown.kinds) == (1, 0)
    assert unknown.last.startswith(f"{kind}.")


def test_a_new_key_in_an_action_map_alone_is_left_out() -> None:
    msg = sample("surprise")
    unknown = wire.Unknowns()
    _, got = wire.unpack(future(topics.SURPRISE, msg, surprise_z=0.25), unknown=unknown)
    assert got["action"].keys() == {"vector", "action_id"} and got["surprise_z"] == 0.25
    assert unknown.fields == 1 and unknown.last == f"surprise.action.{NEW_ACTION_KEY}"


@pytest.mark.parametrize("topic", sorted(topics.TOPIC_KINDS))
def test_a_newer_writers_kind_is_passed_over_and_counted(topic: str) -> None:
    unknown = wire.Unknowns()
    with pytest.raises(UnknownMessage, match="flow_q"):
        wire.unpack(future_kind(topic), unknown=unknown)
    with pytest.raises(UnknownMessage, match="unknown topic 'iwm.flow'"):
        wire.unpack(future_kind("iwm.flow"), unknown=unknown)
    assert (unknown.kinds, unknown.fields) == (2, 0)


def test_malformed_known_fields_stay_malformed_beside_new_ones() -> None:
    body = msgpack.unpackb(future(topics.LATENT, sample("latent"))[1], raw=False)
    for bad in ({**body, "seq": "7"}, {k: v for k, v in body.items() if k != "z_cls"}):
        with pytest.raises(WireError, match="latent") as err:
            wire.unpack([topics.LATENT.encode(), msgpack.packb(bad, use_bin_type=True)])
        assert not isinstance(err.value, UnknownMessage)


@pytest.mark.parametrize("major", [0, 2, 3])
def test_a_peer_of_another_major_is_refused_in_one_line_naming_both(major: int) -> None:
    unknown = wire.Unknowns()
    with pytest.raises(WireVersionError) as err:
        wire.unpack(other_major(topics.SURPRISE, sample("surprise"), major), unknown=unknown)
    text = str(err.value)
    assert f"v{major}" in text and f"v1.{wire.MINOR}" in text and "\n" not in text
    assert unknown == wire.Unknowns()  # refused, not passed over


def test_pack_still_sends_only_what_this_side_knows() -> None:
    for kind in KINDS:
        with pytest.raises(WireError, match="unknown fields"):
            wire.pack(TOPIC_OF[kind], {**sample(kind), "confidence_q": 1.0})
    with pytest.raises(WireError, match="surprise.action"):
        wire.pack(topics.SURPRISE, {**sample("surprise"), "action": {NEW_ACTION_KEY: 3}})


def test_new_fields_cost_the_fast_path_only_for_the_newer_message() -> None:
    """Today's messages keep the per-kind tables; a newer one takes the generic path."""
    msg: dict[str, Any] = sample("latent")
    body = msgpack.unpackb(wire.pack(topics.LATENT, msg)[1], raw=False)
    assert wire._unpack_fast(body) is not None
    newer = msgpack.unpackb(future(topics.LATENT, msg)[1], raw=False)
    assert wire._unpack_fast(newer) is None and set(NEW_FIELDS) <= set(newer)
