"""Frames on the link: how the gateway sends a frame to a remote worker, and its pixel codecs.

A frame travels from the gateway (``workers/gateway.py``) to a remote worker as three
message parts::

    [b"iwm.frame", header, pixels]

``header`` is the frame notice (the wire schema's ``frame``, ``pixels`` nil) with ``codec``
and ``lossy`` set and ``height`` / ``width`` / ``channels`` describing the pixels; ``pixels``
is the frame's bytes as the codec made them, a ZeroMQ part of its own, never inside
msgpack. The gateway sends it without a copy (``copy=False``: ZeroMQ sends from the array
read out of the ring, which is the one copy the ring's seqlock needs anyway).

Codecs (``iwm-launch --remote-worker ... --link-codec``, :class:`LinkCodec`):

- ``raw``: the bytes as they are (H, W, C uint8, C order); the default.
- ``zstd[:LEVEL]``: lossless, python-zstandard (level 1..19, default 1).
- ``jpeg[:QUALITY]``: lossy, through Pillow (quality 1..100, default 90); frames with an
  alpha channel lose it (the worker reads RGB).
- ``inline``: the pixels inside the notice's msgpack map, two parts: how gateways before
  wire 1.5 sent them, and the one form a worker older than 1.5 reads.

The receiver (:class:`FrameDecoder`, in a remote worker :class:`LinkFrameSubscriber`) checks
every pixel part against its header before it allocates by it: a part of the wrong size, a
codec it does not know, or bytes that do not decode to the header's frame raise
:class:`PixelError`; the subscriber then drops that notice, counts it (``bad_pixels``) and
logs it (rate-limited), and carries on. A header without ``codec`` (an older gateway) means
raw. docs/wire.md#frames-on-the-link is the reference.

    codec = LinkCodec.parse("jpeg:85")
    parts = FrameEncoder(codec).pack({"seq": 0, "slot": 0, "t_capture_ns": t}, pixels)
    topic, msg = LinkFrameSubscriber([link.frames], [topics.FRAME]).recv(1000)
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq
import zstandard
from loguru import logger

from iwm_bus.bus import topics, wire
from iwm_bus.bus.transport import Subscriber
from iwm_bus.errors import WireError
from iwm_bus.logs import worth_logging

__all__ = ["CODECS", "FrameDecoder", "FrameEncoder", "LinkCodec", "LinkFrameSubscriber",
           "PixelError", "send_parts"]

#: the codecs a link may use (docs/wire.md#frames-on-the-link)
CODECS = ("raw", "zstd", "jpeg", "inline")
#: the codecs whose decoded frame is not bit-exact
LOSSY = frozenset({"jpeg"})
DEFAULT_ZSTD_LEVEL = 1  # 1 and 3 compress game frames alike; 1 is ~1.5x faster at 1080p
DEFAULT_JPEG_QUALITY = 90
#: the range of each codec's :attr:`LinkCodec.level`
LEVELS = {"zstd": (1, 19), "jpeg": (1, 100)}
CHANNELS = (1, 3, 4)
#: pixel parts shorter than this are copied into the message (ZeroMQ's zero-copy bookkeeping
#: costs more than copying a small part)
COPY_BELOW = 65536


class PixelError(WireError):
    """A frame's pixel part that does not decode to the frame its header describes."""


