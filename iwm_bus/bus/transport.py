"""ZeroMQ helpers: endpoints, a non-blocking publisher and a gap-counting subscriber.

Every process that produces messages binds its own PUB socket; consumers connect one SUB
socket to the endpoints they need (``Endpoints``). A PUB socket never blocks: when a slow
subscriber's queue is full ZeroMQ drops the message for that subscriber only, so the drop is
counted where it can be seen, at the subscriber, from the gap in ``seq``.

    with Publisher(eps.worker) as pub:
        pub.send(topics.SURPRISE, {...})
    with Subscriber([eps.worker], [topics.SURPRISE]) as sub:
        got = sub.recv(timeout_ms=1000)   # (topic, msg) or None
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from loguru import logger

from iwm_bus.bus import wire
from iwm_bus.errors import UnknownMessage, WireError, WireVersionError
from iwm_bus.logs import worth_logging

#: longest ipc path the kernel accepts (sun_path is 108 bytes with the terminating NUL)
MAX_IPC_PATH = 107
DEFAULT_HWM = 1000
#: payloads at least this long are sent zero-copy (ZeroMQ keeps a reference, not a copy)
_COPY_BELOW = 65536
_NOBLOCK_MORE = zmq.NOBLOCK | zmq.SNDMORE


@dataclass(frozen=True)
class Endpoints:
    """Where each socket of one sidecar lives.

    capture: PUB of the capture process (``iwm.frame``; a replay source also sends
    ``agent.action`` here); worker: PUB of the encoder worker (``iwm.latent/surprise/mrr/
    stats``); rpc: ROUTER of the worker; agent: PUB the agent binds for ``agent.action``.
    """

    capture: str
    worker: str
    rpc: str
    agent: str

    @classmethod
    def ipc(cls, run_dir: str | os.PathLike[str]) -> Endpoints:
        """ipc:// endpoints inside ``run_dir`` (one machine)."""
        base = Path(run_dir).resolve()
        eps = {name: f"ipc://{base / (name + '.sock')}" for name in ("capture", "worker",
                                                                       "rpc", "agent")}
        for name, ep in eps.items():
            if len(ep) - len("ipc://") > MAX_IPC_PATH:
                raise ValueError(f"run dir {str(base)!r} is too long for an ipc socket path "
                                 f"({name}.sock would exceed {MAX_IPC_PATH} bytes); use a "
                                 "shorter --run-dir")
        return cls(**eps)

    @classmethod
    def tcp(cls, host: str = "127.0.0.1", base_port: int = 5560) -> Endpoints:
        """tcp:// endpoints on four consecutive ports starting at ``base_port``."""
        if not 1 <= base_port <= 65532:
            raise ValueError(f"base_port must be in 1..65532, got {base_port}")
        ports = range(base_port, base_port + 4)
        return cls(*(f"tcp://{host}:{p}" for p in ports))

    @classmethod
    def parse(cls, spec: str | os.PathLike[str]) -> Endpoints:
        """``tcp://HOST:PORT`` (base port) or a run directory path."""
        text = os.fspath(spec)
        if text.startswith("tcp://"):
            host, _, port = text[len("tcp://"):].rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"endpoint spec {text!r} must look like tcp://HOST:PORT")
            return cls.tcp(host, int(port))
        return cls.ipc(text)

    def socket_files(self) -> list[Path]:
        """The ipc socket files these endpoints create (empty for tcp)."""
        return [Path(ep[len("ipc://"):]) for ep in (self.capture, self.worker, self.rpc,
                                                    self.agent) if ep.startswith("ipc://")]

    def env_captures(self, envs: int) -> list[str]:
        """The capture PUB endpoint of each of ``envs`` capture streams (``--envs``):
        ``capture`` for stream 0, ``capture.eI.sock`` beside it for stream I (ipc only: tcp
        has its four ports). A multi-stream worker connects to all of them."""
        if envs == 1:
            return [self.capture]
        if not self.capture.startswith("ipc://") or not self.capture.endswith(".sock"):
            raise ValueError(f"several capture streams need ipc endpoints (a run dir), not "
                             f"{self.capture}")
        stem = self.capture[: -len(".sock")]
        return [self.capture, *(f"{stem}.e{i}.sock" for i in range(1, envs))]


