"""Worker recovery benchmark: SIGKILL the serving worker, time until surprise flows again.

Starts the real sidecar (``launch.py``, shipped model, a 30 fps source, realtime) and
subscribes to ``iwm.surprise``; then, ``--kills`` times, SIGKILLs the worker named in
``sidecar.json`` and measures, at the subscriber, the time from the kill to the next
``iwm.surprise`` message and to the next one with a surprise value (the first frame of a
new worker has no prediction yet). Rows: with the warm standby worker (the default) and
``--no-standby`` (a fresh process: backoff, interpreter, torch import, model load), same
run. Issue 13 target: <= 2 s on CPU.

    python bench/recovery.py
    python bench/recovery.py --source gym:ALE/Breakout-v5 --kills 5
    python bench/recovery.py --device cuda      # the GPU figure (CUDA graphs captured anew)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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


def _manifest(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "sidecar.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _wait(sub: Subscriber, proc: subprocess.Popen, until: float,
          after_ns: int = 0) -> tuple[float, float]:
    """Monotonic times of the next surprise message published after ``after_ns`` (wall
    clock, the bus's) and of the next non-nil one."""
    first = valued = None
    while time.monotonic() < until and valued is None:
        if proc.poll() is not None:
            raise RuntimeError(f"launch.py exited with {proc.returncode}")
        got = sub.recv(20)
        if got is None or got[1]["kind"] != "surprise" or got[1]["t_publish_ns"] <= after_ns:
            continue
        now = time.monotonic()
        first = first if first is not None else now
        if got[1]["surprise"] is not None:
            valued = now
    if valued is None:
        raise TimeoutError("no surprise after the kill")
    return first, valued


def run(source: str, standby: bool, kills: int, settle: float,
        device: str = "cpu") -> list[tuple[float, float]]:
    with tempfile.TemporaryDirectory(prefix="iwmrec", dir="/tmp") as tmp:
        run_dir = Path(tmp) / "run"
        sub = Subscriber([Endpoints.ipc(run_dir).worker], [topics.SURPRISE])
        cmd = [sys.executable, str(ROOT / "launch.py"), "--run-dir", str(run_dir), "--quiet",
               "--source", source, "--agent", "none", "--log-level", "WARNING",
               "--device", device, *([] if standby else ["--no-standby"])]
        proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL)
        out = []
        try:
            _wait(sub, proc, time.monotonic() + 300)
            for _ in range(kills):
                time.sleep(settle)  # a new standby is started and loaded meanwhile
                pid = _manifest(run_dir)["pids"]["worker"]
                t_kill, t_kill_ns = time.monotonic(), time.time_ns()
                os.kill(pid, signal.SIGKILL)
                first, valued = _wait(sub, proc, t_kill + 120, t_kill_ns)
                out.append((first - t_kill, valued - t_kill))
        finally:
            proc.terminate()
            proc.wait(60)
            sub.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="synthetic:160x210")
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--settle", type=float, default=15.0,
                   help="seconds of normal running before each kill")
    p.add_argument("--device", default="cpu", help="the worker's: cpu | cuda | cuda:N")
    args = p.parse_args()
    print(f"# worker SIGKILL -> next iwm.surprise at a subscriber, shipped model, {args.source}"
          f" realtime 30 fps, {args.device}, {args.kills} kills each (target <= 2 s on CPU)")
    header = f"{'worker restart':<24}{'first msg p50 s':>16}{'surprise p50 s':>16}{'max s':>8}"
    print(header)
    print("-" * len(header))
    rows = {}
    for name, standby in (("warm standby (default)", True), ("new process", False)):
        times = np.array(run(args.source, standby, args.kills, args.settle, args.device))
        rows[name] = times
        print(f"{name:<24}{np.median(times[:, 0]):>16.2f}{np.median(times[:, 1]):>16.2f}"
              f"{times[:, 1].max():>8.2f}", flush=True)
    a, b = (np.median(rows[n][:, 1]) for n in rows)
    print(f"standby / new process: {a / b:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
