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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import zmq

from iwm_bus.bus import topics, wire
from iwm_bus.bus.rundir import RunDir
from iwm_bus.bus.transport import Endpoints, Subscriber
from iwm_bus.config import flag, flags_of, to_dict
from iwm_bus.default_model import default_checkpoint
from launch import Launcher
from launch_config import SidecarConfig, config_from_args, parse_args
from workers.capture import CaptureConfig

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


@pytest.mark.timeout(300)  # its own waits (start, restart: 120 s each) decide, not the default
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


def test_a_warm_standby_takes_over_from_a_killed_worker():
    """issue 13: the launcher keeps a standby worker with the model loaded; when the worker
    is SIGKILLed the standby (not a new process) serves the stream, and a new standby is
    started after it."""
    with Sidecar("--source", "synthetic:64x64", "--fps", "20", "--duration", "180",
                 "--log-level", "DEBUG", *TINY) as sc:
        sc.collect(lambda m: len(m) >= 6, timeout=120)
        deadline = time.monotonic() + 120
        while "standby worker ready" not in sc.output():
            assert time.monotonic() < deadline, sc.output()[-3000:]
            time.sleep(0.2)
        info = sc.manifest()
        worker_pid, standby_pid = info["pids"]["worker"], info["standby_pid"]
        assert standby_pid not in (None, worker_pid)
        os.kill(worker_pid, signal.SIGKILL)
        t_kill = time.time_ns()
        resumed = sc.collect(lambda m: any(x["kind"] == "surprise" and x["surprise"] is not None
                                           and x["t_publish_ns"] > t_kill for x in m), 60)
        assert resumed
        info = sc.manifest()
        assert info["pids"]["worker"] == standby_pid and info["restarts"]["worker"] == 1
        assert "the standby took over (restart #1)" in sc.output()
        deadline = time.monotonic() + 120
        while sc.manifest().get("standby_pid") in (None, standby_pid):
            assert time.monotonic() < deadline, "no new standby after the takeover"
            time.sleep(0.2)
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
    (["--source", "synthetic", "--ring-slots", "1"], "--ring-slots: RingConfig.slots=1"),
    (["--source", "synthetic", "--threads", "999"], "--threads: WorkerConfig.threads=999"),
    # issue 13: a foreign file, a truncated checkpoint, another encoder / size than asked
    (["--source", "synthetic", "--model", "{tmp}/passwd"], "not a torch checkpoint"),
    (["--source", "synthetic", "--model", "{tmp}/cut.pt"], "truncated or corrupt"),
    (["--source", "synthetic", "--encoder", "vit_small_patch16_224"], "--encoder asks for"),
    (["--source", "synthetic", "--img-size", "96"], "--img-size asks for"),
    (["--source", "synthetic", "--precision", "int8", "--device", "cuda"],
     "--precision: WorkerConfig.precision='int8'"),
    # issue 30: --envs N
    (["--source", "synthetic", "--envs", "0"], "--envs: WorkerConfig.envs=0"),
    (["--source", "synthetic", "--envs", "-3"], "--envs: WorkerConfig.envs=-3"),
    (["--source", "screen", "--envs", "4"], "--envs 4: the screen cannot be duplicated"),
    (["--source", "synthetic", "--envs", "2", "--agent", "demo"], "--envs 2: --agent demo"),
])
def test_bad_input_exits_2_before_starting(args, needle, tmp_path):
    (tmp_path / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n" * 20)
    shipped = default_checkpoint()  # the cases without --model check against it, too
    assert shipped is not None, "the package ships iwm_bus/weights/default.pt"
    (tmp_path / "cut.pt").write_bytes(shipped.read_bytes()[:5000])
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
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
        info = sc.manifest()  # the config tree that runs: one mode, in capture and worker
        assert info["mode"] == info["capture"]["mode"] == info["worker"]["mode"] == "lossless"
        assert info["capture"]["frames"] == n and info["worker"]["img_size"] == 32
        os.kill(info["pids"]["worker"], signal.SIGKILL)
        msgs += sc.collect(lambda m: any(x["kind"] == "latent" and x["seq"] == n - 1
                                         for x in m), timeout=120)
        assert sc.wait(60) == 0, sc.output()
        latents = {m["seq"] for m in msgs if m["kind"] == "latent"}
        assert latents == set(range(n)), sorted(set(range(n)) - latents)
        assert "re-sending the notice" in sc.output()
        _assert_clean(sc)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _ring_has_header(name: str) -> bool:
    """The segment exists and its capture has written the header (a segment killed before
    that is blank, and reclaimed only once it is 10 s old): the magic, written last, is set."""
    try:
        with open(f"/dev/shm/{name}", "rb") as f:
            return any(f.read(8))
    except FileNotFoundError:
        return False


def _wait_for_ring(proc: subprocess.Popen, run_dir: Path) -> tuple[str, list[int]]:
    """Until the sidecar's manifest names a ring with a header: the ring and the child pids."""
    deadline = time.monotonic() + 120
    while not (run_dir / "sidecar.json").is_file() or not (
            ring := json.loads((run_dir / "sidecar.json").read_text()).get("ring")) or \
            not _ring_has_header(ring):
        assert proc.poll() is None and time.monotonic() < deadline, "sidecar did not start"
        time.sleep(0.2)
    return ring, list(json.loads((run_dir / "sidecar.json").read_text())["pids"].values())


def test_a_sigkilled_sidecars_ring_is_reclaimed(tmp_path):
    """issue 13: SIGKILL the whole sidecar (launcher, capture, worker): its ring stays in
    /dev/shm; ``--cleanup`` removes it and the run dir's leftovers, saying so in one line,
    and leaves a live sidecar's ring alone."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "launch.py"), "--run-dir", str(run_dir), "--quiet",
           "--source", "synthetic:32x32", *TINY, "--duration", "300"]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ring, children = _wait_for_ring(proc, run_dir)
        pids = [proc.pid, *children]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    deadline = time.monotonic() + 30  # orphaned children are reaped by init, not by us
    while any(_alive(p) for p in pids):
        assert time.monotonic() < deadline, f"processes {pids} outlived SIGKILL"
        time.sleep(0.1)
    assert Path(f"/dev/shm/{ring}").exists(), "SIGKILL cannot unlink: the ring must be left"
    out = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--run-dir", str(run_dir),
                          "--cleanup"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert not Path(f"/dev/shm/{ring}").exists()
    assert "reclaimed 1 ring(s)" in out.stderr and ring in out.stderr, out.stderr
    assert "cleaned run dir" in out.stderr
    assert not (run_dir / "sidecar.json").exists()


def test_children_of_a_sigkilled_launcher_stop_and_clean_up(tmp_path):
    """SIGKILL of the launcher alone: its children notice the orphaning and stop as on
    SIGTERM (nothing keeps a core busy), and the capture unlinks its ring on the way out."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "launch.py"), "--run-dir", str(run_dir), "--quiet",
           "--source", "synthetic:32x32", *TINY, "--no-standby", "--duration", "300"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        ring, children = _wait_for_ring(proc, run_dir)
    finally:
        proc.kill()
        proc.wait(30)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in children):
        assert time.monotonic() < deadline, f"children {children} outlived their launcher"
        time.sleep(0.1)
    assert not Path(f"/dev/shm/{ring}").exists(), "the capture left its ring"


