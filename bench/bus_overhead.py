"""Bus overhead: frame -> worker -> latent round trip through the FrameRing + ZeroMQ bus,
side by side with a bare memcpy and the seed guide's HTTP/base64/JSON design.

    .venv/bin/python bench/bus_overhead.py
    .venv/bin/python bench/bus_overhead.py --iters 1000 --sizes 640x480,1920x1080
    .venv/bin/python bench/bus_overhead.py --iters 300 --http-iters 100 --breakdown
    taskset -c 1 .venv/bin/python bench/bus_overhead.py --iters 3000 --sizes 640x480 --no-http

Paths, all timed in this (the capture) process with one clock, one request in flight:

* memcpy: ``np.copyto`` of the frame into a preallocated array (the floor).
* bus: ``FrameRing.write`` + publish an ``iwm.frame`` notice (the fields the capture sends,
  ``ring_id`` included) -> a worker *process* receives it, reads the frame from the ring into
  a preallocated ``out=`` array with its metadata (as ``workers.ring_reader`` does) and
  publishes a 768-d float32 ``iwm.latent`` -> a subscriber here receives it. No model runs.
* bare: the same round trip as a bare prototype: the frame copied into a plain numpy buffer
  on /dev/shm, a tiny msgpack notice on a pyzmq PUB -> a worker process copies the frame
  into a preallocated array and publishes ``{seq, z_cls}`` (768 float32 bytes) via msgpack
  -> received here. Same sockets (PUB/SUB over ipc) and hops as the bus, none of its
  checks. ``bus/bare`` is the bus's cost over that floor (issue 12 target: <= 1.3x).
  The bus and bare round trips are interleaved in blocks, so load changes hit both.
* http: ``httpx.Client`` (keep-alive) POSTs ``{"image_base64", "shape"}`` JSON to a FastAPI
  endpoint served by uvicorn in another process on 127.0.0.1; it decodes the base64 into an
  array and returns the latent as a JSON list of 768 floats.

``--breakdown`` adds where the bus p50 goes: medians of the ring write (capture), ring read
(worker), wire pack + decode (both sides), and the remainder: ZeroMQ sends and hops (I/O
threads, kernel, wake-ups) plus any wait for a CPU. Only then does the bus path run step
timers (a few µs a round trip that the bare path does not run): read ``bus/bare`` from a
run without ``--breakdown``.
"""

import argparse
import base64
import multiprocessing as mp
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import zmq

from iwm_bus.bus import topics, wire
from iwm_bus.bus.ring import FrameRing, clock_ns
from iwm_bus.bus.transport import Endpoints, Publisher, Subscriber

LATENT_DIM = 768
WAIT_MS = 10_000
DEFAULT_SIZES = "224x224,640x480,1920x1080"


@dataclass
class PathTimes:
    """Round-trip samples (ns) of one path at one frame size."""

    samples: list[int] = field(default_factory=list)

    def ms(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.samples), q)) / 1e6 if self.samples else 0.0


# ------------------------------------------------------------------ worker process (bus)


def worker_main(ring_name: str, eps: Endpoints, ready: Any, stop: Any, report: Any,
                timed: bool) -> None:
    """Receive frame notices, read each frame from the ring, publish a latent per frame;
    ``timed``: also time each step (``--breakdown``)."""
    ring = FrameRing.attach(ring_name)
    out = np.zeros(ring.max_height * ring.max_width * ring.channels, np.uint8)  # prefaulted
    latent = np.random.default_rng(0).standard_normal(LATENT_DIM).astype(np.float32)
    stages: dict[str, dict[str, list[int]]] = {}  # size -> stage -> ns
    misses = 0
    try:
        with Subscriber([eps.capture], [topics.FRAME]) as sub, Publisher(eps.worker) as pub:
            ready.set()
            serve = _serve_timed if timed else _serve
            misses = serve(ring, sub, pub, out, latent, stop, stages)
    finally:
        report.put({"stages": {size: {k: _median_ms(v) for k, v in st.items()}
                               for size, st in stages.items()},
                    "misses": misses, "ring": ring.stats.as_dict()})
        ring.close()


