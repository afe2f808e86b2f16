"""Shared-memory FrameRing: one writer, any number of readers, a seqlock per slot.

The game capture writes ``(H, W, C)`` uint8 frames into a ring of fixed-size slots in a
POSIX shared-memory segment (``/dev/shm/<name>``); workers in other processes attach by
name and copy frames out by sequence number. The writer never waits for readers: a reader
that asks for a frame which has already been overwritten, or which is overwritten while it
copies, gets ``None`` and the miss is counted in :attr:`FrameRing.stats`.

Layout (all header fields are native-endian int64, every slot starts on a 64-byte line)::

    ring header (128 B)  magic, layout version, slots, max_height, max_width, channels,
                         slot stride, total bytes | latest published seq, creator pid,
                         ring id
    slot i (stride B)    header (64 B): sequence word, frame seq, t_capture_ns,
                         height, width, channels, dtype code, reserved
                         pixels (max_height * max_width * channels B, padded to 64 B)

Seqlock. For frame ``seq`` the writer stores ``2*seq + 1`` (odd: being written) in the
slot's sequence word, writes the slot header and pixels, stores ``2*seq + 2`` (even: frame
``seq`` complete) and then publishes ``seq`` as the ring's latest. Encoding the frame seq in
the word itself makes one 8-byte load answer both "is it stable?" and "is it my frame?", and
the word grows with every write to the slot, so there is no ABA. A reader loads the word,
copies, and loads it again; any change means the frame was torn and is discarded.

Memory ordering. The header words are loaded and stored one at a time through an int64
memoryview of the segment, the pixels copied by numpy: plain loads and stores, each word one
aligned 8-byte access (as a numpy int64 element would be). So this relies on x86-64's
TSO model: aligned 8-byte loads/stores are atomic, stores become visible in program order
and loads are not reordered with other loads (glibc's non-temporal memcpy path ends with an
``sfence``). On a weakly ordered CPU (ARM, POWER) the writer would need a release fence
before each word store and the reader an acquire fence after the first load and before the
second; do not use this module there without adding them.

Identity. ``create`` draws a random 63-bit ``ring_id`` and the capture puts it in every frame
notice (commaai VisionIPC's ``server_id``): a reader whose attached ring has another id than a
notice knows the capture restarted, however the seqs compare, and re-attaches.

Lifetime. Only the creator unlinks the segment (``unlink()`` or leaving its ``with``
block). Readers attach without registering the segment with Python's resource tracker
(which would otherwise unlink it, and warn, when a reader exits on Python < 3.13). A
segment left behind by a crashed creator is reported by ``create`` as
:class:`~iwm_bus.errors.StaleRingError`, never reused.

Example::

    with FrameRing.create("iwm_demo", slots=8, max_height=480, max_width=640) as ring:
        seq = ring.write(frame)                     # in the capture process
    reader = FrameRing.attach("iwm_demo")           # in a worker process
    got = reader.read(reader.latest_seq, with_meta=True)
    if got is not None:
        pixels, meta = got
"""

from __future__ import annotations

import operator
import os
import re
import secrets
import struct
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from types import TracebackType
from typing import Any, Literal, NamedTuple, overload

import numpy as np

from iwm_bus.errors import RingError, StaleRingError

__all__ = ["FrameMeta", "FrameRing", "RingStats", "clock_ns", "env_ring_names", "MAX_RING_BYTES",
           "reclaim_dead"]

#: The clock behind the default ``t_capture_ns``: the wall clock (``time.time_ns``), the same
#: clock every ``t_*_ns`` field on the bus uses, so latencies can be subtracted across processes.
clock_ns = time.time_ns  # wall clock: the same stamps travel on the bus (t_capture_ns)

MAGIC = int.from_bytes(b"IWMRING\x00", "little")
LAYOUT_VERSION = 2  # 2: the ring id
#: Largest segment ``create`` accepts (slots x slot stride + header).
MAX_RING_BYTES = 4 << 30
MAX_NAME_LEN = 200
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_ALIGN = 64
_DTYPE_UINT8 = 1
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

