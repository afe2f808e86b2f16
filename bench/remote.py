"""Remote worker benchmark: what the link costs, per codec, and frame -> surprise latency.

Two tables, same frame sizes:

1. **codecs** (in this process, no model): each ``--link-codec`` on the synthetic source's
   frames: bytes a frame on the link and MB/s at ``--fps``, encode and decode ms (medians
   over ``--codec-frames`` frames), and for jpeg the error (mean absolute, PSNR); ratios
   against raw. ``--noise SIGMA`` adds Gaussian noise first (camera-like content, which
   compresses far less than a game's flat colours).
2. **end to end**: one sidecar run per row, one after another:

   * local:        ``iwm-launch`` with its own worker (shared-memory ring, ipc sockets)
   * remote tcp:   ``--remote-worker`` gateway on 127.0.0.1 + ``--worker-only --connect``,
                   once per codec (ring read, encode, tcp, decode; results and RPC back)
   * remote CURVE: the same with ``--keys`` (CurveZMQ encryption and authentication)

   Latency is from the frame's capture stamp to a subscriber on the game machine's run dir
   receiving its ``iwm.surprise`` (one machine, one clock); link MB/s and encode ms are the
   gateway's ``iwm.stats``, decode ms the worker's (medians of the 1 s windows). Over
   loopback this measures what the remote path itself costs; a real network adds its round
   trip, and a link slower than the MB/s column cannot carry the row at all.

Ratios are against the raw remote row of the same size and kind. Benchmarks print tables;
no test times anything.

    python bench/remote.py                          # 210x160, 480x640, 1080x1920; local, tcp x codecs
    python bench/remote.py --codecs-only --noise 3  # the codec table alone, noisy frames
    python bench/remote.py --sizes 210x160 --seconds 10 --kinds tcp --codecs raw zstd jpeg:80 \\
        --model-args "--untrained --encoder vit_tiny_patch16_224 --img-size 64"
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from iwm_bus.bus import topics, wire  # noqa: E402
from iwm_bus.bus.link_frames import FrameDecoder, FrameEncoder, LinkCodec  # noqa: E402
from iwm_bus.bus.security import make_keys  # noqa: E402
from iwm_bus.bus.transport import Endpoints, Subscriber  # noqa: E402
from workers.sources.synthetic import SyntheticSource  # noqa: E402

LAUNCH = [sys.executable, str(ROOT / "launch.py"), "--no-standby", "--log-level", "WARNING"]
NAMES = {"local": "local", "tcp": "remote tcp", "curve": "remote CURVE"}


def _free_port() -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import find_free_port

    return find_free_port(3)


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(value: float | None, width: int, digits: int = 1, suffix: str = "") -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width - len(suffix)}.{digits}f}{suffix}"


# ------------------------------------------------------------------ the codec table


def synthetic_frames(size: str, n: int, noise: float) -> list[np.ndarray]:
    h, w = (int(x) for x in size.split("x"))
    src = SyntheticSource(w, h, seed=0)
    frames = [src.reset().pixels] + [src.step(None).pixels for _ in range(n - 1)]
    if noise:
        rng = np.random.default_rng(0)
        frames = [np.clip(f + rng.normal(0, noise, f.shape), 0, 255).astype(np.uint8)
                  for f in frames]
    return frames


def codec_row(spec: str, frames: list[np.ndarray]) -> dict[str, Any]:
    """Medians of one codec over ``frames``: bytes on the link, encode and decode ms, and
    the decoded frames' mean absolute error and PSNR (None: bit-exact)."""
    enc, dec = FrameEncoder(LinkCodec.parse(spec)), FrameDecoder()
    enc_ms, dec_ms, sizes, mae, mse = [], [], [], [], []
    for i, frame in enumerate(frames):
        t0 = time.perf_counter()
        parts = enc.pack({"seq": i, "slot": i, "t_capture_ns": 1}, frame)
        t1 = time.perf_counter()
        got = [bytes(memoryview(p).cast("B")) for p in parts]  # as they come off a socket
        t2 = time.perf_counter()
        out = dec.decode(wire.unpack(got[:2])[1], got[2] if len(got) == 3 else None)
        t3 = time.perf_counter()
        enc_ms.append((t1 - t0) * 1e3)
        dec_ms.append((t3 - t2) * 1e3)
        sizes.append(sum(len(p) for p in got))
        diff = out.astype(np.float64) - frame[..., :out.shape[2]]
        mae.append(np.abs(diff).mean())
        mse.append(np.mean(diff**2))
    err = float(np.mean(mse))
    return {"bytes": statistics.median(sizes), "enc": statistics.median(enc_ms),
            "dec": statistics.median(dec_ms), "mae": float(np.mean(mae)),
            "psnr": 10 * np.log10(255**2 / err) if err else None}


