"""Bus overhead: frame -> worker -> latent round trip through the FrameRing + ZeroMQ bus,
side by side with a bare memcpy and the seed guide's HTTP/base64/JSON design.

    .venv/bin/python bench/bus_overhead.py
    .venv/bin/python bench/bus_overhead.py --iters 1000 --sizes 640x480,1920x1080
    .venv/bin/python bench/bus_overhead.py --iters 300 --http-iters 100 --breakdown

Paths, all timed in this (the capture) process with one clock, one request in flight:

* memcpy: ``np.copyto`` of the frame into a preallocated array (the floor).
* bus: ``FrameRing.write`` + publish an ``iwm.frame`` notice -> a worker *process* receives
  it, reads the frame from the ring into a preallocated ``out=`` array and publishes a 768-d
  float32 ``iwm.latent`` -> a subscriber here receives it. No model runs.
* http: ``httpx.Client`` (keep-alive) POSTs ``{"image_base64", "shape"}`` JSON to a FastAPI
  endpoint served by uvicorn in another process on 127.0.0.1; it decodes the base64 into an
  array and returns the latent as a JSON list of 768 floats.

``--breakdown`` adds where the bus p50 goes: medians of the ring write (capture), ring read
(worker), wire pack + decode (both sides), and the remainder: ZeroMQ sends and hops (I/O
threads, kernel, wake-ups) plus any wait for a CPU.
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

import numpy as np
import zmq

from iwm_bus import topics, wire
from iwm_bus.ring import FrameRing
from iwm_bus.transport import Endpoints, Publisher, Subscriber

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


def worker_main(ring_name: str, eps: Endpoints, ready: Any, stop: Any, report: Any) -> None:
    """Receive frame notices, read each frame from the ring, publish a latent per frame."""
    ring = FrameRing.attach(ring_name)
    out = np.zeros(ring.max_height * ring.max_width * ring.channels, np.uint8)  # prefaulted
    latent = np.random.default_rng(0).standard_normal(LATENT_DIM).astype(np.float32)
    stages: dict[str, dict[str, list[int]]] = {}  # size -> stage -> ns
    misses = 0
    try:
        with Subscriber([eps.capture], [topics.FRAME]) as sub, Publisher(eps.worker) as pub:
            ready.set()
            while True:
                got, decode_ns = _recv_timed(sub, 100)
                if got is None:
                    if stop.is_set():
                        break
                    continue
                msg = got[1]
                t0 = time.monotonic_ns()
                frame = ring.read(msg["seq"], out=out)
                t1 = time.monotonic_ns()
                misses += frame is None
                frames = wire.pack(topics.LATENT, {
                    "seq": msg["seq"], "t_capture_ns": msg["t_capture_ns"], "t_publish_ns": t1,
                    "z_cls": latent, "variant": "bench" if frame is not None else "miss"})
                t2 = time.monotonic_ns()
                pub.send_frames(frames)
                t3 = time.monotonic_ns()
                st = stages.setdefault(f"{msg['width']}x{msg['height']}",
                                       {k: [] for k in WORKER_STAGES})
                for key, ns in zip(WORKER_STAGES, (decode_ns, t1 - t0, t2 - t1, t3 - t2),
                                   strict=True):
                    st[key].append(ns)
    finally:
        report.put({"stages": {size: {k: _median_ms(v) for k, v in st.items()}
                               for size, st in stages.items()},
                    "misses": misses, "ring": ring.stats.as_dict()})
        ring.close()


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


def _bus_round_trip(ring: FrameRing, pub: Publisher, sub: Subscriber, frame: np.ndarray,
                    stages: dict[str, list[int]]) -> int:
    """One round trip; returns its duration in ns (raises on a lost or missed frame)."""
    t0 = time.monotonic_ns()
    seq = ring.write(frame, t_capture_ns=t0)
    t1 = time.monotonic_ns()
    frames = wire.pack(topics.FRAME, {
        "seq": seq, "slot": ring.slot_of(seq), "t_capture_ns": t0, "height": frame.shape[0],
        "width": frame.shape[1], "channels": frame.shape[2], "source": "bench"})
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


def bench_bus(frames: list[np.ndarray], iters: int,
              warmup: int) -> tuple[list[PathTimes], list[dict[str, float]], dict[str, Any]]:
    """Round trips through ring + bus + worker process for each frame size."""
    ctx = mp.get_context("spawn")
    run_dir = tempfile.mkdtemp(prefix="iwmb", dir="/tmp")
    eps = Endpoints.ipc(run_dir)
    max_h = max(f.shape[0] for f in frames)
    max_w = max(f.shape[1] for f in frames)
    ring = FrameRing.create(f"iwm_bench_{os.getpid()}", slots=8, max_height=max_h,
                            max_width=max_w)
    ready, stop, report = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = None
    try:
        with Publisher(eps.capture) as pub, Subscriber([eps.worker], [topics.LATENT]) as sub:
            proc = ctx.Process(target=worker_main, args=(ring.name, eps, ready, stop, report),
                               daemon=True)
            proc.start()
            if not ready.wait(60):
                raise TimeoutError("bench worker did not start within 60 s")
            _connect(ring, pub, sub, frames[0])
            results, stages_out = [], []
            for frame in frames:
                stages: dict[str, list[int]] = {k: [] for k in CAPTURE_STAGES}
                for _ in range(warmup):
                    _bus_round_trip(ring, pub, sub, frame, {k: [] for k in CAPTURE_STAGES})
                times = PathTimes([_bus_round_trip(ring, pub, sub, frame, stages)
                                   for _ in range(iters)])
                results.append(times)
                stages_out.append({k: _median_ms(v) for k, v in stages.items()})
            stop.set()
            worker_report = report.get(timeout=30)
        return results, stages_out, worker_report
    finally:
        stop.set()
        if proc is not None:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        ring.close()
        ring.unlink()
        shutil.rmtree(run_dir, ignore_errors=True)


def _connect(ring: FrameRing, pub: Publisher, sub: Subscriber, frame: np.ndarray) -> None:
    """Resend the first notice until its latent comes back (PUB/SUB slow joiner)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        seq = ring.write(frame)
        pub.send(topics.FRAME, {"seq": seq, "slot": ring.slot_of(seq), "t_capture_ns": 0,
                                "height": frame.shape[0], "width": frame.shape[1],
                                "channels": frame.shape[2], "source": "bench"})
        got = sub.recv(timeout_ms=100)
        if got is not None:
            while sub.recv(timeout_ms=200) is not None:  # drain the other replies
                pass
            return
    raise TimeoutError("bus worker never answered within 30 s")


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
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
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
    bus, stages, worker = bench_bus(frames, args.iters, args.warmup)
    http = (None if args.no_http else
            bench_http(frames, args.http_iters or args.iters, min(args.warmup, 10)))
    print_table(args.sizes, memcpy, bus, http)
    if worker["misses"]:
        print(f"WARNING: worker missed {worker['misses']} frames in the ring: {worker['ring']}")
    if args.breakdown:
        print_breakdown(args.sizes, bus, stages, worker)