# Ring header: word indices (int64). Static layout on the first 64-byte line, the
# frequently written "latest" on its own line so readers of the layout don't share it.
_RING_HEADER_BYTES = 128
_RING_WORDS = _RING_HEADER_BYTES // 8
_R_MAGIC, _R_VERSION, _R_SLOTS, _R_MAX_H, _R_MAX_W, _R_CHANNELS, _R_STRIDE, _R_TOTAL = range(8)
_R_LATEST, _R_CREATOR_PID, _R_RING_ID = 8, 9, 10

# Slot header: word indices (int64).
_SLOT_HEADER_BYTES = 64
_S_WORD, _S_SEQ, _S_TIME, _S_HEIGHT, _S_WIDTH, _S_CHANNELS, _S_DTYPE = range(7)

_ATTACH_INIT_WAIT_S = 1.0  # how long attach waits for a creator that is still writing the header
_tracker_lock = threading.Lock()


class FrameMeta(NamedTuple):
    """What the slot header says about a delivered frame."""

    seq: int
    t_capture_ns: int
    height: int
    width: int


@dataclass
class RingStats:
    """Counters of one FrameRing handle (per process, not shared)."""

    # frames this handle wrote
    written: int = 0
    # frames read() delivered
    read: int = 0
    # requested frame already overwritten (or being overwritten) when read() looked
    dropped: int = 0
    # frame overwritten while read() was copying it (caught by the seqlock)
    torn: int = 0
    # requested seq not written yet (negative, or newer than latest_seq)
    unavailable: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict (for the iwm.stats message)."""
        return asdict(self)


@dataclass(frozen=True)
class _Layout:
    """Sizes of a ring; everything else is derived from these four numbers."""

    slots: int
    max_height: int
    max_width: int
    channels: int

    @property
    def frame_bytes(self) -> int:
        return self.max_height * self.max_width * self.channels

    @property
    def slot_stride(self) -> int:
        return _SLOT_HEADER_BYTES + _round_up(self.frame_bytes, _ALIGN)

    @property
    def total_bytes(self) -> int:
        return _RING_HEADER_BYTES + self.slots * self.slot_stride


def env_ring_names(base: str, envs: int) -> list[str]:
    """The rings of ``envs`` capture streams of one sidecar (``--envs``): ``[base]`` for
    one, else ``base.e0``, ``base.e1``, ... (one ring a game, each with its own capture)."""
    return [base] if envs == 1 else [f"{base}.e{i}" for i in range(envs)]


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _positive_int(value: Any, field: str) -> int:
    """``value`` as an int > 0, or ValueError naming ``field``."""
    if isinstance(value, bool):
        raise ValueError(f"{field} must be an integer, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{field} must be an integer, got {value!r}") from None
    if number <= 0:
        raise ValueError(f"{field} must be > 0, got {number}")
    return number


def _check_name(name: Any) -> str:
    if not isinstance(name, str):
        raise ValueError(f"ring name must be a str, got {type(name).__name__}")
    if "/" in name:
        raise ValueError(f"ring name {name!r} must not contain '/' (it names /dev/shm/<name>)")
    if not 0 < len(name) <= MAX_NAME_LEN:
        raise ValueError(f"ring name must be 1..{MAX_NAME_LEN} characters, got {len(name)}")
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"ring name {name!r} may only hold letters, digits, '_', '.', '-' "
            "and must not start with '.' or '-'"
        )
    return name


def _build_layout(slots: Any, max_height: Any, max_width: Any, channels: Any) -> _Layout:
    layout = _Layout(
        slots=_positive_int(slots, "slots"),
        max_height=_positive_int(max_height, "max_height"),
        max_width=_positive_int(max_width, "max_width"),
        channels=_positive_int(channels, "channels"),
    )
    if layout.slots < 2:
        raise ValueError(f"slots must be >= 2 (one being written, one readable), got {slots}")
    if layout.total_bytes > MAX_RING_BYTES:
        raise ValueError(
            f"ring of {layout.slots} slots x {layout.max_height}x{layout.max_width}"
            f"x{layout.channels} needs {layout.total_bytes} bytes, over the cap of "
            f"{MAX_RING_BYTES} (MAX_RING_BYTES); use fewer slots or a smaller maximum frame"
        )
    return layout


def _check_shm_space(name: str, nbytes: int) -> None:
    """Refuse a ring that /dev/shm cannot hold: tmpfs would SIGBUS the writer later."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return  # no /dev/shm (not Linux): let SharedMemory report what it can
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        raise RingError(
            f"ring {name!r} needs {nbytes} bytes but /dev/shm has only {free} free; "
            "use fewer slots or a smaller maximum frame, or enlarge /dev/shm "
            "(docker: --shm-size)"
        )