def _serve(ring: FrameRing, sub: Subscriber, pub: Publisher, out: np.ndarray,
           latent: np.ndarray, stop: Any, stages: dict[str, Any]) -> int:
    """The worker's per-frame path and nothing else (no timers); returns the ring misses."""
    misses = 0
    while True:
        if not sub.sock.poll(100, zmq.POLLIN):
            if stop.is_set():
                return misses
            continue
        got = sub.decode(sub.sock.recv_multipart(zmq.NOBLOCK))
        if got is None:
            continue
        msg = got[1]
        frame = ring.read(msg["seq"], out=out, with_meta=True)  # as workers.ring_reader does
        misses += frame is None
        pub.send(topics.LATENT, {
            "seq": msg["seq"], "t_capture_ns": msg["t_capture_ns"], "t_publish_ns": clock_ns(),
            "z_cls": latent, "variant": "bench" if frame is not None else "miss"})


def _serve_timed(ring: FrameRing, sub: Subscriber, pub: Publisher, out: np.ndarray,
                 latent: np.ndarray, stop: Any, stages: dict[str, Any]) -> int:
    """``_serve`` with each step timed into ``stages`` (``--breakdown``)."""
    misses = 0
    while True:
        got, decode_ns = _recv_timed(sub, 100)
        if got is None:
            if stop.is_set():
                return misses
            continue
        msg = got[1]
        t0 = time.monotonic_ns()
        frame = ring.read(msg["seq"], out=out, with_meta=True)
        t1 = time.monotonic_ns()
        misses += frame is None
        frames = wire.pack(topics.LATENT, {
            "seq": msg["seq"], "t_capture_ns": msg["t_capture_ns"], "t_publish_ns": t1,
            "z_cls": latent, "variant": "bench" if frame is not None else "miss"})
        t2 = time.monotonic_ns()
        pub.send_frames(frames)
        t3 = time.monotonic_ns()
        size = f"{msg['width']}x{msg['height']}"
        if size not in stages:
            stages[size] = {k: [] for k in WORKER_STAGES}
        for key, ns in zip(WORKER_STAGES, (decode_ns, t1 - t0, t2 - t1, t3 - t2), strict=True):
            stages[size][key].append(ns)


WORKER_STAGES = ("w_decode", "w_read", "w_pack", "w_send")
CAPTURE_STAGES = ("write", "pack", "send", "decode")


def _median_ms(ns: list[int]) -> float:
    return float(np.median(ns)) / 1e6 if ns else float("nan")


def _recv_timed(sub: Subscriber, timeout_ms: int) -> tuple[Any, int]:
    """``Subscriber.recv`` that also returns how long decoding took (ns)."""
    if not sub.sock.poll(timeout_ms, zmq.POLLIN):
        return None, 0
    raw = sub.sock.recv_multipart(zmq.NOBLOCK)
    t = time.monotonic_ns()
    got = sub.decode(raw)
    return got, time.monotonic_ns() - t


def _notice(ring: FrameRing, seq: int, frame: np.ndarray, t_capture_ns: int) -> dict[str, Any]:
    """The ``iwm.frame`` notice, with the fields ``workers.capture.write_frame`` sends."""
    return {"seq": seq, "slot": ring.slot_of(seq), "t_capture_ns": t_capture_ns,
            "ring_id": ring.ring_id, "height": frame.shape[0], "width": frame.shape[1],
            "channels": frame.shape[2], "action": None, "source": "bench"}