def test_one_log_format_short_tracebacks_and_no_variable_values():
    """issue 13: every process logs ``time level process message``; an exception is one
    line below DEBUG, a traceback at DEBUG, and never with variable values."""
    code = r"""
import sys
from loguru import logger
from workers.entry import setup_logging
setup_logging(sys.argv[1], "worker")
def load(secret_path):
    return {}["x" + secret_path]
try:
    load("hunter2-value")
except KeyError:
    logger.exception("model load failed")
logger.info("still here")
"""
    runs = {lvl: subprocess.run([sys.executable, "-c", code, lvl], cwd=ROOT, text=True,
                                capture_output=True, timeout=60).stderr for lvl in ("INFO", "DEBUG")}
    lines = runs["INFO"].strip().splitlines()
    assert len(lines) == 2, runs["INFO"]
    assert " ERROR   worker    model load failed [KeyError: 'xhunter2-value']" in lines[0]
    assert " INFO    worker    still here" in lines[1]
    assert "Traceback" in runs["DEBUG"] and "in load" in runs["DEBUG"]
    # the exception's own message may name it; loguru's variable annotations must not
    assert runs["DEBUG"].count("hunter2-value") == runs["INFO"].count("hunter2-value") == 1


@pytest.mark.games
@pytest.mark.timeout(400)
def test_killing_each_process_in_turn_during_a_recorded_lossless_replay(tmp_path):
    """issue 13: SIGKILL the demo agent, the recorder and the worker in turn while a real
    game is played lossless with --record: the rest keeps working (every frame is still
    published once the worker is back), the launcher reports each death and exits 1 (the
    recording is incomplete), the partial recording opens, nothing is left behind. Then
    SIGKILL the capture of another run: the launcher stops everything and cleans up. (The
    demo agent cannot drive a replay, whose actions are recorded: a game it is.)"""
    pytest.importorskip("ale_py")
    from iwm_bus.session import SessionReader

    rec = tmp_path / "rec.mcap"
    with Sidecar("--source", "gym:ALE/Pong-v5", "--mode", "lossless", "--frames", "240",
                 "--fps", "20", "--agent", "demo", "--record", str(rec), *TINY) as sc:
        msgs = sc.collect(lambda m: sum(x["kind"] == "latent" for x in m) >= 10, 120)
        for name in ("agent", "recorder", "worker"):
            os.kill(sc.manifest()["pids"][name], signal.SIGKILL)
            # 40 more frames (2 s) between kills: the recording has complete chunks by then
            msgs += sc.collect(lambda m: sum(x["kind"] == "latent" for x in m) >= 40, 120)
        msgs += sc.collect(lambda m: any(x["kind"] == "latent" and x["seq"] == 239
                                         for x in m), 180)
        assert sc.wait(120) == 1, sc.output()[-3000:]
        out = sc.output()
        assert "demo agent exited" in out and "recorder died" in out and "restart #1" in out
        latents = {m["seq"] for m in msgs if m["kind"] == "latent"}
        assert latents == set(range(240)), sorted(set(range(240)) - latents)
        _assert_clean(sc)
    got = SessionReader(rec)
    assert 10 <= sum(1 for _ in got.frame_records()) < 240
    meta = got.metadata  # the recording carries the tree it was made with
    assert meta["mode"] == meta["capture"]["mode"] == meta["worker"]["mode"] == "lossless"
    assert meta["source"]["spec"] == "gym:ALE/Pong-v5" and meta["agent"]["repeat"] == 4

    with Sidecar("--source", "synthetic:64x64", "--fps", "20", "--duration", "180",
                 *TINY) as sc:
        sc.collect(lambda m: len(m) >= 3, 120)
        os.kill(sc.manifest()["pids"]["capture"], signal.SIGKILL)
        assert sc.wait(60) == 1
        assert "capture ended" in sc.output()
        _assert_clean(sc)


