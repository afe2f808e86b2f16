"""End-to-end tests of iwm-launch: real processes, real shared memory, real sockets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zmq

from iwm_bus import topics, wire
from iwm_bus.rundir import RunDir
from iwm_bus.transport import Endpoints, Subscriber

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--untrained", "--encoder", "vit_tiny_patch16_224", "--img-size", "32"]


class Sidecar:
    """``iwm-launch`` in a subprocess, with a subscriber connected before it starts."""

    def __init__(self, *args: str, sub_topics=(topics.LATENT, topics.SURPRISE, topics.MRR)):
        self._tmp = tempfile.TemporaryDirectory(prefix="iwmt", dir="/tmp")
        self.run_dir = Path(self._tmp.name) / "run"
        self.eps = Endpoints.ipc(self.run_dir)
        self.sub = Subscriber([self.eps.worker], sub_topics)
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "launch.py"), "--run-dir", str(self.run_dir),
             "--quiet", *args], cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def manifest(self, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = RunDir(self.run_dir).read_manifest(missing_ok=True)
            if data and "pids" in data:
                return data
            time.sleep(0.1)
        raise TimeoutError(f"no manifest in {self.run_dir}\n{self.output()}")

    def collect(self, until, timeout: float) -> list[dict]:
        """Messages until ``until(msgs)`` is true, or fail after ``timeout`` seconds."""
        msgs: list[dict] = []
        deadline = time.monotonic() + timeout
        while not until(msgs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"gave up after {timeout}s with {len(msgs)} messages\n"
                                   f"{self.output()[-3000:]}")
            got = self.sub.recv(200)
            if got is not None:
                msgs.append(got[1])
        return msgs

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"iwm-launch did not exit in {timeout}s\n{self.output()}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.wait(30)
        self.sub.close()
        self.log.close()
        self._tmp.cleanup()

    def __enter__(self) -> Sidecar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shm_of(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"iwm_{pid}_")]


def _assert_clean(sc: Sidecar) -> None:
    assert _shm_of(sc.proc.pid) == [], "shared memory left behind"
    left = list(sc.run_dir.iterdir()) if sc.run_dir.exists() else []
    assert left == [], f"files left in the run dir: {left}"


def test_lossless_every_seq_once_and_clean_exit():
    n = 24
    with Sidecar("--source", "synthetic:64x64", "--mode", "lossless", "--frames", str(n),
                 "--fps", "0", *TINY) as sc:
        msgs = sc.collect(lambda m: len(m) >= 3 * n, timeout=120)
        assert sc.wait(60) == 0, sc.output()
        for kind in ("latent", "surprise", "mrr"):
            seqs = Counter(m["seq"] for m in msgs if m["kind"] == kind)
            assert sorted(seqs) == list(range(n)), (kind, sorted(seqs))
            assert set(seqs.values()) == {1}, f"{kind} duplicated: {seqs}"
        surprises = {m["seq"]: m["surprise"] for m in msgs if m["kind"] == "surprise"}
        assert surprises[0] is None
        assert all(np.isfinite(surprises[s]) for s in range(1, n))
        latent = next(m for m in msgs if m["kind"] == "latent")
        assert latent["z_cls"].shape == (192,) and latent["z_cls"].dtype == np.float32
        _assert_clean(sc)


def test_sigterm_exits_zero_and_leaves_nothing():
    with Sidecar("--source", "synthetic:64x64", "--fps", "15", "--duration", "120",
                 *TINY) as sc:
        sc.collect(lambda m: len(m) >= 6, timeout=120)
        sc.proc.send_signal(signal.SIGTERM)
        assert sc.wait(30) == 0, sc.output()
        _assert_clean(sc)


def test_worker_sigkill_is_restarted_and_capture_keeps_going():
    with Sidecar("--source", "synthetic:64x64", "--fps", "20", "--duration", "180",
                 *TINY) as sc:
        frames = Subscriber([sc.eps.capture], [topics.FRAME])
        try:
            sc.collect(lambda m: len(m) >= 6, timeout=120)
            worker_pid = sc.manifest()["pids"]["worker"]
            os.kill(worker_pid, signal.SIGKILL)
            t_kill = time.monotonic()
            # capture never blocks: frame notices keep arriving while the worker is down
            notices = []
            while time.monotonic() - t_kill < 3.0:
                got = frames.recv(500)
                assert got is not None, "capture stopped publishing while the worker was down"
                notices.append(got[1]["seq"])
            assert notices == sorted(notices) and len(notices) >= 20
            # the stream resumes from a new worker process
            resumed = sc.collect(lambda m: any(x["seq"] > notices[-1] for x in m
                                               if x["kind"] == "latent"), timeout=120)
            assert resumed
            info = sc.manifest()
            assert info["pids"]["worker"] != worker_pid
            assert info["restarts"]["worker"] == 1
            assert "restart #1" in sc.output()
        finally:
            frames.close()
        sc.proc.send_signal(signal.SIGTERM)
        assert sc.wait(30) == 0
        _assert_clean(sc)


def test_garbage_on_action_and_rpc_does_not_stop_the_worker():
    with Sidecar("--source", "synthetic:64x64", "--fps", "20", "--duration", "180",
                 *TINY) as sc:
        sc.collect(lambda m: len(m) >= 3, timeout=120)
        ctx = zmq.Context.instance()
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.bind(sc.eps.agent)
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(sc.eps.rpc)
        try:
            time.sleep(0.5)
            rng = np.random.default_rng(0)
            for _ in range(50):
                pub.send_multipart([b"agent.action", rng.bytes(int(rng.integers(0, 200)))])
                pub.send_multipart([b"agent.action", wire.pack(topics.STATS, {
                    "t_ns": 1, "source": "x", "values": {}})[1]])
                dealer.send_multipart([rng.bytes(int(rng.integers(0, 64)))
                                       for _ in range(int(rng.integers(1, 4)))])
            dealer.send_multipart(wire.pack(topics.RPC, {
                "kind": "rpc_request", "id": 7, "method": "predict",
                "params": {"z_cls": np.zeros(5, np.float32)}}))
            replies = []
            while dealer.poll(5000):
                topic, msg = wire.unpack(dealer.recv_multipart())
                replies.append(msg)
                if msg["id"] == 7:
                    break
            assert replies and replies[-1]["id"] == 7 and not replies[-1]["ok"]
            assert "z_cls" in replies[-1]["error"]
            last = sc.collect(lambda m: len(m) >= 1, timeout=30)[-1]["seq"]
            later = sc.collect(lambda m: any(x["seq"] > last + 3 for x in m), timeout=60)
            assert later
            assert sc.proc.poll() is None
        finally:
            pub.close(0)
            dealer.close(0)


@pytest.mark.parametrize("args, needle", [
    (["--source", "bogus:thing"], "bogus"),
    (["--source", "synthetic", "--model", "/nonexistent/ckpt.pt"], "/nonexistent/ckpt.pt"),
    (["--source", "synthetic:64x64", "--max-frame", "32x32"], "larger than the ring"),
    (["--source", "synthetic", "--frames", "0"], "--frames"),
])
def test_bad_input_exits_2_before_starting(args, needle, tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--run-dir", str(run_dir),
                          *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr
    assert not run_dir.exists(), "bad input must fail before anything starts"


def test_busy_run_dir_exits_2(tmp_path):
    run_dir = tmp_path / "run"
    with RunDir(run_dir) as held:
        held.write_manifest({"note": "held by the test"})
        out = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--run-dir",
                              str(run_dir), "--source", "synthetic"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2
        assert "in use by another sidecar" in out.stderr
        assert json.loads((run_dir / "sidecar.json").read_text())["note"] == "held by the test"


@pytest.mark.games
def test_real_game_through_the_whole_pipe():
    pytest.importorskip("ale_py")
    n = 16
    with Sidecar("--source", "gym:ALE/Pong-v5", "--mode", "lossless", "--frames", str(n),
                 "--fps", "0", *TINY) as sc:
        msgs = sc.collect(lambda m: len(m) >= 3 * n, timeout=180)
        assert sc.wait(60) == 0, sc.output()
        surprise = sorted((m for m in msgs if m["kind"] == "surprise"), key=lambda m: m["seq"])
        assert [m["seq"] for m in surprise] == list(range(n))
        # the game knows which action produced each frame, and the worker predicted with it
        assert all(m["action"] is not None and "action_id" in m["action"]
                   for m in surprise[1:])
        _assert_clean(sc)


def test_lossless_resumes_after_the_worker_is_killed():
    """Capture blocks on credits while the worker is down; the restarted worker gets the oldest
    unprocessed notice again and the run completes with every frame published."""
    n = 40
    with Sidecar("--source", "synthetic:64x64", "--mode", "lossless", "--frames", str(n),
                 "--fps", "20", *TINY) as sc:
        msgs = sc.collect(lambda m: sum(x["kind"] == "latent" for x in m) >= 5, timeout=120)
        os.kill(sc.manifest()["pids"]["worker"], signal.SIGKILL)
        msgs += sc.collect(lambda m: any(x["kind"] == "latent" and x["seq"] == n - 1
                                         for x in m), timeout=120)
        assert sc.wait(60) == 0, sc.output()
        latents = {m["seq"] for m in msgs if m["kind"] == "latent"}
        assert latents == set(range(n)), sorted(set(range(n)) - latents)
        assert "re-sending the notice" in sc.output()
        _assert_clean(sc)