@dataclass(frozen=True)
class LinkCodec:
    """How a link's frames travel (see the module doc)."""

    # raw | zstd | jpeg | inline
    name: str = "raw"
    # zstd: compression level, jpeg: quality (LEVELS); None: the codec's default (and
    # always None for raw and inline)
    level: int | None = None

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(f"LinkCodec.name={self.name!r}: must be one of {', '.join(CODECS)}")
        span = LEVELS.get(self.name)
        if span is None:
            if self.level is not None:
                raise ValueError(f"LinkCodec.level={self.level!r}: {self.name} takes no level")
            return
        level = self.level
        if level is None:
            level = DEFAULT_ZSTD_LEVEL if self.name == "zstd" else DEFAULT_JPEG_QUALITY
            object.__setattr__(self, "level", level)
        if isinstance(level, bool) or not isinstance(level, int) or \
                not span[0] <= level <= span[1]:
            raise ValueError(f"LinkCodec.level={level!r}: {self.name} takes "
                             f"{'a quality' if self.name == 'jpeg' else 'a level'} in "
                             f"{span[0]}..{span[1]}")

    @classmethod
    def parse(cls, spec: str) -> LinkCodec:
        """``raw``, ``zstd[:LEVEL]``, ``jpeg[:QUALITY]`` or ``inline``; ValueError in one line
        naming what is wrong."""
        if not isinstance(spec, str):
            raise ValueError(f"link codec must be a str, got {type(spec).__name__}")
        name, sep, arg = spec.partition(":")
        if name not in CODECS:
            raise ValueError(f"unknown link codec {spec!r}: use raw, zstd[:LEVEL], "
                             "jpeg[:QUALITY] or inline")
        if not sep:
            return cls(name)
        span = LEVELS.get(name)
        if span is None:
            raise ValueError(f"link codec {spec!r}: {name} takes no ':' argument")
        if not arg.isdigit() or not span[0] <= int(arg) <= span[1]:
            what = "quality" if name == "jpeg" else "level"
            raise ValueError(f"link codec {spec!r}: the {what} after '{name}:' must be an "
                             f"integer in {span[0]}..{span[1]}")
        return cls(name, int(arg))

    @property
    def spec(self) -> str:
        """What :meth:`parse` reads back: ``raw``, ``zstd:1``, ``jpeg:90``."""
        return self.name if self.level is None else f"{self.name}:{self.level}"

    @property
    def lossy(self) -> bool:
        return self.name in LOSSY

    def __str__(self) -> str:
        return self.spec + (" (lossy)" if self.lossy else "")


# ---------------------------------------------------------------- the gateway's side


class FrameEncoder:
    """The gateway's half: a frame notice and its pixels as the link's message parts, and
    what they cost (``frames``, ``raw_bytes``, ``link_bytes``, ``encode_ns``: running
    totals). Not thread-safe (one zstd compressor, reused)."""

    def __init__(self, codec: LinkCodec | None = None) -> None:
        self.codec = codec or LinkCodec()
        self._zstd = (zstandard.ZstdCompressor(level=self.codec.level)
                      if self.codec.name == "zstd" else None)
        self.frames = 0
        self.raw_bytes = 0  # the frames' own size
        self.link_bytes = 0  # what went into the message parts (headers included)
        self.encode_ns = 0  # time spent packing (codec and header)

    def pack(self, notice: Mapping[str, Any], pixels: np.ndarray) -> list[Any]:
        """The message parts of one frame: ``[topic, header, pixels]`` (``inline``: ``[topic,
        payload]``). ``notice``: the frame notice's fields (``height``, ``width``,
        ``channels``, ``pixels``, ``codec`` and ``lossy`` are set here); ``pixels``: (H, W, C)
        uint8, C in 1, 3, 4. The raw codec's pixel part is ``pixels`` itself (no copy);
        raises WireError for a frame that cannot travel."""
        t0 = time.perf_counter_ns()
        if not (isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.ndim == 3
                and pixels.shape[2] in CHANNELS):
            raise WireError(f"a link frame must be (H, W, C) uint8 with C in {CHANNELS}, got "
                            f"{getattr(pixels, 'shape', None)} "
                            f"{getattr(pixels, 'dtype', type(pixels).__name__)}")
        pixels = np.ascontiguousarray(pixels)
        codec = self.codec
        if codec.name == "inline":
            h, w, c = pixels.shape
            parts = wire.pack(topics.FRAME, {**notice, "height": h, "width": w, "channels": c,
                                             "pixels": pixels})
        else:
            data = self._encode(pixels)
            h, w = pixels.shape[:2]
            c = 3 if codec.name == "jpeg" and pixels.shape[2] == 4 else pixels.shape[2]
            header = wire.pack(topics.FRAME, {**notice, "height": h, "width": w,
                                              "channels": c, "pixels": None,
                                              "codec": codec.spec, "lossy": codec.lossy})
            parts = [*header, data]
        self.frames += 1
        self.raw_bytes += pixels.nbytes
        self.link_bytes += sum(_nbytes(p) for p in parts)
        self.encode_ns += time.perf_counter_ns() - t0
        return parts

    def _encode(self, pixels: np.ndarray) -> Any:
        if self._zstd is not None:
            return self._zstd.compress(pixels)
        if self.codec.name == "jpeg":
            return _jpeg(pixels, self.codec.level or DEFAULT_JPEG_QUALITY)
        return pixels  # raw: ZeroMQ sends from the array itself

    def stats(self) -> dict[str, Any]:
        """Running totals, for the gateway's ``iwm.stats``."""
        return {"codec": self.codec.spec, "lossy": int(self.codec.lossy),
                "raw_bytes": self.raw_bytes, "link_bytes": self.link_bytes,
                "encode_ms_total": round(self.encode_ns / 1e6, 3)}


