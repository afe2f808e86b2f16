"""The gateway: the game machine's door for workers on other machines (tcp, CURVE).

A worker on another machine cannot attach the shared-memory ring. In its place the game
machine runs this process (``iwm-launch --remote-worker [HOST:]PORT``); it binds the three
ports of :class:`iwm_bus.bus.link.Link` and makes a remote worker look local to everyone else:

* **frames out**: for each local ``iwm.frame`` notice it reads the frame from the ring and
  publishes the notice again with its pixels (plus frames whose notice it missed): the
  pixels as a message part of their own, sent without a copy, raw or compressed by the
  link's codec (:mod:`iwm_bus.bus.link_frames`, ``--link-codec``); a notice a lossless
  capture sends again for a new worker goes out again with its frame. The notices carry
  the actions, so nothing else goes out.
* **results in**: an XSUB that remote workers' PUB sockets connect to, proxied to an XPUB
  bound on the local worker endpoint, so the bridge, the capture's lossless credits, the
  recorder and the viewer subscribe exactly as to a local worker (several workers' results
  merge there; subscriptions travel upstream).
* **rpc**: a ROUTER on the local rpc endpoint, proxied to a DEALER that remote workers'
  DEALER sockets connect to; requests are shared among the connected workers.

With a key folder every tcp socket is a CURVE server and only workers whose public key is in
``authorized/`` get through (:class:`iwm_bus.bus.security.Gatekeeper` logs and counts refusals).
``iwm.stats`` (source ``gateway``) goes out on the local worker endpoint once a second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import zmq
from loguru import logger

from iwm_bus.bus import topics, wire
from iwm_bus.bus.link import Link
from iwm_bus.bus.link_frames import FrameEncoder, send_parts
from iwm_bus.bus.ring import clock_ns
from iwm_bus.bus.security import Gatekeeper, ServerKeys, check_bind
from iwm_bus.bus.transport import DEFAULT_HWM, Endpoints, Subscriber, bind, new_socket, unbind_file
from iwm_bus.errors import WireError
from workers.entry import StopFlag, stop_on_signals
from workers.inflight import RESULT_TOPICS, InFlight
from workers.ring_reader import FIRST, OLDER, RESTART, RingReader

__all__ = ["Gateway", "run_gateway"]

#: inline frames queued per remote worker before the newest are dropped (a slow link must not
#: build seconds of latency; lossless pacing keeps fewer than the ring's slots in flight)
FRAMES_HWM = 32
POLL_MS = 50
STATS_INTERVAL_S = 1.0
DRAIN_BUDGET = 256


@dataclass
class GatewayStats:
    frames: int = 0  # frames sent
    # of them, sent again: the unanswered ones to a worker that (re)subscribed, and those a
    # lossless capture re-sends the notice of for a worker that took over
    resent: int = 0
    already_answered: int = 0  # re-sent notices of frames every stream answered: not sent
    missed: int = 0  # frames gone from the ring before they could be read
    frames_dropped: int = 0  # not sent: the remote queue was full
    results: int = 0
    rpc_requests: int = 0
    rpc_replies: int = 0


class Gateway:
    """Sockets and forwarding of one gateway; binds on construction, runs in :meth:`serve`."""

    def __init__(self, link: Link, endpoints: Endpoints, ring_name: str) -> None:
        check_bind(link.host, link.keys is not None, link.insecure)
        self.link, self.endpoints = link, endpoints
        self.keys = ServerKeys.load(link.keys) if link.keys is not None else None
        self.stats = GatewayStats()
        self.encoder = FrameEncoder(link.codec)
        self.inflight = InFlight()  # exactly-once across a worker's restart
        # encoder totals at the last stats tick: the tick's bandwidth and encode time
        self._last_tick = (time.monotonic(), 0, 0, 0, 0)
        # each read returns a fresh array, which ZeroMQ then sends from without a copy
        self.reader = RingReader(ring_name, "gateway")
        self._ctx = zmq.Context()
        self._gate: Gatekeeper | None = None
        self._inodes: list[tuple[str, int | None]] = []
        self._socks: list[zmq.Socket] = []
        try:
            if self.keys is not None:
                self._gate = Gatekeeper(self._ctx, self.keys)
            # an XPUB: each worker's subscription arrives here (verbose: every one, not only
            # a topic's first), and a worker that subscribes gets the unanswered frames
            self.frames_out = self._remote(zmq.XPUB, link.frames, FRAMES_HWM)
            self.results_in = self._remote(zmq.XSUB, link.results)
            self.rpc_back = self._remote(zmq.DEALER, link.rpc)
            self.results_out = self._local(zmq.XPUB, endpoints.worker)
            self.rpc_front = self._local(zmq.ROUTER, endpoints.rpc)
            self.local = Subscriber([endpoints.capture], [topics.FRAME], ctx=self._ctx)
        except BaseException:
            self.close()
            raise
        self._poller = zmq.Poller()
        for sock in (self.local.sock, self.frames_out, self.results_in, self.results_out,
                     self.rpc_front, self.rpc_back):
            self._poller.register(sock, zmq.POLLIN)
        self._next_stats = 0.0
        logger.info("gateway: remote workers connect to {} (frames {}, results {}, rpc {}), "
                    "frames as {}{}", link, link.frames, link.results, link.rpc, link.codec,
                    "" if self.keys else " WITHOUT CURVE (no --keys)")

    def _remote(self, kind: int, endpoint: str, hwm: int = DEFAULT_HWM) -> zmq.Socket:
        sock = new_socket(self._ctx, kind, hwm, self.keys.secure if self.keys else None)
        self._socks.append(sock)
        if kind == zmq.XPUB:
            sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as e:
            raise OSError(f"gateway cannot bind {endpoint}: {e}") from e
        return sock

    def _local(self, kind: int, endpoint: str) -> zmq.Socket:
        sock = new_socket(self._ctx, kind)
        self._socks.append(sock)
        self._inodes.append((endpoint, bind(sock, endpoint)))
        return sock

    # ------------------------------------------------------------ loop

    def serve(self, stop: StopFlag | Any) -> None:
        while not stop:
            events = dict(self._poller.poll(POLL_MS))
            if self.local.sock in events:
                self.local.drain(self._on_local, DRAIN_BUDGET)
            if self.frames_out in events:  # a worker subscribed
                self._on_subscriptions()
            if self.results_in in events:  # worker results -> local subscribers
                self.stats.results += self._pass_results()
            if self.results_out in events:  # local subscriptions -> workers
                self._pass(self.results_out, self.results_in)
            if self.rpc_front in events:
                self.stats.rpc_requests += self._pass(self.rpc_front, self.rpc_back)
            if self.rpc_back in events:
                self.stats.rpc_replies += self._pass(self.rpc_back, self.rpc_front)
            if time.monotonic() >= self._next_stats:
                self._publish_stats()

    @staticmethod
    def _pass(src: zmq.Socket, dst: zmq.Socket) -> int:
        """Move what ``src`` holds to ``dst`` unchanged, never blocking (a full or gone peer
        loses that message; the subscriber counts the gap)."""
        for n in range(DRAIN_BUDGET):
            try:
                frames = src.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return n
            try:
                dst.send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.ZMQError:  # Again, or EHOSTUNREACH for a client gone
                pass
        return DRAIN_BUDGET

    def _pass_results(self) -> int:
        """Move the workers' results to the local subscribers, never blocking, each frame's
        once per topic: a worker that took over publishes again what its predecessor did
        (dropped here, counted in ``duplicates``). What cannot be read is passed on as it
        is (the subscribers count it)."""
        for n in range(DRAIN_BUDGET):
            try:
                frames = self.results_in.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return n
            if self._duplicate(frames):
                continue
            try:
                self.results_out.send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.ZMQError:  # Again: a full subscriber loses it (and counts the gap)
                pass
        return DRAIN_BUDGET

    def _duplicate(self, frames: list[Any]) -> bool:
        topic = bytes(frames[0]).decode(errors="replace")
        try:
            if topics.base_topic(topic) not in RESULT_TOPICS:
                return False
            msg = wire.unpack([f.bytes for f in frames])[1]
        except (KeyError, WireError):
            return False
        return not self.inflight.first_time(topic, msg["seq"], msg["t_capture_ns"])

    def _on_subscriptions(self) -> None:
        """A worker subscribed to the frames (a new one, or one that took over): it gets the
        frames no stream has answered yet, oldest first."""
        fresh = False
        for _ in range(DRAIN_BUDGET):
            try:
                fresh |= self.frames_out.recv(zmq.NOBLOCK)[:1] == b"\x01"
            except zmq.Again:
                break
        pending = self.inflight.unanswered()
        if not fresh or not pending:
            return
        logger.info("gateway: a worker subscribed; sending the {} frames not answered yet "
                    "again (seqs {}..{})", len(pending), pending[0][0], pending[-1][0])
        for _, parts in pending:
            self.stats.resent += send_parts(self.frames_out, parts)

    def _on_local(self, topic: str, msg: dict[str, Any]) -> None:
        seq = msg["seq"]
        reads = self.reader.follow(seq, msg.get("ring_id"), msg["t_capture_ns"])
        if self.reader.kind == RESTART:
            self.inflight.restart()
        if self.reader.kind in (FIRST, RESTART) and self.reader.ring is not None:
            self.inflight.capacity = max(self.inflight.capacity, self.reader.ring.slots)
        if self.reader.kind == OLDER:  # a lossless capture's re-send: a worker took over
            self._resend(seq, msg)
            return
        for r in reads or ():
            if r.got is None:
                self.stats.missed += r.why != "backfill"
                continue
            pixels, meta = r.got
            self._send_frame(msg if r.why == "notice" else None, r.seq, pixels, meta)

    def _resend(self, seq: int, msg: dict[str, Any]) -> None:
        """Frame ``seq`` again, for a worker that took over: as it went out while it is
        unanswered, not at all once every stream answered it, else read from the ring."""
        parts = self.inflight.get(seq)
        if parts is not None:
            self.stats.resent += send_parts(self.frames_out, parts)
            return
        if self.inflight.answered(seq):
            self.stats.already_answered += 1
            return
        got = self.reader.read(seq)
        if isinstance(got, str):
            self.stats.missed += got != "detached"
        else:
            self.stats.resent += 1
            self._send_frame(msg, seq, *got)

    def _send_frame(self, notice: dict[str, Any] | None, seq: int, pixels: Any,
                    meta: Any) -> None:
        base = notice if notice is not None else {
            "seq": seq, "slot": seq, "t_capture_ns": meta.t_capture_ns, "action": None,
            "source": None, "ring_id": self.reader.order.ring_id}
        try:
            parts = self.encoder.pack(base, pixels)
        except WireError as e:  # validated on the way in; this would be our own bug
            logger.error("gateway: cannot forward frame {}: {}", seq, e)
            self.stats.frames_dropped += 1
            return
        if send_parts(self.frames_out, parts):
            self.stats.frames += 1
        else:
            self.stats.frames_dropped += 1
        self.inflight.sent(seq, base["t_capture_ns"], parts)  # (sent again when unanswered)

    def _link_window(self) -> dict[str, Any]:
        """The link's bandwidth and encode time since the last tick: ``link_mb_s`` (what
        went onto the link), ``raw_mb_s`` (the frames' own size), ``encode_ms`` (a frame's
        mean)."""
        enc, now = self.encoder, time.monotonic()
        t0, frames0, link0, raw0, ns0 = self._last_tick
        self._last_tick = (now, enc.frames, enc.link_bytes, enc.raw_bytes, enc.encode_ns)
        dt, frames = max(now - t0, 1e-9), enc.frames - frames0
        return {"link_mb_s": round((enc.link_bytes - link0) / dt / 1e6, 3),
                "raw_mb_s": round((enc.raw_bytes - raw0) / dt / 1e6, 3),
                "encode_ms": round((enc.encode_ns - ns0) / frames / 1e6, 3) if frames
                else None}

    def _publish_stats(self) -> None:
        self._next_stats = time.monotonic() + STATS_INTERVAL_S
        values = {**vars(self.stats), "refused_peers": self._gate.refused if self._gate else 0,
                  "curve": int(self.keys is not None),
                  "decode_errors": self.local.decode_errors, **self.encoder.stats(),
                  "in_flight": len(self.inflight), "unanswered_evicted": self.inflight.evicted,
                  "duplicates": self.inflight.duplicates,
                  **self._link_window()}
        try:
            self.results_out.send_multipart(
                wire.pack(topics.STATS, {"t_ns": clock_ns(), "source": "gateway",
                                         "values": values}), zmq.NOBLOCK)
        except zmq.Again:
            pass

    # ------------------------------------------------------------ lifetime

    def close(self) -> None:
        if getattr(self, "local", None) is not None:
            self.local.close()
        for sock in self._socks:
            sock.close(linger=0)
        self._socks.clear()
        if self._gate is not None:
            self._gate.stop()
            self._gate = None
        self._ctx.term()
        for endpoint, inode in self._inodes:
            unbind_file(endpoint, inode)
        self._inodes.clear()
        self.reader.close()

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_gateway(link: Link, endpoints: Endpoints, ring_name: str) -> int:
    """Process entry (spawn-safe): 0 clean stop, 2 keys or address refused, 3 a socket
    could not be bound, 1 crashed."""
    stop = StopFlag()
    with stop_on_signals(stop, "gateway"):
        try:
            gateway = Gateway(link, endpoints, ring_name)
        except (FileNotFoundError, ValueError) as e:
            logger.error("gateway cannot start: {}", e)
            return 2
        except OSError as e:
            logger.error("gateway cannot bind: {}", e)
            return 3
        try:
            with gateway:
                gateway.serve(stop)
        except Exception:
            logger.exception("gateway crashed")
            return 1
        logger.info("gateway stopped after {} frames sent", gateway.stats.frames)
        return 0