def _bus_round_trip(ring: FrameRing, pub: Publisher, sub: Subscriber, frame: np.ndarray) -> int:
    """One round trip; returns its duration in ns (raises on a lost or missed frame)."""
    t0 = time.monotonic_ns()
    seq = ring.write(frame, t_capture_ns=t0)
    pub.send(topics.FRAME, _notice(ring, seq, frame, t0))
    deadline = t0 + WAIT_MS * 1_000_000
    while True:
        if sub.sock.poll(WAIT_MS, zmq.POLLIN):
            got = sub.decode(sub.sock.recv_multipart(zmq.NOBLOCK))
            if got is not None and got[1]["seq"] == seq:
                break
        if time.monotonic_ns() > deadline:
            raise TimeoutError(f"no latent for frame {seq} within {WAIT_MS} ms ({sub})")
    t1 = time.monotonic_ns()
    if got[1]["variant"] == "miss":
        raise RuntimeError(f"worker could not read frame {seq} from the ring")
    return t1 - t0


def _bus_round_trip_timed(ring: FrameRing, pub: Publisher, sub: Subscriber,
                          frame: np.ndarray, stages: dict[str, list[int]]) -> int:
    """``_bus_round_trip`` with each step timed into ``stages`` (``--breakdown``)."""
    t0 = time.monotonic_ns()
    seq = ring.write(frame, t_capture_ns=t0)
    t1 = time.monotonic_ns()
    frames = wire.pack(topics.FRAME, _notice(ring, seq, frame, t0))
    t2 = time.monotonic_ns()
    pub.send_frames(frames)
    t3 = time.monotonic_ns()
    deadline = t3 + WAIT_MS * 1_000_000
    while True:
        got, decode_ns = _recv_timed(sub, WAIT_MS)
        if got is not None and got[1]["seq"] == seq:
            break
        if time.monotonic_ns() > deadline:
            raise TimeoutError(f"no latent for frame {seq} within {WAIT_MS} ms ({sub})")
    t4 = time.monotonic_ns()
    if got[1]["variant"] == "miss":
        raise RuntimeError(f"worker could not read frame {seq} from the ring")
    for key, ns in zip(CAPTURE_STAGES, (t1 - t0, t2 - t1, t3 - t2, decode_ns), strict=True):
        stages[key].append(ns)
    return t4 - t0


class BusPath:
    """The ring + bus round trip with its worker process (``with BusPath(frames) as bus``)."""

    def __init__(self, frames: list[np.ndarray], timed: bool = False) -> None:
        self.frames = frames
        self.timed = timed  # time each step (--breakdown); off, the path runs no timers
        self.stages = [{k: [] for k in CAPTURE_STAGES} for _ in frames]  # per frame size
        self.worker: dict[str, Any] = {}  # the worker's report, after close

    def __enter__(self) -> "BusPath":
        ctx = mp.get_context("spawn")
        self.run_dir = tempfile.mkdtemp(prefix="iwmb", dir="/tmp")
        eps = Endpoints.ipc(self.run_dir)
        self.ring = FrameRing.create(f"iwm_bench_{os.getpid()}", slots=8,
                                     max_height=max(f.shape[0] for f in self.frames),
                                     max_width=max(f.shape[1] for f in self.frames))
        self.ready, self.stop, self.report = ctx.Event(), ctx.Event(), ctx.Queue()
        self.proc = None
        try:
            self.pub = Publisher(eps.capture)
            self.sub = Subscriber([eps.worker], [topics.LATENT])
            proc = ctx.Process(target=worker_main, daemon=True, args=(
                self.ring.name, eps, self.ready, self.stop, self.report, self.timed))
            proc.start()
            self.proc = proc  # only a started process: close() joins it
            if not self.ready.wait(60):
                raise TimeoutError("bench worker did not start within 60 s")
            _connect(self.ring, self.pub, self.sub, self.frames[0])
        except BaseException:
            self.close()
            raise
        return self

    def round_trip(self, i: int, timed: bool = True) -> int:
        """One round trip (ns); ``timed=False``: a warm-up, its step times not kept."""
        if not self.timed:
            return _bus_round_trip(self.ring, self.pub, self.sub, self.frames[i])
        return _bus_round_trip_timed(self.ring, self.pub, self.sub, self.frames[i],
                                     self.stages[i] if timed else {k: [] for k in CAPTURE_STAGES})

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.stop.set()
        try:
            if self.proc is not None and self.proc.is_alive():
                self.worker = self.report.get(timeout=30)
        finally:
            if self.proc is not None:
                self.proc.join(10)
                if self.proc.is_alive():
                    self.proc.terminate()
                    self.proc.join(5)
            for part in ("sub", "pub"):
                if hasattr(self, part):
                    getattr(self, part).close()
            self.ring.close()
            self.ring.unlink()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def stage_medians(self) -> list[dict[str, float]]:
        return [{k: _median_ms(v) for k, v in st.items()} for st in self.stages]