# ----------------------------------------------------------------------------- the config tree


def _field(cfg, path):
    for name in path:
        cfg = getattr(cfg, name)
    return cfg


#: a valid value for the flags that need one (any other takes 3, 2.5, "x" or /tmp/p)
SAMPLES = {"--device": "cuda:1", "--img-size": "32", "--ring-slots": "4", "--stream": "semantic",
           "--viewer": "save:/tmp/v.rrd"}


def test_every_flag_of_the_tree_sets_its_field():
    """Each field with a flag is reachable from the command line, at its place in the tree."""
    flags = flags_of(SidecarConfig)
    assert {"--mode", "--fps", "--ring-slots", "--model", "--patches", "--run-dir", "--record",
            "--viewer", "--stream"} <= {f.name for f in flags}
    for fl in flags:
        extra = ["--dual"] if fl.name == "--semantic-model" else []
        extra += ["--worker-only", "--connect", "h:5570"] if fl.name == "--stream" else []
        if fl.kind is bool:
            argv, want = [fl.name], True
        else:
            text = SAMPLES.get(fl.name) or (fl.argparse_kwargs.get("choices") or [None])[-1] or {
                int: "3", float: "2.5", str: "x"}.get(fl.kind, "/tmp/p")
            argv, want = [fl.name, text], fl.kind(text)
        cfg = config_from_args(parse_args(["--source", "synthetic", *argv, *extra]), env={})
        assert _field(cfg, fl.path) == want, (fl.name, fl.path)