def codec_table(sizes: list[str], codecs: list[str], fps: float, n: int, noise: float) -> None:
    content = f"synthetic frames + noise sigma {noise:g}" if noise else "synthetic frames"
    print(f"# codecs: {content}, medians of {n} frames; MB/s at {fps:g} fps")
    header = (f"{'frame':<11}{'codec':<9}{'KB/frame':>10}{'MB/s':>8}{'vs raw':>8}"
              f"{'enc ms':>8}{'dec ms':>8}{'err':>6}{'PSNR':>7}")
    print(header)
    print("-" * len(header))
    for size in sizes:
        frames = synthetic_frames(size, n, noise)
        base = None
        for spec in codecs:
            r = codec_row(spec, frames)
            base = r["bytes"] if spec == "raw" else base
            ratio = f"{base / r['bytes']:.1f}x" if base else "-"
            print(f"{size:<11}{LinkCodec.parse(spec).spec:<9}{r['bytes'] / 1e3:>10.1f}"
                  f"{r['bytes'] * fps / 1e6:>8.2f}{ratio:>8}{r['enc']:>8.2f}{r['dec']:>8.2f}"
                  f"{r['mae']:>6.2f}{_fmt(r['psnr'], 7, 1)}", flush=True)
    print()


# ------------------------------------------------------------------ end to end


def run_row(kind: str, size: str, codec: str, fps: float, seconds: float, warmup: float,
            model_args: list[str]) -> dict[str, Any]:
    """One sidecar run of ``kind`` (local / tcp / curve) with ``codec`` on the link."""
    tmp = tempfile.TemporaryDirectory(prefix="iwmr", dir="/tmp")
    run_dir = Path(tmp.name) / "run"
    h, w = size.split("x")
    game = [*LAUNCH, "--run-dir", str(run_dir), "--quiet", "--source", f"synthetic:{w}x{h}",
            "--fps", str(fps), "--duration", str(seconds + warmup + 120)]
    procs: list[subprocess.Popen] = []
    if kind == "local":
        game += model_args
    else:
        port = _free_port()
        keys: list[str] = []
        if kind == "curve":
            make_keys(Path(tmp.name) / "keys")
            keys = ["--keys", str(Path(tmp.name) / "keys")]
        game += ["--remote-worker", str(port), "--link-codec", codec, *keys]
        procs.append(subprocess.Popen([*LAUNCH, "--worker-only", "--connect", str(port), *keys,
                                       *model_args], cwd=ROOT, stderr=subprocess.DEVNULL))
    procs.append(subprocess.Popen(game, cwd=ROOT, stderr=subprocess.DEVNULL))
    sub = Subscriber([Endpoints.ipc(run_dir).worker], [topics.SURPRISE, topics.STATS])
    lat: list[float] = []
    seqs: list[int] = []
    stats: dict[str, list[dict[str, Any]]] = {"gateway": [], "worker": []}
    try:
        deadline = time.monotonic() + 300
        while (got := sub.recv(200)) is None or got[0] != topics.SURPRISE:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"{kind}: no surprise (a process exited or 300 s passed)")
        t_measure = time.monotonic() + warmup
        t_end = t_measure + seconds
        while time.monotonic() < t_end:
            got = sub.recv(200)
            now_ns = time.time_ns()
            if got is None or time.monotonic() < t_measure:
                continue
            topic, msg = got
            if topic == topics.STATS:
                if msg["source"] in stats:
                    stats[msg["source"]].append(msg["values"])
            elif topic == topics.SURPRISE:
                lat.append((now_ns - msg["t_capture_ns"]) / 1e6)
                seqs.append(msg["seq"])
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(60)
        sub.close()
        tmp.cleanup()
    span = max(seqs) - min(seqs) + 1
    gw, wk = stats["gateway"], stats["worker"]
    return {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "fps_out": len(lat) / seconds, "skipped": span - len(set(seqs)),
            "link_mb_s": _median([v.get("link_mb_s") for v in gw]) if gw else None,
            "enc": _median([v.get("encode_ms") for v in gw]) if gw else None,
            "dec": _median([v.get("decode_ms") for v in wk]) if kind != "local" else None}