def new_socket(ctx: zmq.Context | None, kind: int, hwm: int = DEFAULT_HWM,
               secure: Callable[[zmq.Socket], None] | None = None) -> zmq.Socket:
    """A socket of ``kind`` with the bus's options: no linger, both HWMs, CURVE keys when
    ``secure`` is given (set before any bind or connect)."""
    sock = (ctx or zmq.Context.instance()).socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    if secure is not None:  # CURVE keys (iwm_bus.bus.security), set before bind / connect
        secure(sock)
    return sock


def pub_socket(ctx: zmq.Context | None, endpoint: str, *, connect: bool = False,
               hwm: int = DEFAULT_HWM, secure: Callable[[zmq.Socket], None] | None = None
               ) -> tuple[zmq.Socket, int | None]:
    """A PUB socket (of ``ctx``: sync or ``zmq.asyncio``) bound to (or connected to)
    ``endpoint``, and the inode of the ipc file it bound (for :func:`unbind_file`)."""
    sock = new_socket(ctx, zmq.PUB, hwm, secure)
    try:
        if connect:
            sock.connect(endpoint)
            return sock, None
        return sock, bind(sock, endpoint)
    except BaseException:
        sock.close(linger=0)
        raise


def sub_socket(ctx: zmq.Context | None, endpoints: Iterable[str], topics: Iterable[str], *,
               hwm: int = DEFAULT_HWM, secure: Callable[[zmq.Socket], None] | None = None,
               reconnect_max_ms: int = 0) -> zmq.Socket:
    """A SUB socket (of ``ctx``: sync or ``zmq.asyncio``) subscribed to ``topics`` (prefixes)
    and connected to each endpoint once. It retries a publisher that is not there (yet)
    every 20 ms, so it is connected within 20 ms of the bind (a capture's first notices are
    not missed); ``reconnect_max_ms`` > 20 backs off up to that instead (a long-lived agent
    that need not poll a stopped worker 50 times a second)."""
    sock = new_socket(ctx, zmq.SUB, hwm, secure)
    sock.setsockopt(zmq.RECONNECT_IVL, 20)
    if reconnect_max_ms:
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, reconnect_max_ms)
    for topic in topics:
        sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
    for ep in dict.fromkeys(endpoints):
        sock.connect(ep)
    return sock


def bind(sock: zmq.Socket, endpoint: str) -> int | None:
    """Bind, making an ipc socket file owner-only (0600); returns that file's inode.

    An ipc file left by a dead process is replaced; one that a live process listens on is
    not stolen (libzmq would silently take it over): ``OSError`` says who to stop.
    """
    path = endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else None
    if path is not None:
        _claim_ipc_path(path)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as e:
        raise OSError(f"cannot bind {endpoint}: {e} (is another sidecar using it?)") from e
    if path is None:
        return None
    os.chmod(path, 0o600)
    return os.stat(path).st_ino


def _claim_ipc_path(path: str) -> None:
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        Path(path).unlink(missing_ok=True)  # stale: nobody listens any more
        return
    except OSError as e:
        raise OSError(f"{path} exists and cannot be checked ({e}); remove it if it is stale"
                      ) from e
    finally:
        probe.close()
    raise OSError(f"{path} is in use by a running process; stop it or use another run dir")


def unbind_file(endpoint: str, inode: int | None) -> None:
    """Remove the ipc file ``bind`` created (libzmq leaves it), unless another process has
    bound the path since (different inode)."""
    if inode is None or not endpoint.startswith("ipc://"):
        return
    path = endpoint[len("ipc://"):]
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass


class Publisher:
    """A PUB socket that never blocks; ``send`` returns False (and counts) when it could not."""

    def __init__(self, endpoint: str, *, connect: bool = False, hwm: int = DEFAULT_HWM,
                 ctx: zmq.Context | None = None,
                 secure: Callable[[zmq.Socket], None] | None = None) -> None:
        self.endpoint = endpoint
        self.sock, self._inode = pub_socket(ctx, endpoint, connect=connect, hwm=hwm,
                                            secure=secure)
        self.sent = 0
        self.dropped = 0

    def send(self, topic: str, msg: Mapping[str, Any]) -> bool:
        """Validate, encode and publish ``msg`` without blocking."""
        return self.send_frames(wire.pack(topic, msg))

    def send_frames(self, frames: list[bytes]) -> bool:
        """Publish already packed frames without blocking (large payloads without a copy)."""
        sock, copy = self.sock, len(frames[-1]) < _COPY_BELOW
        try:  # send_multipart's work without its per-part Python type checks
            for part in frames[:-1]:
                sock.send(part, _NOBLOCK_MORE, copy=copy)  # Again, if at all, on the first part
            sock.send(frames[-1], zmq.NOBLOCK, copy=copy)
        except zmq.Again:
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def close(self, linger_ms: int = 0) -> None:
        """Close (``linger_ms``: time to deliver what is still queued) and remove the ipc
        file it bound."""
        self.sock.close(linger=linger_ms)
        unbind_file(self.endpoint, self._inode)
        self._inode = None

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Publisher({self.endpoint!r}, sent={self.sent}, dropped={self.dropped})"