@dataclass
class NewCapture(CaptureConfig):
    jitter: float = field(default=0.0, metadata=flag("--jitter", "a new knob"))


@dataclass
class NewTree(SidecarConfig):
    capture: NewCapture | None = field(default_factory=NewCapture, metadata={"group": "source"})


def test_a_field_added_to_a_part_gets_its_flag():
    fl = {f.name: f for f in flags_of(NewTree)}["--jitter"]
    assert fl.path == ("capture", "jitter") and fl.group == "source" and fl.kind is float
    assert {f.name for f in flags_of(NewTree)} == {f.name for f in flags_of(SidecarConfig)} | {
        "--jitter"}


def test_the_tree_hands_its_one_mode_to_capture_and_worker():
    from iwm_bus.config import WorkerConfig

    cfg = SidecarConfig(mode="lossless", capture=CaptureConfig(mode="realtime"),
                        worker=WorkerConfig(mode="realtime"))
    assert cfg.capture.mode == cfg.worker.mode == "lossless"
    assert SidecarConfig().capture.mode == SidecarConfig().worker.mode == "realtime"
    for argv, mode in [([], "realtime"), (["--mode", "lossless"], "lossless")]:
        cfg = config_from_args(parse_args(["--source", "synthetic", *argv]), env={})
        assert cfg.mode == cfg.capture.mode == cfg.worker.mode == mode
    worker_only = config_from_args(parse_args(["--worker-only", "--connect", "h:5570", "--mode",
                                               "lossless"]), env={})
    assert worker_only.capture is None and worker_only.worker.mode == "lossless"


def test_flags_build_the_tree_as_the_launcher_always_did(tmp_path):
    cfg = config_from_args(parse_args([]), env={"IWM_DEVICE": "cuda:0"})
    assert cfg.capture.source == "gym:ALE/Breakout-v5" and cfg.agent is not None
    assert cfg.capture.fps == 30.0 and cfg.capture.ring.max_height == 1080
    assert cfg.worker.device == "cuda:0" and cfg.recorder is None and cfg.viewer is None
    (tmp_path / "s.mcap").write_bytes(b"")  # the spec check only asks that it exists
    cfg = config_from_args(parse_args(
        ["--source", f"replay:{tmp_path}/s.mcap", "--rate", "0", "--start", "1.5", "--max-frame",
         "64x48", "--record", str(tmp_path / "r.mcap"), "--viewer", "--device", "cpu"]),
        env={"IWM_DEVICE": "cuda:0"})
    assert cfg.capture.fps == 0.0 and cfg.capture.options == {"start": 1.5, "progress": True}
    assert (cfg.capture.ring.max_height, cfg.capture.ring.max_width) == (64, 48)
    assert cfg.recorder.path == tmp_path / "r.mcap" and cfg.viewer.spec == "spawn"
    assert cfg.agent is None and cfg.worker.device == "cpu"  # a flag beats the environment


def test_a_bad_value_names_its_flag_but_not_one_the_environment_set():
    with pytest.raises(ValueError, match=r"^--device: WorkerConfig.device='gpu': "):
        config_from_args(parse_args(["--device", "gpu"]), env={})
    with pytest.raises(ValueError, match=r"^WorkerConfig.device='gpu': "):
        config_from_args(parse_args([]), env={"IWM_DEVICE": "gpu"})


def test_sidecar_json_and_the_recording_metadata_are_the_tree(tmp_path):
    args = parse_args(["--run-dir", str(tmp_path / "run"), "--source", "synthetic:32x24",
                       "--mode", "lossless", "--frames", "7", "--record", str(tmp_path / "r.mcap"),
                       "--agent", "demo", *TINY])
    launcher = Launcher(args)
    launcher.headers = []
    launcher._check_source()  # probes the frame shape and action space
    tree = json.loads(json.dumps(to_dict(launcher.cfg)))
    assert set(tree) == {"mode", "capture", "worker", "bus", "recorder", "viewer", "agent"}
    with launcher.run_dir:
        launcher.write_manifest()
        manifest = launcher.run_dir.read_manifest()
    assert {k: manifest[k] for k in tree} == tree
    assert manifest["frame_shape"] == [24, 32, 3] and manifest["source"] == "synthetic:32x24"
    assert manifest["capture"]["frames"] == 7 and manifest["worker"]["mode"] == "lossless"
    meta = launcher.recording_metadata()
    assert {k: meta[k] for k in tree if k != "source"} == tree
    assert meta["source"] == {"spec": "synthetic:32x24", "action_space": launcher.action_space}


