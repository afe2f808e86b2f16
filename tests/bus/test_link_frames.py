"""Frames on the link (iwm_bus.bus.link_frames): each codec's round trip, the pixel part's
checks, and the compatibility rule for the frame header.

raw and zstd are bit-exact; jpeg (quality 90) stays within a mean absolute error of 2 grey
levels and a PSNR of 35 dB on the synthetic source's frames, and is marked lossy. A pixel
part that does not match its header is counted and dropped, never raised past the
subscriber.

    .venv/bin/pytest tests/bus/test_link_frames.py -q
"""

from __future__ import annotations

import io
import time
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
import zstandard
from conftest import find_free_port
from hypothesis import given, settings
from hypothesis import strategies as st
from loguru import logger
from PIL import Image

from iwm_bus.bus import topics, wire
from iwm_bus.bus.link_frames import (
    FrameDecoder,
    FrameEncoder,
    LinkCodec,
    LinkFrameSubscriber,
    PixelError,
    send_parts,
)
from workers.sources.synthetic import SyntheticSource

pytestmark = pytest.mark.timeout(60)
#: what jpeg at quality 90 may change of a synthetic frame (docs/scale-out.md)
JPEG_MAE, JPEG_PSNR_DB = 2.0, 35.0


def notice(seq: int = 7) -> dict[str, Any]:
    return {"seq": seq, "slot": seq % 8, "t_capture_ns": 1_000 + seq, "action": None,
            "source": "test", "ring_id": 42}


def synthetic(h: int, w: int, steps: int = 3) -> np.ndarray:
    src = SyntheticSource(w, h, seed=1)
    src.reset()
    for _ in range(steps):
        frame = src.step(None).pixels
    return frame


def through(parts: list[Any]) -> tuple[dict[str, Any], FrameDecoder]:
    """What a worker makes of ``parts`` (as they come off a socket: bytes)."""
    sub = LinkFrameSubscriber(["inproc://unused"], [topics.FRAME])
    try:
        got = sub.decode([bytes(memoryview(p).cast("B")) for p in parts])
        assert got is not None, f"dropped: bad {sub.decoder.bad}, malformed {sub.decode_errors}"
        return got[1], sub.decoder
    finally:
        sub.close()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return float(10 * np.log10(255**2 / mse)) if mse else float("inf")


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("spec", ["raw", "zstd", "zstd:9"])
@pytest.mark.parametrize("shape", [(210, 160, 3), (480, 640, 3), (24, 32, 1), (24, 32, 4)])
def test_lossless_codecs_are_bit_exact(spec: str, shape: tuple[int, int, int]) -> None:
    rgb = synthetic(*shape[:2])
    pixels = rgb if shape[2] == 3 else np.ascontiguousarray(
        np.concatenate([rgb, rgb[..., :1]], -1)[..., :shape[2]])
    enc = FrameEncoder(LinkCodec.parse(spec))
    parts = enc.pack(notice(), pixels)
    assert len(parts) == 3 and bytes(parts[0]) == topics.FRAME.encode()
    msg, dec = through(parts)
    assert msg["codec"] == LinkCodec.parse(spec).spec and msg["lossy"] is False
    np.testing.assert_array_equal(msg["pixels"], pixels)
    assert (msg["height"], msg["width"], msg["channels"]) == shape
    assert msg["seq"] == 7 and msg["ring_id"] == 42 and msg["source"] == "test"
    assert dec.stats()["link_codec"] == msg["codec"] and dec.lossy is False
    assert enc.raw_bytes == pixels.nbytes and enc.link_bytes == sum(
        memoryview(p).nbytes for p in parts)
    if spec == "raw":  # the pixel part is the frame's own memory: no copy on the way out
        assert np.shares_memory(parts[2], pixels)
    elif shape[0] >= 480:  # the synthetic frames' smooth backgrounds compress
        assert enc.link_bytes < pixels.nbytes / 2