def _jpeg(pixels: np.ndarray, quality: int) -> bytes:
    from PIL import Image  # only a jpeg link pays Pillow's import

    c = pixels.shape[2]
    img = Image.fromarray(pixels[..., 0] if c == 1 else np.ascontiguousarray(pixels[..., :3]))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _nbytes(part: Any) -> int:
    return part.nbytes if isinstance(part, (np.ndarray, memoryview)) else len(part)


def send_parts(sock: zmq.Socket, parts: Sequence[Any]) -> bool:
    """Send ``parts`` without blocking, the last (the pixels) without a copy when it is
    large; False when the socket would block."""
    try:
        for part in parts[:-1]:
            sock.send(part, zmq.NOBLOCK | zmq.SNDMORE)
        sock.send(parts[-1], zmq.NOBLOCK, copy=_nbytes(parts[-1]) < COPY_BELOW)
    except zmq.Again:
        return False
    return True


# ---------------------------------------------------------------- the worker's side


class FrameDecoder:
    """The remote worker's half: the pixels of a link frame message, checked against its
    header. Counts ``frames`` decoded, ``lossy_frames`` of them, ``bad`` pixel parts, and
    ``decode_ns``; ``codec`` and ``lossy`` are the last frame's (None before the first)."""

    def __init__(self) -> None:
        self._zstd = zstandard.ZstdDecompressor()
        self.frames = 0
        self.lossy_frames = 0
        self.bad = 0
        self.decode_ns = 0
        self.codec: str | None = None
        self.lossy: bool | None = None

    def decode(self, msg: dict[str, Any], part: Any = None) -> np.ndarray | None:
        """The frame of notice ``msg`` (unpacked header) and its pixel part ``part`` (any
        buffer; None for a two-part message), as (H, W, C) uint8: a read-only view of
        ``part`` (raw) or of the decoded bytes. A two-part notice's inline ``pixels`` are
        returned as they are (None when it has none). Raises PixelError."""
        t0 = time.perf_counter_ns()
        spec = msg.get("codec")
        if part is None:
            if spec not in (None, "raw", "inline"):
                raise PixelError(f"frame {msg.get('seq')}: its header says codec {spec!r} but "
                                 "the pixel part is missing")
            pixels = msg.get("pixels")
            codec = "raw" if pixels is not None else None
        else:
            if msg.get("pixels") is not None:
                raise PixelError(f"frame {msg.get('seq')}: pixels both inline and in a part")
            codec = spec or "raw"  # a header without a codec: raw (the compatibility rule)
            pixels = self._decode(msg, codec, part)
        if pixels is not None:
            self.frames += 1
            self.lossy = bool(msg.get("lossy"))
            self.lossy_frames += self.lossy
            self.codec = codec
            self.decode_ns += time.perf_counter_ns() - t0
        return pixels

    def _decode(self, msg: dict[str, Any], spec: str, part: Any) -> np.ndarray:
        seq = msg.get("seq")
        try:
            codec = LinkCodec.parse(spec)
        except ValueError as e:
            raise PixelError(f"frame {seq}: {e} (a newer gateway's codec?)") from None
        h, w, c = msg["height"], msg["width"], msg["channels"]
        if c not in CHANNELS or h < 1 or w < 1 or h * w * c > wire.MAX_ARRAY_ELEMENTS:
            raise PixelError(f"frame {seq}: a {h}x{w}x{c} frame cannot travel (channels "
                             f"{CHANNELS}, at most {wire.MAX_ARRAY_ELEMENTS} values)")
        size = h * w * c
        data = memoryview(part).cast("B")
        if codec.name == "raw":
            if data.nbytes != size:
                raise PixelError(f"frame {seq}: raw pixel part is {data.nbytes} bytes; "
                                 f"{h}x{w}x{c} needs {size}")
            view = np.frombuffer(data, np.uint8).reshape(h, w, c)
            view.flags.writeable = False  # the part's memory: whoever holds the frame copies
            return view
        if codec.name == "zstd":
            return self._unzstd(data, seq, (h, w, c))
        if codec.name == "jpeg":
            return _unjpeg(data, seq, (h, w, c))
        raise PixelError(f"frame {seq}: codec {spec!r} sends no pixel part")  # inline

    def _unzstd(self, data: memoryview, seq: Any, shape: tuple[int, int, int]) -> np.ndarray:
        size = math.prod(shape)
        try:
            # the size the frame says it holds, checked before anything is allocated by it
            said = zstandard.frame_content_size(data)
            if said != size:
                raise PixelError(f"frame {seq}: zstd pixel part holds {said} bytes; "
                                 f"{'x'.join(map(str, shape))} needs {size}")
            out = self._zstd.decompress(data, max_output_size=size)
        except zstandard.ZstdError as e:
            raise PixelError(f"frame {seq}: zstd pixel part does not decompress: {e}") from None
        if len(out) != size:
            raise PixelError(f"frame {seq}: zstd pixel part gave {len(out)} bytes, not {size}")
        return np.frombuffer(out, np.uint8).reshape(shape)

    def stats(self) -> dict[str, Any]:
        """Running totals, for a remote worker's ``iwm.stats``."""
        return {"link_codec": self.codec, "lossy": int(bool(self.lossy)),
                "link_frames": self.frames, "lossy_frames": self.lossy_frames,
                "bad_pixels": self.bad,
                "decode_ms_total": round(self.decode_ns / 1e6, 3)}