class Subscriber:
    """A SUB socket connected to several endpoints that decodes, validates and counts.

    Malformed messages are counted in ``decode_errors`` and skipped (logged, rate-limited);
    missing ``seq`` numbers per topic are counted in ``gaps``. An endpoint named twice is
    connected once (a remote worker takes frames and actions from one gateway port).
    A newer publisher's messages follow the compatibility rule (docs/wire.md): fields this
    side does not know are left out, kinds it does not know are skipped (both counted in
    ``unknown``), and a publisher of another major version is refused (``other_major``,
    logged in one line naming both versions).
    """

    # whether parts are received as bytes (copied out of ZeroMQ) or as zmq.Frame views
    copy_parts = True

    def __init__(self, endpoints: Iterable[str], topics: Iterable[str], *,
                 hwm: int = DEFAULT_HWM, ctx: zmq.Context | None = None,
                 secure: Callable[[zmq.Socket], None] | None = None) -> None:
        self.endpoints = list(dict.fromkeys(endpoints))
        self.sock = sub_socket(ctx, self.endpoints, topics, hwm=hwm, secure=secure)
        self.received = 0
        self.decode_errors = 0
        self.gaps = 0
        self.unknown = wire.Unknowns()
        self.other_major = 0
        self._last_seq: dict[tuple[str, str], int] = {}

    def recv(self, timeout_ms: int = 1000) -> tuple[str, dict[str, Any]] | None:
        """The next valid message, or None when none arrived within ``timeout_ms``."""
        deadline = time.monotonic() + timeout_ms / 1000
        wait = timeout_ms
        while self.sock.poll(wait, zmq.POLLIN):
            got = self.decode(self.sock.recv_multipart(zmq.NOBLOCK, copy=self.copy_parts))
            if got is not None:
                return got
            wait = max(0, int((deadline - time.monotonic()) * 1000))
        return None

    def drain(self, handle: Callable[[str, dict[str, Any]], Any], budget: int = 1000) -> int:
        """Pass every valid message already queued, up to ``budget``, to ``handle(topic,
        msg)`` without waiting (malformed ones are counted); the number taken."""
        for n in range(budget):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=self.copy_parts)
            except zmq.Again:
                return n
            got = self.decode(frames)
            if got is not None:
                handle(*got)
        return budget

    def decode(self, frames: list[bytes]) -> tuple[str, dict[str, Any]] | None:
        """Decode raw frames (e.g. from an asyncio socket); None (counted) when malformed."""
        try:
            topic, msg = wire.unpack(frames, unknown=self.unknown)
        except UnknownMessage:
            return None  # a newer publisher's kind: counted in unknown
        except WireVersionError as e:
            self.other_major += 1
            if self.other_major % 1000 == 1:  # one line, not one a message
                logger.error("{}: {} (#{})", self.endpoints, e, self.other_major)
            return None
        except WireError as e:
            self.decode_errors += 1
            if worth_logging(self.decode_errors):
                logger.warning("dropped malformed message #{}: {}", self.decode_errors, e)
            return None
        self.received += 1
        self._count_gap(topic, msg)
        return topic, msg

    def _count_gap(self, topic: str, msg: dict[str, Any]) -> None:
        seq = msg.get("seq")
        if not isinstance(seq, int):
            return
        key = (topic, msg.get("source") or msg.get("variant") or "")
        last = self._last_seq.get(key)
        if last is not None and seq > last + 1:
            self.gaps += seq - last - 1
        if last is None or seq > last:
            self._last_seq[key] = seq

    def close(self) -> None:
        self.sock.close(linger=0)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Subscriber({self.endpoints!r}, received={self.received}, "
                f"gaps={self.gaps}, decode_errors={self.decode_errors})")