@pytest.mark.parametrize("shape", [(210, 160, 3), (480, 640, 3), (1080, 1920, 3)])
def test_jpeg_stays_within_its_stated_error_and_is_marked_lossy(
        shape: tuple[int, int, int]) -> None:
    pixels = synthetic(*shape[:2])
    enc = FrameEncoder(LinkCodec.parse("jpeg"))
    parts = enc.pack(notice(), pixels)
    msg, dec = through(parts)
    got = msg["pixels"]
    assert msg["codec"] == "jpeg:90" and msg["lossy"] is True
    assert dec.lossy is True and dec.lossy_frames == 1 and dec.stats()["lossy"] == 1
    assert got.shape == pixels.shape and got.dtype == np.uint8
    mae = np.abs(got.astype(np.int16) - pixels).mean()
    assert 0 < mae <= JPEG_MAE and psnr(got, pixels) >= JPEG_PSNR_DB, (mae, psnr(got, pixels))
    assert enc.link_bytes < pixels.nbytes / 10  # what a lossy codec is for


def test_jpeg_quality_is_applied() -> None:
    pixels = synthetic(210, 160)
    out = {}
    for q in (30, 95):
        enc = FrameEncoder(LinkCodec("jpeg", q))
        msg, _ = through(enc.pack(notice(), pixels))
        out[q] = (enc.link_bytes, np.abs(msg["pixels"].astype(np.int16) - pixels).mean())
    assert out[30][0] < out[95][0] and out[30][1] > out[95][1], out


def test_jpeg_of_grey_and_rgba_frames() -> None:
    rgb = synthetic(48, 64)
    grey = np.ascontiguousarray(rgb[..., 1:2])
    msg, _ = through(FrameEncoder(LinkCodec("jpeg")).pack(notice(), grey))
    assert msg["pixels"].shape == (48, 64, 1) and msg["channels"] == 1
    assert np.abs(msg["pixels"].astype(np.int16) - grey).mean() <= JPEG_MAE
    rgba = np.ascontiguousarray(np.concatenate([rgb, np.full((48, 64, 1), 9, np.uint8)], -1))
    msg, _ = through(FrameEncoder(LinkCodec("jpeg")).pack(notice(), rgba))
    assert msg["pixels"].shape == (48, 64, 3) and msg["channels"] == 3  # alpha not sent


def test_inline_is_what_gateways_before_wire_1_5_sent() -> None:
    """``inline``: two parts, the pixels inside msgpack, no codec field: what a worker of
    wire 1.4 reads (it knows nothing of a third part)."""
    pixels = synthetic(24, 32)
    parts = FrameEncoder(LinkCodec("inline")).pack(notice(), pixels)
    assert len(parts) == 2
    topic, msg = wire.unpack(parts, schema=wire.schema_at(4))  # a wire 1.4 reader
    np.testing.assert_array_equal(msg["pixels"], pixels)
    got, dec = through(parts)
    np.testing.assert_array_equal(got["pixels"], pixels)
    assert dec.codec == "raw" and dec.lossy is False


def test_an_older_gateways_notice_without_codec_means_raw() -> None:
    """The compatibility rule: a header without ``codec`` (an older writer) is raw, whether
    its pixels are inline (a gateway before 1.5) or in a part of their own."""
    pixels = synthetic(24, 32)
    old = wire.pack(topics.FRAME, {**notice(), "height": 24, "width": 32, "channels": 3,
                                   "pixels": pixels})
    body = msgpack.unpackb(old[1], raw=False)
    assert "codec" not in body and "lossy" not in body
    msg, dec = through(old)
    np.testing.assert_array_equal(msg["pixels"], pixels)
    header = wire.pack(topics.FRAME, {**notice(), "height": 24, "width": 32, "channels": 3})
    msg, dec = through([*header, pixels.tobytes()])
    np.testing.assert_array_equal(msg["pixels"], pixels)
    assert dec.codec == "raw" and not dec.lossy


