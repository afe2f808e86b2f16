"""Message damage for fuzz tests: what a bad link or a buggy peer does to wire frames."""

from __future__ import annotations

from hypothesis import strategies as st


def mutated(data: st.DataObject, frames: list[bytes]) -> list[bytes]:
    """A valid message's frames, damaged the ways a bad link or a buggy peer damages them."""
    payload = bytearray(frames[1])
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "random", "frames"]))
    if kind == "flip":
        for i in data.draw(st.lists(st.integers(0, len(payload) - 1), min_size=1, max_size=8)):
            payload[i] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        payload = payload[:data.draw(st.integers(0, len(payload) - 1))]
    elif kind == "insert":
        at = data.draw(st.integers(0, len(payload)))
        payload[at:at] = data.draw(st.binary(min_size=1, max_size=16))
    elif kind == "random":
        payload = bytearray(data.draw(st.binary(max_size=200)))
    else:  # a wrong number of frames
        return [frames[0]] + [bytes(payload)] * data.draw(st.sampled_from([0, 2, 3]))
    return [frames[0], bytes(payload)]
