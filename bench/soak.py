"""Soak benchmark: the full sidecar for minutes; does anything grow?

Starts ``launch.py`` with a real game (default Breakout), the demo agent, the recorder and
the shipped model, capture uncapped (``--fps 0``, realtime), and every ``--every`` seconds
samples each process's RSS and open file descriptors (``/proc``), the ``/dev/shm`` entries
and the frame -> ``iwm.surprise`` latency p99 at a subscriber over the last interval. Prints
every sample, then the first minute beside the last one. Issue 13's pass: RSS growth < 5 %,
fds and shm entries flat, p99 stable.

    python bench/soak.py                       # 10 minutes
    python bench/soak.py --minutes 2 --every 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from iwm_bus.bus import topics  # noqa: E402
from iwm_bus.bus.transport import Endpoints, Subscriber  # noqa: E402


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def _processes(run_dir: Path, launcher: int) -> dict[str, int]:
    try:
        info = json.loads((run_dir / "sidecar.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {"launcher": launcher}
    procs = {"launcher": launcher, **info.get("pids", {})}
    if info.get("standby_pid"):
        procs["standby"] = info["standby_pid"]
    return procs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="gym:ALE/Breakout-v5")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    args = p.parse_args()
    shm_before = len(os.listdir("/dev/shm"))
    with tempfile.TemporaryDirectory(prefix="iwmsoak", dir="/tmp") as tmp:
        run_dir = Path(tmp) / "run"
        sub = Subscriber([Endpoints.ipc(run_dir).worker], [topics.SURPRISE])
        cmd = [sys.executable, str(ROOT / "launch.py"), "--run-dir", str(run_dir), "--quiet",
               "--source", args.source, "--fps", "0", "--agent", "demo", "--record",
               str(Path(tmp) / "soak.mcap"), "--log-level", "WARNING"]
        proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL)
        samples = []
        try:
            t0 = time.monotonic()
            next_sample, end = t0 + args.every, t0 + args.minutes * 60
            lat: list[float] = []
            frames = 0
            print(f"# soak: {args.source}, demo agent, recorder, shipped model, fps uncapped, "
                  f"{args.minutes:g} min, a sample every {args.every:g} s")
            while time.monotonic() < end:
                if proc.poll() is not None:
                    raise RuntimeError(f"launch.py exited with {proc.returncode}")
                got = sub.recv(50)
                if got is not None:
                    lat.append((time.time_ns() - got[1]["t_capture_ns"]) / 1e6)
                    frames += 1
                if time.monotonic() < next_sample:
                    continue
                procs = _processes(run_dir, proc.pid)
                row = {"t": time.monotonic() - t0, "fps": frames / args.every,
                       "p99": float(np.percentile(lat, 99)) if lat else float("nan"),
                       "shm": len(os.listdir("/dev/shm")) - shm_before,
                       "rss": {n: _rss_mb(pid) for n, pid in procs.items()},
                       "fds": {n: _fds(pid) for n, pid in procs.items()}}
                samples.append(row)
                print(f"t={row['t']:6.0f}s fps={row['fps']:5.1f} p99={row['p99']:6.1f} ms "
                      f"shm+{row['shm']} rss " + " ".join(
                          f"{n}={v:.0f}" for n, v in row["rss"].items()) + " MB fds " +
                      " ".join(f"{n}={v}" for n, v in row["fds"].items()), flush=True)
                lat, frames, next_sample = [], 0, next_sample + args.every
        finally:
            proc.terminate()
            proc.wait(60)
            sub.close()
    per_min = max(1, int(60 / args.every))
    first, last = samples[1:1 + per_min], samples[-per_min:]  # sample 0: still starting
    if not first or not last:
        print("too short for a first-vs-last table")
        return 1
    print(f"\n{'':<22}{'first minute':>14}{'last minute':>14}{'change':>10}")

    def line(name: str, f: float, la: float, unit: str = "") -> None:
        ch = f"{100 * (la - f) / f:+.1f}%" if f else ""
        print(f"{name:<22}{f:>12.1f}{unit:<2}{la:>12.1f}{unit:<2}{ch:>10}")

    for n in last[-1]["rss"]:
        if all(n in s["rss"] for s in first + last):
            line(f"RSS {n}", np.median([s["rss"][n] for s in first]),
                 np.median([s["rss"][n] for s in last]), "MB")
    for n in last[-1]["fds"]:
        if all(n in s["fds"] for s in first + last):
            line(f"fds {n}", max(s["fds"][n] for s in first), max(s["fds"][n] for s in last))
    line("/dev/shm entries", max(s["shm"] for s in first), max(s["shm"] for s in last))
    line("p99 ms", np.median([s["p99"] for s in first]), np.median([s["p99"] for s in last]))
    line("fps out", np.median([s["fps"] for s in first]), np.median([s["fps"] for s in last]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