def test_a_decoded_raw_frame_is_read_only() -> None:
    """A raw frame is a view of the message part: read-only, so that whoever keeps it
    (workers.ring_reader.InlineFrames) copies it before the part goes."""
    pixels = synthetic(24, 32)
    part = bytearray(pixels.tobytes())  # a writable buffer, as ZeroMQ's are
    header = FrameEncoder().pack(notice(), pixels)[:2]
    got = FrameDecoder().decode(wire.unpack(header)[1], part)
    assert got is not None and not got.flags.writeable and np.shares_memory(
        got, np.frombuffer(part, np.uint8))


# ------------------------------------------------------------------ bad pixel parts


def _header(codec: str | None = "raw", h: int = 24, w: int = 32, c: int = 3,
            **extra: Any) -> list[bytes]:
    return wire.pack(topics.FRAME, {**notice(), "height": h, "width": w, "channels": c,
                                    "codec": codec, "lossy": codec == "jpeg", **extra})


def _jpeg(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG")
    return out.getvalue()


GOOD = synthetic(24, 32)
BAD_PARTS = {
    "raw one byte short": (_header(), GOOD.tobytes()[:-1], "needs 2304"),
    "raw one byte long": (_header(), GOOD.tobytes() + b"\0", "needs 2304"),
    "raw empty": (_header(), b"", "needs 2304"),
    "zstd garbage": (_header("zstd:1"), b"not zstd at all", "zstd"),
    "zstd truncated": (_header("zstd:1"), zstandard.compress(GOOD.tobytes())[:-6], "zstd"),
    "zstd of another size": (_header("zstd:1"), zstandard.compress(GOOD.tobytes() * 2),
                             "holds 4608"),
    "zstd without its size": (_header("zstd:1"), zstandard.ZstdCompressor(
        write_content_size=False).compress(GOOD.tobytes()), "holds -1"),
    "jpeg truncated": (_header("jpeg:90"), _jpeg(GOOD)[:200], "jpeg"),
    "jpeg of another size": (_header("jpeg:90"), _jpeg(synthetic(48, 32)), "48x32"),
    "jpeg that is a png": (_header("jpeg:90"), b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "not a JPEG"),
    "an unknown codec": (_header("webp:80"), b"\0" * 100, "unknown link codec"),
    "a codec without a part": (_header("zstd:1"), None, "missing"),
    "pixels inline and in a part": (_header(pixels=GOOD), GOOD.tobytes(), "both"),
    "too many values": (_header(h=8192, w=8192, c=4), b"\0", "cannot travel"),
    "zero height": (_header(h=0), b"", "cannot travel"),
    "five channels": (_header(c=5), GOOD.tobytes(), "cannot travel"),
}


@pytest.mark.parametrize("case", sorted(BAD_PARTS))
def test_a_bad_pixel_part_raises_pixel_error_naming_it(case: str) -> None:
    header, part, says = BAD_PARTS[case]
    with pytest.raises(PixelError, match=says):
        FrameDecoder().decode(wire.unpack(header)[1], part)


def test_bad_pixel_parts_are_counted_dropped_and_logged_once_each_over_a_socket() -> None:
    """Over a real tcp socket, every bad part of BAD_PARTS between good frames: the good
    frames arrive, the bad ones are counted in ``bad_pixels`` (not as malformed messages),
    logged in one line each for the first ten and then rarely, and nothing raises."""
    port = find_free_port()
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(f"tcp://127.0.0.1:{port}")
    sub = LinkFrameSubscriber([f"tcp://127.0.0.1:{port}"], [topics.FRAME], ctx=ctx)
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING",
                      filter=lambda r: "bad pixel part" in r["message"])
    try:
        enc = FrameEncoder(LinkCodec("zstd"))
        deadline = time.monotonic() + 10
        while sub.recv(50) is None:  # PUB/SUB: until the subscription has arrived
            assert time.monotonic() < deadline, "no subscription"
            send_parts(pub, enc.pack(notice(0), GOOD))
        bad = [(h, p) for h, p, _ in BAD_PARTS.values()] * 2
        seqs = []
        for i, (header, part) in enumerate(bad):
            send_parts(pub, enc.pack(notice(100 + i), GOOD))
            pub.send_multipart(header + ([part] if part is not None else []))
        send_parts(pub, enc.pack(notice(999), GOOD))
        while 999 not in seqs:
            got = sub.recv(5000)
            assert got is not None, f"the last good frame never came ({seqs})"
            np.testing.assert_array_equal(got[1]["pixels"], GOOD)
            seqs.append(got[1]["seq"])
        assert seqs == [100 + i for i in range(len(bad))] + [999]
        assert sub.decoder.bad == len(bad) and sub.decode_errors == 0
        assert len(lines) == 10  # worth_logging: the first ten, then every 1000th
    finally:
        logger.remove(sink)
        sub.close()
        pub.close()
        ctx.term()


