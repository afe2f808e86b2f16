"""A "future" writer for the compatibility tests (docs/wire.md): messages of schema v1.x from a
peer newer than this side (fields and kinds it does not know yet), and of another major
version, packed with bare msgpack since ``wire.pack`` sends only what this side knows."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from iwm_bus.bus import wire

#: fields a newer writer adds to every message: a number, a nested map, an array
NEW_FIELDS: dict[str, Any] = {
    "confidence_q": 0.5,
    "provenance_q": {"run": {"steps": [1, 2, 3]}},
    "flow_q": wire.encode_array(np.arange(6, dtype=np.float32).reshape(2, 3)),
}
#: a key a newer writer adds to action maps
NEW_ACTION_KEY = "duration_ms"


def future(topic: str, msg: dict[str, Any], **fields: Any) -> list[bytes]:
    """``msg`` as this side packs it, plus a newer writer's ``fields`` (default NEW_FIELDS)
    and, in its action map if it has one, NEW_ACTION_KEY."""
    frames = wire.pack(topic, msg)
    body = msgpack.unpackb(frames[1], raw=False)
    body.update(fields or NEW_FIELDS)
    if isinstance(body.get("action"), dict):
        body["action"][NEW_ACTION_KEY] = 33
    return [frames[0], msgpack.packb(body, use_bin_type=True)]


def future_kind(topic: str, kind: str = "flow_q") -> list[bytes]:
    """A message of a kind this side does not know, on ``topic``."""
    body = {"v": wire.VERSION, "kind": kind, "seq": 3, "t_ns": 5, **NEW_FIELDS}
    return [topic.encode(), msgpack.packb(body, use_bin_type=True)]


def other_major(topic: str, msg: dict[str, Any], major: int = wire.VERSION + 1) -> list[bytes]:
    """``msg`` as a peer of schema v``major`` sends it."""
    frames = wire.pack(topic, msg)
    body = msgpack.unpackb(frames[1], raw=False)
    return [frames[0], msgpack.packb({**body, "v": major}, use_bin_type=True)]