def e2e_table(args: argparse.Namespace, model_args: list[str]) -> None:
    print(f"# frame -> surprise at the game machine, {args.fps:g} fps realtime, "
          f"{args.seconds:g} s a row, model {args.model_args or 'shipped default'}; "
          "remote rows over loopback tcp; ratios against the raw row of the same size and kind")
    header = (f"{'worker':<14}{'frame':<11}{'codec':<9}{'link MB/s':>10}{'vs raw':>8}"
              f"{'enc ms':>8}{'dec ms':>8}{'p50 ms':>8}{'p99 ms':>8}{'fps out':>9}"
              f"{'skipped':>9}{'p50 vs raw':>12}")
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        for kind in args.kinds:
            base: dict[str, Any] | None = None
            for codec in (["-"] if kind == "local" else args.codecs):
                r = run_row(kind, size, codec, args.fps, args.seconds, args.warmup, model_args)
                if codec == "raw":
                    base = r
                bw = (f"{base['link_mb_s'] / r['link_mb_s']:.1f}x" if base and r["link_mb_s"]
                      else "-")
                p50 = f"{r['p50'] / base['p50']:.2f}x" if base else "-"
                spec = codec if codec == "-" else LinkCodec.parse(codec).spec
                print(f"{NAMES[kind]:<14}{size:<11}{spec:<9}{_fmt(r['link_mb_s'], 10, 2)}"
                      f"{bw:>8}{_fmt(r['enc'], 8, 2)}{_fmt(r['dec'], 8, 2)}{r['p50']:>8.1f}"
                      f"{r['p99']:>8.1f}{r['fps_out']:>9.1f}{r['skipped']:>9}{p50:>12}",
                      flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["210x160", "480x640", "1080x1920"],
                   help="HxW")
    p.add_argument("--kinds", nargs="+", default=["local", "tcp"],
                   choices=["local", "tcp", "curve"])
    p.add_argument("--codecs", nargs="+", default=["raw", "zstd", "jpeg"],
                   help="--link-codec of the remote rows (raw first: the baseline)")
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--model-args", default="", help="model flags for every worker "
                   "(default: the shipped model)")
    p.add_argument("--codec-frames", type=int, default=30, help="frames per codec row")
    p.add_argument("--noise", type=float, default=0.0,
                   help="codec table: Gaussian noise sigma added to the frames")
    p.add_argument("--codecs-only", action="store_true", help="only the codec table")
    args = p.parse_args()
    for spec in args.codecs:
        try:
            LinkCodec.parse(spec)
        except ValueError as e:
            p.error(str(e))
    codec_table(args.sizes, args.codecs, args.fps, args.codec_frames, args.noise)
    if not args.codecs_only:
        e2e_table(args, shlex.split(args.model_args))


if __name__ == "__main__":
    main()