@contextmanager
def _untracked() -> Iterator[None]:
    """Keep SharedMemory from registering shared_memory segments with the resource tracker.

    Python < 3.13 registers every attached segment, so the tracker unlinks it (with a
    "leaked shared_memory" warning) when the attaching process exits. Unregistering after
    the fact is not enough: spawned children share their parent's tracker, so a reader's
    unregister would cancel the creator's registration. The patch is held under a lock and
    only skips registrations of type "shared_memory".
    """
    with _tracker_lock:
        original = resource_tracker.register

        def register(name: str, rtype: str) -> None:
            if rtype != "shared_memory":
                original(name, rtype)

        resource_tracker.register = register
        try:
            yield
        finally:
            resource_tracker.register = original


def _open_untracked(name: str) -> SharedMemory:
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, track=False)  # type: ignore[call-arg]
    with _untracked():
        return SharedMemory(name=name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe_existing(name: str) -> str:
    """Best-effort words on what occupies ``name`` (for the StaleRingError message)."""
    try:
        shm = _open_untracked(name)
    except (OSError, ValueError):
        return ""
    try:
        if shm.size < _RING_HEADER_BYTES:
            return f" (a {shm.size}-byte segment, not a FrameRing)"
        words = struct.unpack_from(f"={_RING_WORDS}q", shm.buf, 0)
    finally:
        shm.close()
    if words[_R_MAGIC] != MAGIC:
        return " (not a FrameRing)"
    pid = words[_R_CREATOR_PID]
    state = "still running" if _pid_alive(pid) else "no longer running"
    return f" (a FrameRing v{words[_R_VERSION]} created by pid {pid}, which is {state})"


def reclaim_dead(prefix: str = "iwm_", shm_dir: str = "/dev/shm", idle_s: float = 0.2,
                 blank_s: float = 10.0) -> list[tuple[str, int, int]]:
    """Unlink the FrameRings named ``prefix...`` whose creator is dead; returns
    ``(name, creator pid, bytes)`` of each one removed (pid 0: a blank segment).

    A sidecar killed with SIGKILL cannot unlink its ring, and /dev/shm keeps it (RAM) until
    reboot. A segment counts as dead only when it is a FrameRing whose creator pid is gone,
    for the launcher's names ``<prefix><pid>_<hex>`` that pid is gone too (its capture may
    outlive a killed launcher for a moment), and no frame is written to it for ``idle_s``
    (a container sharing /dev/shm sees the ring but not its writer's pid). A segment still
    blank (a capture killed between creating it and writing its header: no creator pid to
    check) counts as dead when the launcher pid in its name is gone and it is older than
    ``blank_s``. Anything else is left alone.
    """
    out = []
    try:
        names = sorted(n for n in os.listdir(shm_dir) if n.startswith(prefix))
    except FileNotFoundError:
        return out
    for name in names:
        path = os.path.join(shm_dir, name)
        try:
            with open(path, "rb") as f:
                head = f.read(_RING_HEADER_BYTES)
            size = os.path.getsize(path)
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if len(head) < _RING_HEADER_BYTES:
            continue
        words = struct.unpack_from(f"={_RING_WORDS}q", head, 0)
        owner = name[len(prefix):].split("_", 1)[0]
        owner_gone = owner.isdigit() and not _pid_alive(int(owner))
        if not any(head) and owner_gone and time.time() - os.path.getmtime(path) > blank_s:
            if FrameRing.unlink_stale(name):
                out.append((name, 0, size))
            continue
        if words[_R_MAGIC] != MAGIC or _pid_alive(words[_R_CREATOR_PID]):
            continue
        if owner.isdigit() and not owner_gone:
            continue
        time.sleep(idle_s)
        try:
            with open(path, "rb") as f:
                again = struct.unpack_from(f"={_RING_WORDS}q", f.read(_RING_HEADER_BYTES), 0)
        except (OSError, struct.error):
            continue
        if again[_R_LATEST] != words[_R_LATEST]:
            continue  # frames are still being written: a writer we cannot see
        if FrameRing.unlink_stale(name):
            out.append((name, int(words[_R_CREATOR_PID]), size))
    return out


def _stale_message(name: str) -> str:
    return (
        f"a shared-memory segment named {name!r} already exists (/dev/shm/{name})"
        f"{_describe_existing(name)}; it is probably left over from a crashed capture or "
        f"sidecar. It is never reused. If no process uses it, remove it with "
        f"FrameRing.unlink_stale({name!r}) or `rm /dev/shm/{name}`, or pick another name."
    )


def _read_layout(shm: SharedMemory, name: str) -> _Layout:
    """Parse and validate the ring header of an attached segment."""
    if shm.size < _RING_HEADER_BYTES:
        raise RingError(f"segment {name!r} is {shm.size} bytes, too small for a FrameRing")
    deadline = time.monotonic() + _ATTACH_INIT_WAIT_S
    words = struct.unpack_from(f"={_RING_WORDS}q", shm.buf, 0)
    while words[_R_MAGIC] == 0 and time.monotonic() < deadline:
        time.sleep(0.005)  # the creator writes the magic last; give it a moment
        words = struct.unpack_from(f"={_RING_WORDS}q", shm.buf, 0)
    if words[_R_MAGIC] != MAGIC:
        what = "blank (creator still starting or crashed?)" if words[_R_MAGIC] == 0 else "bad"
        raise RingError(
            f"segment {name!r} is not a FrameRing: magic {words[_R_MAGIC]:#x} is {what}"
        )
    if words[_R_VERSION] != LAYOUT_VERSION:
        raise RingError(
            f"ring {name!r} has layout version {words[_R_VERSION]}, this code reads "
            f"{LAYOUT_VERSION}; run capture and workers from the same iwm-bus version"
        )
    try:
        layout = _build_layout(*(words[i] for i in (_R_SLOTS, _R_MAX_H, _R_MAX_W, _R_CHANNELS)))
    except ValueError as e:
        raise RingError(f"ring {name!r} has a corrupt header: {e}") from None
    if (words[_R_STRIDE], words[_R_TOTAL]) != (layout.slot_stride, layout.total_bytes):
        raise RingError(
            f"ring {name!r} header says slot stride {words[_R_STRIDE]} / total "
            f"{words[_R_TOTAL]} bytes, expected {layout.slot_stride} / {layout.total_bytes}"
        )
    if shm.size < layout.total_bytes:
        raise RingError(
            f"ring {name!r} segment is {shm.size} bytes, its header needs {layout.total_bytes}"
        )
    return layout


class FrameRing:
    """A ring of fixed-size frame slots in shared memory (see the module docstring).

    Build one with :meth:`create` (the capture process, which owns and unlinks the
    segment) or :meth:`attach` (readers). Exactly one handle across all processes may
    write. Handles are not thread-safe and cannot be pickled; pass the name instead.
    """

    def __init__(self, shm: SharedMemory, layout: _Layout, *, owner: bool) -> None:
        """Map the views; use :meth:`create` or :meth:`attach` rather than this."""
        self._shm = shm
        self._name = shm.name.lstrip("/")
        self._layout = layout
        self._slots = layout.slots
        self._channels = layout.channels
        self._owner = owner
        self._unlinked = False
        self._closed = False
        self._stats = RingStats()
        # why the last read that returned None did: "unavailable", "dropped" or "torn"
        self.last_miss: str | None = None
        self._map_views()
        self._ring_id = int(self._ring_hdr[_R_RING_ID])

    def _map_views(self) -> None:
        lay, buf = self._layout, self._shm.buf
        self._ring_hdr = np.ndarray((_RING_WORDS,), np.int64, buffer=buf)
        slot_data = np.ndarray(  # (slots, frame_bytes) uint8, one row per slot
            (lay.slots, lay.frame_bytes),
            np.uint8,
            buffer=buf,
            offset=_RING_HEADER_BYTES + _SLOT_HEADER_BYTES,
            strides=(lay.slot_stride, 1),
        )
        self._slot_rows = list(slot_data)  # each slot's pixels, flat
        # The segment as int64 words: loading or storing a header word takes or gives a
        # Python int (an aligned 8-byte load or store, as numpy's), no numpy scalar.
        self._words = buf[: lay.total_bytes].cast("q")
        # index in _words of each slot's sequence word (its header follows)
        self._slot_word = [(_RING_HEADER_BYTES + i * lay.slot_stride) // 8 for i in range(lay.slots)]

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls, name: str, slots: int, max_height: int, max_width: int, channels: int = 3
    ) -> FrameRing:
        """Create a new ring segment ``/dev/shm/<name>`` (mode 0600) and own it.

        Raises ValueError for bad arguments, StaleRingError if the name is taken (a
        crashed creator's leftover is never silently reused) and RingError otherwise.
        """
        _check_name(name)
        layout = _build_layout(slots, max_height, max_width, channels)
        _check_shm_space(name, layout.total_bytes)
        try:
            shm = SharedMemory(name=name, create=True, size=layout.total_bytes)
        except FileExistsError as e:
            raise StaleRingError(_stale_message(name)) from e
        except OSError as e:
            raise RingError(f"cannot create shared-memory segment {name!r}: {e}") from e
        ring = cls(shm, layout, owner=True)
        ring._init_header()
        ring._ring_id = int(ring._ring_hdr[_R_RING_ID])
        return ring

    def _init_header(self) -> None:
        lay, hdr = self._layout, self._ring_hdr
        hdr[_R_VERSION] = LAYOUT_VERSION
        hdr[_R_SLOTS], hdr[_R_MAX_H], hdr[_R_MAX_W] = lay.slots, lay.max_height, lay.max_width
        hdr[_R_CHANNELS], hdr[_R_STRIDE], hdr[_R_TOTAL] = (
            lay.channels,
            lay.slot_stride,
            lay.total_bytes,
        )
        hdr[_R_LATEST] = -1
        hdr[_R_CREATOR_PID] = os.getpid()
        hdr[_R_RING_ID] = 1 + secrets.randbelow((1 << 63) - 1)  # never 0
        hdr[_R_MAGIC] = MAGIC  # last: attach treats a zero magic as "still being created"

    @classmethod
    def attach(cls, name: str) -> FrameRing:
        """Attach to an existing ring as a reader; never unlinks it, never warns on exit."""
        _check_name(name)
        try:
            shm = _open_untracked(name)
        except FileNotFoundError:
            raise RingError(
                f"no ring named {name!r} (/dev/shm/{name} does not exist); is the capture running?"
            ) from None
        except ValueError as e:  # mmap of an empty segment
            raise RingError(f"segment {name!r} is empty, not a FrameRing: {e}") from None
        except OSError as e:
            raise RingError(f"cannot attach to ring {name!r}: {e}") from e
        try:
            layout = _read_layout(shm, name)
        except BaseException:
            shm.close()
            raise
        return cls(shm, layout, owner=False)

    @classmethod
    def unlink_stale(cls, name: str) -> bool:
        """Remove a leftover segment called ``name``; True if there was one.

        Only for segments whose creator is gone: readers still attached keep their
        mapping, but a new ring with the same name will be a different segment.
        """
        _check_name(name)
        try:
            shm = SharedMemory(name=name)  # tracked, so that unlink() below stays balanced
        except FileNotFoundError:
            return False
        except ValueError:  # empty segment: mmap refuses it, remove the file directly
            os.unlink(f"/dev/shm/{name}")
            return True
        shm.close()
        try:
            shm.unlink()
        except FileNotFoundError:  # removed by someone else meanwhile
            resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        return True

    # ------------------------------------------------------------------ properties

    @property
    def name(self) -> str:
        return self._name

    @property
    def slots(self) -> int:
        return self._layout.slots

    @property
    def max_height(self) -> int:
        return self._layout.max_height

    @property
    def max_width(self) -> int:
        return self._layout.max_width

    @property
    def channels(self) -> int:
        return self._layout.channels

    @property
    def ring_id(self) -> int:
        """The random id ``create`` gave this ring (> 0); frame notices carry it."""
        return self._ring_id

    @property
    def slot_bytes(self) -> int:
        """Pixel bytes one slot can hold (max_height * max_width * channels)."""
        return self._layout.frame_bytes

    @property
    def owner(self) -> bool:
        """True for the creator's handle (the one that may unlink)."""
        return self._owner

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def latest_seq(self) -> int:
        """Seq of the newest complete frame, -1 while the ring is empty."""
        self._check_open()
        return self._words[_R_LATEST]

    @property
    def stats(self) -> RingStats:
        """A snapshot of this handle's counters."""
        return replace(self._stats)

    def slot_of(self, seq: int) -> int:
        """Index of the slot that frame ``seq`` is (or was, or will be) written to."""
        seq = operator.index(seq)
        if seq < 0:
            raise ValueError(f"seq must be >= 0, got {seq}")
        return seq % self._slots

    # ------------------------------------------------------------------ write / read

    def write(self, frame: np.ndarray, t_capture_ns: int | None = None) -> int:
        """Copy ``frame`` (H, W, C uint8, any strides) into the next slot; return its seq.

        ``t_capture_ns`` defaults to :func:`clock_ns` (wall clock, as on the bus). Never waits for
        readers: the oldest slot is overwritten.
        """
        self._check_open()
        height, width = self._check_frame(frame)
        t_ns = clock_ns() if t_capture_ns is None else operator.index(t_capture_ns)
        if not _INT64_MIN <= t_ns <= _INT64_MAX:  # checked before the slot is touched
            raise ValueError(f"t_capture_ns {t_ns} does not fit in int64")
        words = self._words
        seq = words[_R_LATEST] + 1
        slot = seq % self._slots
        at = self._slot_word[slot]
        channels = self._channels
        words[at + _S_WORD] = 2 * seq + 1  # odd: slot is being written
        words[at + _S_SEQ] = seq
        words[at + _S_TIME] = t_ns
        words[at + _S_HEIGHT] = height
        words[at + _S_WIDTH] = width
        words[at + _S_CHANNELS] = channels
        words[at + _S_DTYPE] = _DTYPE_UINT8
        pixels = self._slot_rows[slot][: height * width * channels]
        np.copyto(pixels.reshape(height, width, channels), frame)
        words[at + _S_WORD] = 2 * seq + 2  # even: frame seq is complete
        words[_R_LATEST] = seq  # publish after the slot is stable
        self._stats.written += 1
        return seq

    def _check_frame(self, frame: Any) -> tuple[int, int]:
        if not isinstance(frame, np.ndarray):
            raise TypeError(f"frame must be a numpy array, got {type(frame).__name__}")
        if frame.dtype != np.uint8:
            raise ValueError(f"frame dtype must be uint8, got {frame.dtype}")
        if frame.ndim != 3:
            hint = " (add a channel axis: frame[..., None])" if frame.ndim == 2 else ""
            raise ValueError(
                f"frame must have shape (height, width, channels), got ndim {frame.ndim} "
                f"shape {frame.shape}{hint}"
            )
        height, width, channels = frame.shape
        if channels != self._channels:
            raise ValueError(
                f"frame has {channels} channels, ring {self._name!r} holds {self._channels}"
            )
        if height == 0 or width == 0:
            raise ValueError(f"frame is empty: shape {frame.shape}")
        if height > self._layout.max_height or width > self._layout.max_width:
            raise ValueError(
                f"frame {height}x{width} is larger than ring {self._name!r}'s maximum "
                f"{self._layout.max_height}x{self._layout.max_width} (height x width)"
            )
        return height, width

    @overload
    def read(
        self, seq: int, out: np.ndarray | None = None, with_meta: Literal[False] = False
    ) -> np.ndarray | None: ...

    @overload
    def read(
        self, seq: int, out: np.ndarray | None = None, *, with_meta: Literal[True]
    ) -> tuple[np.ndarray, FrameMeta] | None: ...

    def read(
        self, seq: int, out: np.ndarray | None = None, with_meta: bool = False
    ) -> np.ndarray | tuple[np.ndarray, FrameMeta] | None:
        """Copy frame ``seq`` out of the ring, or return None (and count why).

        ``out``: optional C-contiguous uint8 array with at least H*W*C elements; the frame
        is copied into its start and a (H, W, C) view of it is returned (no allocation).
        ``with_meta``: return ``(frame, FrameMeta)`` instead of the frame.
        None means the frame is not written yet (``unavailable``), already overwritten
        (``dropped``) or was overwritten while being copied (``torn``); :attr:`last_miss`
        says which.
        """
        if self._closed:
            self._check_open()
        seq = operator.index(seq)
        if out is not None:
            self._check_out(out)
        words = self._words
        latest = words[_R_LATEST]
        if seq < 0 or seq > latest:
            return self._miss("unavailable")
        if seq <= latest - self._slots:
            return self._miss("dropped")
        slot = seq % self._slots
        at = self._slot_word[slot]
        word = words[at + _S_WORD]  # the seqlock: loaded before the copy ...
        if word != 2 * seq + 2:  # overwritten; else (not possible with one live writer) a
            # restarted writer re-publishing
            return self._miss("dropped" if word > 2 * seq + 2 else "unavailable")
        height, width = words[at + _S_HEIGHT], words[at + _S_WIDTH]
        t_ns = words[at + _S_TIME]
        dst = self._destination(slot, word, height, width, out)
        if dst is None:
            return None
        frame, flat = dst
        np.copyto(flat, self._slot_rows[slot][: flat.size])
        if words[at + _S_WORD] != word:  # ... and after it: overwritten while we copied
            return self._miss("torn")
        self._stats.read += 1
        return (frame, FrameMeta(seq, t_ns, height, width)) if with_meta else frame

    def _miss(self, why: str) -> None:
        """Count a read that delivers nothing, and remember why (:attr:`last_miss`)."""
        setattr(self._stats, why, getattr(self._stats, why) + 1)
        self.last_miss = why

    def _check_out(self, out: Any) -> None:
        if not isinstance(out, np.ndarray) or out.dtype != np.uint8:
            raise ValueError(f"out must be a uint8 numpy array, got {_describe(out)}")
        flags = out.flags
        if not flags.c_contiguous or not flags.writeable:
            raise ValueError("out must be C-contiguous and writeable")

    def _destination(
        self, slot: int, word: int, height: int, width: int, out: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The (H, W, C) array to copy into and a flat view of it; None (counted torn) if
        the header was torn."""
        lay = self._layout
        nbytes = height * width * self._channels
        header_ok = 0 < height <= lay.max_height and 0 < width <= lay.max_width
        room = nbytes if out is None else out.size
        if not header_ok or room < nbytes:
            if self._words[self._slot_word[slot] + _S_WORD] != word:  # header changed under us
                return self._miss("torn")
            if not header_ok:
                raise RingError(f"ring {self._name!r} slot {slot} header says {height}x{width}")
            raise ValueError(
                f"out has {room} elements, frame needs {nbytes} ({height}x{width}x{self._channels})"
            )
        if out is None:
            frame = np.empty((height, width, self._channels), np.uint8)
            return frame, frame.reshape(-1)
        flat = (out if out.ndim == 1 else out.reshape(-1))[:nbytes]
        return flat.reshape(height, width, self._channels), flat

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Unmap the segment in this process (idempotent). Does not unlink it."""
        if self._closed:
            return
        # Drop every view first: the mapping cannot close while one is alive.
        self._ring_hdr = np.empty((0,), np.int64)
        self._slot_rows = []
        self._words.release()
        self._closed = True
        try:
            self._shm.close()
        except BufferError as e:
            raise RingError(
                f"ring {self._name!r}: views into the segment are still referenced "
                "(a stored traceback?); the mapping is released when they are"
            ) from e

    def unlink(self) -> None:
        """Remove the segment's name (creator only, idempotent); mappings stay valid."""
        if not self._owner:
            raise RingError(
                f"ring {self._name!r}: only the creator may unlink it; readers call close()"
            )
        if self._unlinked:
            return
        self._unlinked = True
        try:
            self._shm.unlink()
        except FileNotFoundError:  # removed behind our back; still balance the tracker
            resource_tracker.unregister(self._shm._name, "shared_memory")  # type: ignore[attr-defined]

    def _check_open(self) -> None:
        if self._closed:
            raise RingError(f"ring {self._name!r} is closed")

    def __enter__(self) -> FrameRing:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._owner:
                self.unlink()
        finally:
            self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown / live views: nothing useful to do here
            pass

    def __getstate__(self) -> None:
        raise TypeError(
            "a FrameRing cannot be pickled; pass its name and call FrameRing.attach(name)"
        )

    def __repr__(self) -> str:
        lay = self._layout
        role = "owner" if self._owner else "reader"
        state = "closed" if self._closed else f"latest={self.latest_seq}"
        return (
            f"FrameRing({self._name!r}, {role}, slots={lay.slots}, "
            f"max={lay.max_height}x{lay.max_width}x{lay.channels}, {state})"
        )


def _describe(obj: Any) -> str:
    if isinstance(obj, np.ndarray):
        return f"array of dtype {obj.dtype}"
    return type(obj).__name__