def print_table(sizes: list[tuple[int, int]], memcpy: list[PathTimes], bus: list[PathTimes],
                http: list[PathTimes] | None) -> None:
    head = "| frame | memcpy p50 / p99 ms | bus p50 / p99 ms |"
    head += " HTTP p50 / p99 ms | HTTP/bus (p50) |" if http else ""
    print("\n" + head)
    print("|" + "---|" * (head.count("|") - 1))
    for i, (w, h) in enumerate(sizes):
        row = (f"| {w}x{h} | {memcpy[i].ms(50):.3f} / {memcpy[i].ms(99):.3f} "
               f"| {bus[i].ms(50):.3f} / {bus[i].ms(99):.3f} |")
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
        ws = worker["stages"].get(f"{w}x{h}", {})
        nan = float("nan")
        wire_ms = st["pack"] + st["decode"] + ws.get("w_decode", nan) + ws.get("w_pack", nan)
        ring_ms = st["write"] + ws.get("w_read", nan)
        zmq_ms = times.ms(50) - wire_ms - ring_ms
        print(f"| {w}x{h} | {st['write']:.3f} | {ws.get('w_read', nan):.3f} | {wire_ms:.3f} "
              f"| {zmq_ms:.3f} | {times.ms(50):.3f} |")


if __name__ == "__main__":
    main()
