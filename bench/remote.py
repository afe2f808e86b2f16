"""Remote worker benchmark: frame -> surprise latency with the worker local vs behind a gateway.

Rows, same source, model and rate, one after another in this run:

* local:        ``iwm-launch`` with its own worker (shared-memory ring, ipc sockets)
* remote tcp:   ``--remote-worker`` gateway on 127.0.0.1 + ``--worker-only --connect``
                (frames travel inline: ring read, pack, tcp, unpack; results and RPC back)
* remote CURVE: the same with ``--keys`` (CurveZMQ encryption and authentication)

Latency is from the frame's capture stamp to a subscriber on the game machine's run dir
receiving its ``iwm.surprise`` (one machine, one clock). Over loopback this measures what the
remote path itself costs (copies, serialisation, encryption, the tcp stack); a real network
adds its round trip.

    python bench/remote.py                         # 210x160 and 480x640 at 30 fps, 20 s a row
    python bench/remote.py --sizes 210x160 --seconds 30 --model-args "--untrained --encoder vit_tiny_patch16_224 --img-size 64"
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from iwm_bus.bus import topics  # noqa: E402
from iwm_bus.bus.security import make_keys  # noqa: E402
from iwm_bus.bus.transport import Endpoints, Subscriber  # noqa: E402

LAUNCH = [sys.executable, str(ROOT / "launch.py"), "--no-standby", "--log-level", "WARNING"]


def _free_port() -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import find_free_port

    return find_free_port(3)


def run_row(kind: str, size: str, fps: float, seconds: float, warmup: float,
            model_args: list[str]) -> dict:
    """One sidecar run of ``kind`` (local / tcp / curve); latency percentiles (ms) etc."""
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
        game += ["--remote-worker", str(port), *keys]
        procs.append(subprocess.Popen([*LAUNCH, "--worker-only", "--connect", str(port), *keys,
                                       *model_args], cwd=ROOT, stderr=subprocess.DEVNULL))
    procs.append(subprocess.Popen(game, cwd=ROOT, stderr=subprocess.DEVNULL))
    sub = Subscriber([Endpoints.ipc(run_dir).worker], [topics.SURPRISE])
    lat: list[float] = []
    seqs: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while not sub.recv(200):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"{kind}: no surprise (a process exited or 300 s passed)")
        t_measure = time.monotonic() + warmup
        t_end = t_measure + seconds
        while time.monotonic() < t_end:
            got = sub.recv(200)
            now_ns = time.time_ns()
            if got is None or got[0] != topics.SURPRISE or time.monotonic() < t_measure:
                continue
            lat.append((now_ns - got[1]["t_capture_ns"]) / 1e6)
            seqs.append(got[1]["seq"])
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(60)
        sub.close()
        tmp.cleanup()
    span = max(seqs) - min(seqs) + 1
    return {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "fps_out": len(lat) / seconds, "skipped": span - len(set(seqs))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["210x160", "480x640"], help="HxW")
    p.add_argument("--kinds", nargs="+", default=["local", "tcp", "curve"])
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--model-args", default="", help="model flags for every worker "
                   "(default: the shipped model)")
    args = p.parse_args()
    model_args = shlex.split(args.model_args)
    print(f"# frame -> surprise at the game machine, {args.fps:g} fps realtime, "
          f"{args.seconds:g} s a row, model {args.model_args or 'shipped default'}; "
          "remote rows over loopback tcp")
    header = (f"{'worker':<14}{'frame':<10}{'p50 ms':>8}{'p99 ms':>9}{'fps out':>9}"
              f"{'skipped':>9}{'p50 vs local':>14}")
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        base = None
        for kind in args.kinds:
            r = run_row(kind, size, args.fps, args.seconds, args.warmup, model_args)
            base = r["p50"] if kind == "local" else base
            ratio = f"{r['p50'] / base:.2f}x" if base else ""
            name = {"local": "local", "tcp": "remote tcp", "curve": "remote CURVE"}[kind]
            print(f"{name:<14}{size:<10}{r['p50']:>8.1f}{r['p99']:>9.1f}{r['fps_out']:>9.1f}"
                  f"{r['skipped']:>9}{ratio:>14}", flush=True)


if __name__ == "__main__":
    main()