def test_a_message_with_more_parts_is_malformed_not_fatal() -> None:
    sub = LinkFrameSubscriber(["inproc://unused"], [topics.FRAME])
    try:
        parts = [bytes(memoryview(p).cast("B")) for p in
                 FrameEncoder().pack(notice(), GOOD)]
        assert sub.decode([*parts, b"extra"]) is None
        assert sub.decode(parts[:1]) is None
        assert sub.decode_errors == 2 and sub.decoder.bad == 0
    finally:
        sub.close()


# ------------------------------------------------------------------ the codec spec


@pytest.mark.parametrize(("spec", "want"), [
    ("raw", LinkCodec("raw")), ("zstd", LinkCodec("zstd", 1)), ("zstd:19", LinkCodec("zstd", 19)),
    ("jpeg", LinkCodec("jpeg", 90)), ("jpeg:1", LinkCodec("jpeg", 1)),
    ("inline", LinkCodec("inline")),
])
def test_codec_specs(spec: str, want: LinkCodec) -> None:
    codec = LinkCodec.parse(spec)
    assert codec == want and LinkCodec.parse(codec.spec) == codec
    assert codec.lossy == (want.name == "jpeg")


@pytest.mark.parametrize(("spec", "says"), [
    ("webp", "unknown link codec 'webp'"), ("", "unknown link codec"), ("JPEG", "unknown"),
    ("jpeg:0", "quality after 'jpeg:' must be an integer in 1..100"),
    ("jpeg:101", "1..100"), ("jpeg:high", "quality"), ("jpeg:", "quality"),
    ("zstd:20", "level after 'zstd:' must be an integer in 1..19"), ("zstd:-1", "level"),
    ("raw:3", "raw takes no ':' argument"), ("inline:1", "takes no"),
])
def test_bad_codec_specs_name_the_problem_in_one_line(spec: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as e:
        LinkCodec.parse(spec)
    assert "\n" not in str(e.value)


@settings(max_examples=80, deadline=None)
@given(codec=st.sampled_from([None, "raw", "zstd:1", "jpeg:90", "inline", "webp", "zstd:99"]),
       h=st.integers(-2, 40), w=st.integers(-2, 40), c=st.integers(-1, 5),
       part=st.one_of(st.none(), st.binary(max_size=300), st.sampled_from(
           [GOOD.tobytes(), zstandard.compress(GOOD.tobytes()), _jpeg(GOOD)])))
def test_no_header_and_part_can_raise_past_the_subscriber(
        codec: str | None, h: int, w: int, c: int, part: bytes | None) -> None:
    """Whatever a peer puts in the header and the part: a frame that matches its header,
    or None with the message counted; nothing raises."""
    sub = LinkFrameSubscriber(["inproc://unused"], [topics.FRAME])
    try:
        body = {"v": wire.VERSION, "kind": "frame", **notice(), "height": h, "width": w,
                "channels": c, "codec": codec}
        header = [topics.FRAME.encode(), msgpack.packb(body, use_bin_type=True)]
        got = sub.decode(header + ([part] if part is not None else []))
        if got is None:
            assert sub.decode_errors + sub.decoder.bad == 1
        else:
            pixels = got[1]["pixels"]
            assert pixels is None or pixels.shape == (h, w, c)
    finally:
        sub.close()