def _connect(ring: FrameRing, pub: Publisher, sub: Subscriber, frame: np.ndarray) -> None:
    """Resend the first notice until its latent comes back (PUB/SUB slow joiner)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        seq = ring.write(frame)
        pub.send(topics.FRAME, _notice(ring, seq, frame, 0))
        got = sub.recv(timeout_ms=100)
        if got is not None:
            while sub.recv(timeout_ms=200) is not None:  # drain the other replies
                pass
            return
    raise TimeoutError("bus worker never answered within 30 s")


# ------------------------------------------------------------------ bare prototype


def bare_worker_main(buf_path: str, size: int, notice_ep: str, reply_ep: str, ready: Any,
                     stop: Any) -> None:
    """Bare prototype worker: msgpack notice -> copy the frame out of /dev/shm -> latent."""
    buf = np.memmap(buf_path, np.uint8, mode="r", shape=(size,))
    out = np.zeros(size, np.uint8)  # preallocated, prefaulted
    latent = np.random.default_rng(0).standard_normal(LATENT_DIM).astype(np.float32).tobytes()
    ctx = zmq.Context()
    sub, pub = ctx.socket(zmq.SUB), ctx.socket(zmq.PUB)
    try:
        for sock in (sub, pub):
            sock.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(notice_ep)
        pub.bind(reply_ep)
        ready.set()
        while not stop.is_set():
            if not sub.poll(100, zmq.POLLIN):
                continue
            msg = msgpack.unpackb(sub.recv(zmq.NOBLOCK))
            n = msg["h"] * msg["w"] * msg["c"]
            np.copyto(out[:n], buf[:n])
            try:
                pub.send(msgpack.packb({"seq": msg["seq"], "z_cls": latent}), zmq.NOBLOCK)
            except zmq.Again:
                pass  # no subscriber yet (slow joiner): the capture side resends
    finally:
        sub.close()
        pub.close()
        ctx.term()
        del buf


class BarePath:
    """The bare prototype's round trip with its worker process (``with BarePath(frames)``)."""

    def __init__(self, frames: list[np.ndarray]) -> None:
        self.frames = frames
        self.size = max(f.size for f in frames)
        self.seq = 0

    def __enter__(self) -> "BarePath":
        ctx = mp.get_context("spawn")
        self.run_dir = tempfile.mkdtemp(prefix="iwmbare", dir="/tmp")
        shm_dir = "/dev/shm" if os.path.isdir("/dev/shm") else self.run_dir
        self.buf_path = os.path.join(shm_dir, f"iwm_bare_{os.getpid()}")
        self.buf = np.memmap(self.buf_path, np.uint8, mode="w+", shape=(self.size,))
        self.zctx = zmq.Context()
        self.pub, self.sub = self.zctx.socket(zmq.PUB), self.zctx.socket(zmq.SUB)
        self.stop, self.proc = ctx.Event(), None
        try:
            for sock in (self.pub, self.sub):
                sock.setsockopt(zmq.LINGER, 0)
            notice_ep = f"ipc://{self.run_dir}/notice"
            reply_ep = f"ipc://{self.run_dir}/reply"
            self.pub.bind(notice_ep)
            self.sub.setsockopt(zmq.SUBSCRIBE, b"")
            self.sub.connect(reply_ep)
            ready = ctx.Event()
            proc = ctx.Process(target=bare_worker_main, daemon=True, args=(
                self.buf_path, self.size, notice_ep, reply_ep, ready, self.stop))
            proc.start()
            self.proc = proc  # only a started process: close() joins it
            if not ready.wait(60):
                raise TimeoutError("bare worker did not start within 60 s")
            self._connect()
        except BaseException:
            self.close()
            raise
        return self

    def _connect(self) -> None:
        """Resend a notice until a reply comes back (PUB/SUB slow joiner both ways)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self._notice(self.frames[0])
            if self.sub.poll(100, zmq.POLLIN):
                while self.sub.poll(200, zmq.POLLIN):  # drain the other replies
                    self.sub.recv(zmq.NOBLOCK)
                return
        raise TimeoutError("bare worker never answered within 30 s")

    def _notice(self, frame: np.ndarray) -> int:
        self.seq += 1
        h, w, c = frame.shape
        np.copyto(self.buf[:frame.size].reshape(frame.shape), frame)
        self.pub.send(msgpack.packb({"seq": self.seq, "h": h, "w": w, "c": c}), zmq.NOBLOCK)
        return self.seq

    def round_trip(self, i: int, timed: bool = True) -> int:
        """One round trip; returns its duration in ns (raises on a lost reply)."""
        t0 = time.monotonic_ns()
        seq = self._notice(self.frames[i])
        while True:
            if not self.sub.poll(WAIT_MS, zmq.POLLIN):
                raise TimeoutError(f"bare: no latent for frame {seq} within {WAIT_MS} ms")
            msg = msgpack.unpackb(self.sub.recv(zmq.NOBLOCK))
            if msg["seq"] == seq:
                break
        z = np.frombuffer(msg["z_cls"], np.float32)
        t1 = time.monotonic_ns()
        if z.shape != (LATENT_DIM,):
            raise RuntimeError(f"bare latent has shape {z.shape}")
        return t1 - t0

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.stop.set()
        try:
            if self.proc is not None:
                self.proc.join(10)
                if self.proc.is_alive():
                    self.proc.terminate()
                    self.proc.join(5)
        finally:
            self.pub.close()
            self.sub.close()
            self.zctx.term()
            del self.buf
            if os.path.exists(self.buf_path):
                os.unlink(self.buf_path)
            shutil.rmtree(self.run_dir, ignore_errors=True)


def bench_bus_and_bare(frames: list[np.ndarray], iters: int, warmup: int, blocks: int = 10,
                       timed: bool = False
                       ) -> tuple[list[PathTimes], list[PathTimes], list[dict[str, float]],
                                  dict[str, Any]]:
    """Bus and bare round trips for each frame size, interleaved in ``blocks`` blocks;
    ``timed``: the bus path also times its steps (``--breakdown``)."""
    bus_t = [PathTimes() for _ in frames]
    bare_t = [PathTimes() for _ in frames]
    with BusPath(frames, timed) as bus, BarePath(frames) as bare:
        for i in range(len(frames)):
            for _ in range(warmup):
                bus.round_trip(i, timed=False)
                bare.round_trip(i, timed=False)
            for b in range(blocks):
                n = iters // blocks + (b < iters % blocks)
                bus_t[i].samples += [bus.round_trip(i) for _ in range(n)]
                bare_t[i].samples += [bare.round_trip(i) for _ in range(n)]
    return bus_t, bare_t, bus.stage_medians(), bus.worker


# ------------------------------------------------------------------ memcpy


def bench_memcpy(frame: np.ndarray, iters: int, warmup: int) -> PathTimes:
    dst = np.zeros_like(frame)
    for _ in range(warmup):
        np.copyto(dst, frame)
    out = PathTimes()
    for _ in range(iters):
        t0 = time.monotonic_ns()
        np.copyto(dst, frame)
        out.samples.append(time.monotonic_ns() - t0)
    return out


# ------------------------------------------------------------------ HTTP (seed guide design)


def http_server_main(port: int) -> None:
    """FastAPI app in its own process: POST /encode base64 JSON -> latent as a JSON list."""
    import uvicorn
    from fastapi import FastAPI, HTTPException
    from pydantic import BaseModel

    class EncodeRequest(BaseModel):
        image_base64: str
        shape: list[int]

    app = FastAPI()
    latent = np.random.default_rng(0).standard_normal(LATENT_DIM).astype(np.float32)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/encode")
    async def encode(req: EncodeRequest) -> dict[str, Any]:
        raw = base64.b64decode(req.image_base64)
        if len(raw) != int(np.prod(req.shape)):
            raise HTTPException(400, f"{len(raw)} bytes do not fit shape {req.shape}")
        frame = np.frombuffer(raw, np.uint8).reshape(req.shape)
        return {"z_cls": latent.tolist(), "timestamp": time.time(), "height": frame.shape[0]}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def bench_http(frames: list[np.ndarray], iters: int, warmup: int) -> list[PathTimes]:
    import httpx

    ctx = mp.get_context("spawn")
    port = _free_port()
    proc = ctx.Process(target=http_server_main, args=(port,), daemon=True)
    proc.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            _wait_http(client, proc)
            results = []
            for frame in frames:
                for _ in range(warmup):
                    _http_round_trip(client, frame)
                results.append(PathTimes([_http_round_trip(client, frame)
                                          for _ in range(iters)]))
            return results
    finally:
        proc.terminate()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)


def _http_round_trip(client: Any, frame: np.ndarray) -> int:
    t0 = time.monotonic_ns()
    body = {"image_base64": base64.b64encode(frame.tobytes()).decode("ascii"),
            "shape": list(frame.shape)}
    resp = client.post("/encode", json=body)
    resp.raise_for_status()
    z = np.asarray(resp.json()["z_cls"], np.float32)
    t1 = time.monotonic_ns()
    if z.shape != (LATENT_DIM,):
        raise RuntimeError(f"HTTP latent has shape {z.shape}")
    return t1 - t0


def _wait_http(client: Any, proc: mp.process.BaseProcess) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not proc.is_alive():
            raise RuntimeError(f"HTTP server exited with code {proc.exitcode}")
        try:
            if client.get("/health").status_code == 200:
                return
        except Exception:  # noqa: BLE001 - connection refused while uvicorn starts
            time.sleep(0.1)
    raise TimeoutError("HTTP server did not answer /health within 60 s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ main


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"640x480,1920x1080"`` -> [(640, 480), (1920, 1080)] (width x height)."""
    sizes = []
    for item in text.split(","):
        w, _, h = item.strip().partition("x")
        if not (w.isdigit() and h.isdigit()) or int(w) < 1 or int(h) < 1:
            raise argparse.ArgumentTypeError(f"size {item!r} must look like WIDTHxHEIGHT")
        sizes.append((int(w), int(h)))
    return sizes