def _unjpeg(data: memoryview, seq: Any, shape: tuple[int, int, int]) -> np.ndarray:
    from PIL import Image

    h, w, c = shape
    try:
        img = Image.open(io.BytesIO(data), formats=["JPEG"])
    except (OSError, SyntaxError, ValueError) as e:  # (UnidentifiedImageError is an OSError)
        raise PixelError(f"frame {seq}: jpeg pixel part is not a JPEG image: {e}") from None
    # the header is read: check the size before the pixels are decoded into memory
    if img.size != (w, h) or img.mode != {1: "L", 3: "RGB"}.get(c):
        raise PixelError(f"frame {seq}: jpeg pixel part is {img.size[1]}x{img.size[0]} "
                         f"{img.mode}; the header says {h}x{w} with {c} channels")
    try:
        pixels = np.asarray(img)
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise PixelError(f"frame {seq}: jpeg pixel part does not decode: {e}") from None
    return pixels.reshape(shape)


class LinkFrameSubscriber(Subscriber):
    """A remote worker's SUB socket on the gateway's frames port: each frame notice with its
    pixels decoded into ``pixels`` (:class:`FrameDecoder`, ``decoder``). A malformed
    message is counted in ``decode_errors``, a notice whose pixel part is bad in
    ``decoder.bad`` (logged, rate-limited), and either is dropped; neither stops it. Parts
    are received without a copy, so a raw frame is read from ZeroMQ's own buffer."""

    copy_parts = False

    def __init__(self, endpoints: Iterable[str], topics: Iterable[str], **kwargs: Any) -> None:
        super().__init__(endpoints, topics, **kwargs)
        self.decoder = FrameDecoder()

    def decode(self, frames: Sequence[Any]) -> tuple[str, dict[str, Any]] | None:
        """``(topic, notice)`` with the notice's pixels decoded; None (counted) when
        malformed or its pixels are bad."""
        part = frames[2] if len(frames) == 3 else None
        head = [bytes(f) for f in frames[:2]] if part is not None else [bytes(f) for f in frames]
        got = super().decode(head)
        if got is None or got[1].get("kind") != "frame":
            return got
        topic, msg = got
        try:
            msg["pixels"] = self.decoder.decode(msg, part)
        except PixelError as e:
            self.decoder.bad += 1
            if worth_logging(self.decoder.bad):
                logger.warning("dropped a frame notice with a bad pixel part (#{}): {}",
                               self.decoder.bad, e)
            return None
        return topic, msg