def test_the_worker_command_takes_the_launchers_worker_flags(monkeypatch):
    import workers.encoder as encoder

    got = {}
    monkeypatch.setattr(encoder, "run_worker",
                        lambda cfg, eps, ring: got.update(cfg=cfg, eps=eps, ring=ring) or 0)
    monkeypatch.delenv("IWM_DEVICE", raising=False)
    assert encoder.main(["--ring", "iwm_r", "--run-dir", "/tmp/iwmw", "--mode", "lossless",
                         "--patches", "--threads", "2", "--untrained"]) == 0
    cfg = got["cfg"]
    assert (cfg.mode, cfg.publish_patches, cfg.threads, cfg.untrained) == ("lossless", True, 2,
                                                                           True)
    assert got["ring"] == "iwm_r" and got["eps"].worker == "ipc:///tmp/iwmw/worker.sock"
    assert encoder.main(["--ring", "r", "--publish-patches"]) == 0  # its former flag name
    assert got["cfg"].publish_patches
    with pytest.raises(SystemExit):  # a bad value: one usage error naming the flag
        encoder.main(["--ring", "r", "--threads", "999"])


def test_a_promoted_standby_keeps_its_takeover_value_while_it_runs(monkeypatch):
    """The launcher tells a standby to take over by storing the restart count in a shared
    value. If the launcher let go of that value, the next standby's (made 5 s later, -1)
    would reuse its memory, and a standby still warming up then (a slow machine) would wait
    for ever: the worker SIGKILL test saw no worker for 120 s."""
    import ctypes
    import gc
    import types

    import multiprocess as mp

    from launch import Child

    ctx = mp.get_context("spawn")
    alive = types.SimpleNamespace(is_alive=lambda: True, exitcode=-9, pid=1)
    launcher = Launcher.__new__(Launcher)
    launcher.worker = Child("worker", "x", (), restart=True, proc=alive)
    launcher.standby = Child("standby", "x", (), proc=alive,
                             kwargs={"takeover": ctx.Value("i", -1)})
    monkeypatch.setattr(launcher, "write_manifest", lambda: None)
    told = launcher.standby.kwargs["takeover"]
    address = ctypes.addressof(told.get_obj())
    del told
    assert launcher._take_over(launcher.worker)
    assert launcher.standby is None and launcher.worker.restarts == 1
    gc.collect()
    nxt = ctx.Value("i", -1)  # the next standby's, as _keep_standby makes it
    assert ctypes.addressof(nxt.get_obj()) != address  # not the promoted one's memory
    assert launcher.worker.takeover.value == 1


def test_envs_starts_n_captures_and_one_batched_worker():
    """issue 30: ``--envs 3``: three captures (each its own ring, seed and env index), one
    worker; lossless, every frame of every stream arrives once, told apart by ``env``."""
    with Sidecar("--source", "synthetic:64x64", "--envs", "3", "--mode", "lossless",
                 "--frames", "12", "--no-standby", "--threads", "1", *TINY,
                 sub_topics=(topics.SURPRISE,)) as sc:
        man = sc.manifest(timeout=120)
        assert len(man["rings"]) == 3 and man["worker"]["envs"] == 3
        assert sorted(man["pids"]) == ["capture.e0", "capture.e1", "capture.e2", "worker"]
        msgs = sc.collect(lambda m: len(m) >= 36, timeout=240)
        assert sc.wait(120) == 0, sc.output()[-3000:]
    got = Counter((m["env"], m["seq"]) for m in msgs)
    assert sorted(got) == [(e, s) for e in range(3) for s in range(12)]
    assert set(got.values()) == {1}
    first = {m["env"]: m for m in msgs if m["seq"] == 0}
    assert all(first[e]["surprise"] is None for e in range(3))