def machine_note() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
            f"({usable} usable here: taskset), "
            f"load {load[0]:.2f}, Python {sys.version.split()[0]}, numpy {np.__version__}, "
            f"{platform.system()} {platform.release()}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=500, help="timed round trips per size and path")
    ap.add_argument("--http-iters", type=int, default=None,
                    help="timed HTTP round trips per size (default: --iters)")
    ap.add_argument("--warmup", type=int, default=30, help="untimed round trips first")
    ap.add_argument("--sizes", type=parse_sizes, default=parse_sizes(DEFAULT_SIZES),
                    help=f"comma-separated WIDTHxHEIGHT RGB frame sizes ({DEFAULT_SIZES})")
    ap.add_argument("--no-http", action="store_true", help="skip the HTTP path")
    ap.add_argument("--breakdown", action="store_true", help="print where the bus time goes")
    args = ap.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        ap.error("--iters must be >= 1 and --warmup >= 0")

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in args.sizes]
    print(f"machine: {machine_note()}")
    print(f"iters {args.iters} (http {args.http_iters or args.iters}), warmup {args.warmup}")
    memcpy = [bench_memcpy(f, args.iters, args.warmup) for f in frames]
    bus, bare, stages, worker = bench_bus_and_bare(frames, args.iters, args.warmup,
                                                   timed=args.breakdown)
    http = (None if args.no_http else
            bench_http(frames, args.http_iters or args.iters, min(args.warmup, 10)))
    print_table(args.sizes, memcpy, bus, bare, http)
    if worker.get("misses"):
        print(f"WARNING: worker missed {worker['misses']} frames in the ring: {worker['ring']}")
    if args.breakdown:
        print_breakdown(args.sizes, bus, stages, worker)


def print_table(sizes: list[tuple[int, int]], memcpy: list[PathTimes], bus: list[PathTimes],
                bare: list[PathTimes], http: list[PathTimes] | None) -> None:
    head = ("| frame | memcpy p50 / p99 ms | bus p50 / p99 ms | bare p50 / p99 ms "
            "| bus/bare (p50) |")
    head += " HTTP p50 / p99 ms | HTTP/bus (p50) |" if http else ""
    print("\n" + head)
    print("|" + "---|" * (head.count("|") - 1))
    for i, (w, h) in enumerate(sizes):
        row = (f"| {w}x{h} | {memcpy[i].ms(50):.3f} / {memcpy[i].ms(99):.3f} "
               f"| {bus[i].ms(50):.3f} / {bus[i].ms(99):.3f} "
               f"| {bare[i].ms(50):.3f} / {bare[i].ms(99):.3f} "
               f"| {bus[i].ms(50) / bare[i].ms(50):.2f}x |")
        if http:
            row += (f" {http[i].ms(50):.2f} / {http[i].ms(99):.2f} "
                    f"| {http[i].ms(50) / bus[i].ms(50):.0f}x |")
        print(row)


def print_breakdown(sizes: list[tuple[int, int]], bus: list[PathTimes],
                    stages: list[dict[str, float]], worker: dict[str, Any]) -> None:
    """Split the bus p50 into ring copies, wire encode/decode and the ZeroMQ remainder.

    Socket sends are not listed on their own: a send wakes the other process, which on a
    busy machine can take the sender's CPU, so the sender's clock runs on while the receiver
    works. The remainder (p50 minus ring and wire steps) holds both sends, both hops
    (ZeroMQ I/O threads, kernel, wake-ups) and any wait for a CPU.
    """
    print("\nbus p50 breakdown, medians in ms (wire = notice pack + decode + latent pack + "
          "decode; zmq = the rest: sends, hops, wake-ups, waiting for a CPU)")
    print("| frame | ring write | ring read | wire | zmq | bus p50 |")
    print("|---|---|---|---|---|---|")
    for (w, h), times, st in zip(sizes, bus, stages, strict=True):
        ws = worker.get("stages", {}).get(f"{w}x{h}", {})
        nan = float("nan")
        wire_ms = st["pack"] + st["decode"] + ws.get("w_decode", nan) + ws.get("w_pack", nan)
        ring_ms = st["write"] + ws.get("w_read", nan)
        zmq_ms = times.ms(50) - wire_ms - ring_ms
        print(f"| {w}x{h} | {st['write']:.3f} | {ws.get('w_read', nan):.3f} | {wire_ms:.3f} "
              f"| {zmq_ms:.3f} | {times.ms(50):.3f} |")


if __name__ == "__main__":
    main()
