"""Recorder and replay through real processes: capture, encoder worker, recorder.

Records a synthetic session (and a real ALE Pong one, marked ``games``), replays it lossless
through a real capture and a real worker (every seq processed exactly once, the same surprise
series twice), paces a replay at ``rate=2``, and checks that the recorder counts the frames it
missed and survives SIGTERM (clean file) and SIGKILL (readable prefix).
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from iwm_bus.bus import topics
from iwm_bus.bus.ring import FrameRing
from iwm_bus.bus.transport import Endpoints, Subscriber
from iwm_bus.config import RingConfig, WorkerConfig
from iwm_bus.errors import SessionError
from iwm_bus.session import SessionReader, SessionWriter, recover
from workers.capture import CaptureConfig, run_capture
from workers.recorder import RecorderConfig, run_recorder
from workers.sources import SourceError, SyntheticSource, open_source
from workers.sources.replay import ReplaySource

pytestmark = pytest.mark.timeout(120)
N_FRAMES = 36
SYNTH = "synthetic:64x48"
JOIN_S = 30.0


# ---------------------------------------------------------------- the rig


@dataclass
class RunResult:
    """What one sidecar run produced, as seen from the test process."""

    capture_exit: int | None
    recorder_exit: int | None = None
    # worker surprise messages in arrival order
    surprises: list[dict[str, Any]] = field(default_factory=list)
    # (monotonic arrival time, iwm.frame notice)
    notices: list[tuple[float, dict[str, Any]]] = field(default_factory=list)

    def surprise_series(self) -> list[tuple[int, float | None]]:
        return [(m["seq"], m["surprise"]) for m in self.surprises]


def _wait(cond: Callable[[], bool], what: str, timeout: float, pump: Callable[[], None]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        pump()


def _stop(proc: mp.Process, sig: int = signal.SIGTERM) -> int | None:
    if proc.is_alive():
        os.kill(proc.pid, sig)
    proc.join(JOIN_S)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
    return proc.exitcode


def run_sidecar(capture: CaptureConfig, *, worker: WorkerConfig | None = None,
                recorder: RecorderConfig | None = None,
                during: Callable[[mp.Process, RunResult], None] | None = None) -> RunResult:
    """Start recorder, worker (wait until ready), capture; run the capture to its end.

    Lossless runs wait until the worker published a surprise for every notice. Then the
    recorder and the worker get SIGTERM. ``during(recorder_proc, result)`` runs once frames
    flow. Everything is stopped and removed on every path.
    """
    ctx = mp.get_context("spawn")
    run_dir = Path(tempfile.mkdtemp(prefix="iwr", dir="/tmp"))
    eps = Endpoints.ipc(run_dir)
    ring = f"iwmr_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    col = Subscriber([eps.worker, eps.capture], [topics.SURPRISE, topics.STATS, topics.FRAME])
    procs: list[mp.Process] = []
    res = RunResult(capture_exit=None)
    stats_seen: list[dict[str, Any]] = []

    def pump(timeout_ms: int = 20) -> None:
        got = col.recv(timeout_ms)
        while got is not None:
            topic, msg = got
            if topic == topics.SURPRISE:
                res.surprises.append(msg)
            elif topic == topics.FRAME:
                res.notices.append((time.monotonic(), msg))
            elif msg["source"] == "worker":
                stats_seen.append(msg)
            got = col.recv(0)

    def spawn(target: Callable[..., Any], *args: Any) -> mp.Process:
        proc = ctx.Process(target=target, args=args, daemon=True)
        proc.start()
        procs.append(proc)
        return proc

    try:
        wproc = rproc = None
        if recorder is not None:  # first: connected before the worker and the capture bind
            rproc = spawn(_recorder_entry, recorder, eps, ring)
            _wait(lambda: recorder.path.exists() or not rproc.is_alive(), "the recorder", 30,
                  pump)
            time.sleep(0.3)  # its subscriptions are on their way
        if worker is not None:
            wproc = spawn(_worker_entry, worker, eps, ring)
            _wait(lambda: bool(stats_seen) or not wproc.is_alive(), "the worker", 90, pump)
            assert wproc.is_alive(), f"worker exited with {wproc.exitcode}"
        cproc = spawn(_capture_entry, capture, eps, ring)
        if during is not None:
            _wait(lambda: len(res.notices) >= 10 or not cproc.is_alive(), "frames", 60, pump)
            during(rproc, res)
        _wait(lambda: not cproc.is_alive(), "the end of the capture", 60, pump)
        res.capture_exit = cproc.exitcode
        if worker is not None and capture.mode == "lossless":
            last = max((m["seq"] for _, m in res.notices), default=-1)
            _wait(lambda: any(m["seq"] == last for m in res.surprises), "the last surprise",
                  30, pump)
        pump(100)
        if rproc is not None:
            res.recorder_exit = _stop(rproc)
        return res
    finally:
        for proc in procs:
            _stop(proc)
        col.close()
        FrameRing.unlink_stale(ring)
        shutil.rmtree(run_dir, ignore_errors=True)


# spawn targets (module level, so that spawn can import them); they exit with the return code
def _worker_entry(cfg: WorkerConfig, eps: Endpoints, ring: str) -> None:
    from workers.encoder import run_worker

    # one core (as `taskset -c N` would): on an oversubscribed test box, torch's two OpenMP
    # threads fighting for two busy cores made the tiny model ~100x slower (0.8 s a frame)
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    raise SystemExit(run_worker(cfg, eps, ring))


def _recorder_entry(cfg: RecorderConfig, eps: Endpoints, ring: str) -> None:
    raise SystemExit(run_recorder(cfg, eps, ring))


def _capture_entry(cfg: CaptureConfig, eps: Endpoints, ring: str) -> None:
    raise SystemExit(run_capture(cfg, eps, ring))


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="iwrr", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def worker_cfg(workdir: Path) -> WorkerConfig:
    """A tiny checkpoint (ViT-tiny at 32 px, 2 predictor layers, 5 action tokens)."""
    from iwm_bus.model import create_iwm_model, save_checkpoint

    model = create_iwm_model("custom", encoder_name="vit_tiny_patch16_224", img_size=32,
                             pred_depth=2, pred_dim=64, pred_heads=2, num_actions=5, seed=3)
    save_checkpoint(model, workdir / "tiny.pt")
    return WorkerConfig(model_path=workdir / "tiny.pt", mode="lossless", mrr_bank=8,
                        stats_interval_s=0.2)


@pytest.fixture(scope="module")
def recorded(workdir: Path, worker_cfg: WorkerConfig) -> tuple[Path, RunResult]:
    """A synthetic session recorded through capture + worker + recorder (lossless)."""
    path = workdir / "synthetic.mcap"
    res = run_sidecar(CaptureConfig(source=SYNTH, fps=40, mode="lossless", frames=N_FRAMES),
                      worker=worker_cfg,
                      recorder=RecorderConfig(path=path, metadata={"source": {"spec": SYNTH}}))
    return path, res


# ---------------------------------------------------------------- recording


def test_record_synthetic_session(recorded: tuple[Path, RunResult]) -> None:
    path, res = recorded
    assert res.capture_exit == 0 and res.recorder_exit == 0
    reader = SessionReader(path)
    assert not reader.recovered  # SIGTERM closed the file cleanly
    info = reader.info()
    assert info["frames"] == N_FRAMES and info["seq_first"] == 0 and info["seq_missing"] == 0
    assert info["topics"][topics.SURPRISE] == N_FRAMES == info["topics"][topics.LATENT]
    end = reader.end_metadata["recorder"]
    assert end["missed"] == 0 and end["frames"] == N_FRAMES
    assert reader.metadata["source"]["spec"] == SYNTH
    assert reader.metadata["recorder"]["frame_encoding"] == "png"
    # format 2: the viewer copies (Foxglove; decoded without iwm_bus in test_session_foxglove)
    viewer = reader.viewer_topics
    assert viewer["/viewer/frames"] == N_FRAMES == viewer["/viewer/surprise"]
    assert "/viewer/mrr" in viewer and reader.format_version == 2
    # the recorded pixels are exactly what the (deterministic) source produced
    src = SyntheticSource(64, 48, seed=0)
    expected = [src.reset()] + [src.step(None) for _ in range(N_FRAMES - 1)]
    for frame, exp in zip(reader.frames(), expected, strict=True):
        np.testing.assert_array_equal(frame.pixels, exp.pixels)
        assert frame.action == exp.action
    transitions = list(reader.transitions())
    assert len(transitions) == N_FRAMES - 1
    assert all(t.action is not None and 0 <= t.action["action_id"] < 5 for t in transitions)
    recorded_surprise = {m["seq"]: m["surprise"] for m in reader.events(topics.SURPRISE)}
    assert recorded_surprise == {m["seq"]: m["surprise"] for m in res.surprises}


def test_report_of_a_recorded_session(recorded: tuple[Path, RunResult], workdir: Path) -> None:
    from PIL import Image

    from iwm_bus.session.cli import main as cli

    path, _ = recorded
    out = workdir / "report.png"
    assert cli(["report", str(path), "--out", str(out), "--peaks", "3"]) == 0
    with Image.open(out) as img:
        assert img.size == (1200, 800)


# ---------------------------------------------------------------- replay


def test_replay_lossless_every_seq_once_and_deterministic(
        recorded: tuple[Path, RunResult], worker_cfg: WorkerConfig, workdir: Path) -> None:
    path, original = recorded
    cfg = CaptureConfig(source=f"replay:{path}", mode="lossless", rate=0, fps=0)
    again_path = workdir / "replayed.mcap"
    first = run_sidecar(cfg, worker=worker_cfg, recorder=RecorderConfig(path=again_path))
    second = run_sidecar(cfg, worker=worker_cfg)
    for run in (first, second):
        assert run.capture_exit == 0
        assert [m["seq"] for m in run.surprises] == list(range(N_FRAMES))  # once each, in order
        assert [n["seq"] for _, n in run.notices] == list(range(N_FRAMES))
    # the worker predicted with the recorded actions
    actions = [f.action for f in SessionReader(path).frame_records()]
    assert [m["action"] for m in first.surprises[1:]] == actions[1:]
    # the same session replayed twice gives the identical surprise series (CPU)
    assert first.surprise_series() == second.surprise_series()
    assert first.surprise_series()[1][1] is not None
    # ... the same the live run gave, since frames and actions are the same
    live = dict(original.surprise_series())
    for seq, value in first.surprise_series()[1:]:
        assert value == pytest.approx(live[seq], rel=1e-5, abs=1e-6)
    # recording the replay gives back the same frames, and the replayed actions
    assert first.recorder_exit == 0
    replayed = SessionReader(again_path)
    for a, b in zip(SessionReader(path).frames(), replayed.frames(), strict=True):
        np.testing.assert_array_equal(a.pixels, b.pixels)
    sources = {m.get("source") for m in replayed.actions()}
    assert sources == {"replay"} and replayed.topics[topics.ACTION] == N_FRAMES - 1


def _timed_session(path: Path, n: int, dt_ns: int) -> Path:
    rng = np.random.default_rng(0)
    with SessionWriter(path, frame_encoding="zstd-raw") as w:
        for i in range(n):
            w.write_frame(i, 10**9 + i * dt_ns, rng.integers(0, 255, (24, 32, 3), np.uint8),
                          action={"action_id": i % 3})
    return path


def test_replay_rate_2_takes_about_half_the_recorded_duration(workdir: Path) -> None:
    path = _timed_session(workdir / "timed.mcap", 31, 60_000_000)  # 1.8 s recorded
    res = run_sidecar(CaptureConfig(source=f"replay:{path}", rate=2.0, fps=0))
    assert res.capture_exit == 0
    # (the first notices may go out before this subscriber's connection is up)
    (t0, first), (t1, last) = res.notices[0], res.notices[-1]
    assert last["seq"] == 30 and first["seq"] <= 5
    recorded_s = (last["seq"] - first["seq"]) * 0.06
    assert 0.4 * recorded_s < t1 - t0 < 0.8 * recorded_s, (t1 - t0, recorded_s)  # about half


def test_replay_source_window_loop_and_errors(workdir: Path) -> None:
    path = _timed_session(workdir / "window.mcap", 20, 100_000_000)  # 0.0 .. 1.9 s
    src = open_source(f"replay:{path}", start=0.5, end=1.0)
    assert isinstance(src, ReplaySource) and src.knows_actions and src.republish_actions
    frames = [src.reset()]
    while (f := src.step({"action_id": 2})) is not None:  # agent actions are ignored
        frames.append(f)
    assert [(f.t_recorded_ns - 10**9) // 100_000_000 for f in frames] == [5, 6, 7, 8, 9]
    assert [f.action for f in frames] == [{"action_id": i % 3} for i in range(5, 10)]
    looped = ReplaySource(path, start=1.7, loop=True)
    seen = [looped.reset()] + [looped.step(None) for _ in range(5)]
    assert [(f.t_recorded_ns - 10**9) // 100_000_000 for f in seen] == [17, 18, 19, 17, 18, 19]
    assert looped.episodes == 1
    assert open_source(f"replay:{path}").reset().pixels.shape == (24, 32, 3)
    with pytest.raises(SourceError, match="no frames between start=5.0 s"):
        ReplaySource(path, start=5.0).reset()
    with pytest.raises(ValueError, match="end must be None or a number of seconds > start"):
        ReplaySource(path, start=1.0, end=0.5)
    broken = workdir / "broken.mcap"
    broken.write_bytes(b"not a session at all")
    with pytest.raises(SourceError, match="broken.mcap: not an MCAP session file"):
        open_source(f"replay:{broken}")
    assert isinstance(SessionError("x"), ValueError)


def test_replay_frame_larger_than_ring_fails_before_start(workdir: Path) -> None:
    path = _timed_session(workdir / "big.mcap", 3, 10_000_000)
    eps = Endpoints.ipc(workdir)
    ring = f"iwmr_{os.getpid()}_big"
    cfg = CaptureConfig(source=f"replay:{path}", ring=RingConfig(max_height=16, max_width=16))
    assert run_capture(cfg, eps, ring) == 2  # EXIT_NOT_STARTED: nothing created or bound
    assert not Path(f"/dev/shm/{ring}").exists()
    assert not any(f.exists() for f in eps.socket_files())


# ---------------------------------------------------------------- missed frames, crashes


def test_recorder_config_and_start_errors(workdir: Path) -> None:
    with pytest.raises(ValueError, match=r"RecorderConfig.frame_encoding='bmp'"):
        RecorderConfig(path=workdir / "x.mcap", frame_encoding="bmp")
    with pytest.raises(ValueError, match=r"RecorderConfig.chunk_seconds=0"):
        RecorderConfig(path=workdir / "x.mcap", chunk_seconds=0)
    existing = workdir / "exists.mcap"
    existing.write_bytes(b"keep me")
    eps = Endpoints.ipc(workdir)
    assert run_recorder(RecorderConfig(path=existing), eps, "iwmr_none") == 2  # not started
    assert existing.read_bytes() == b"keep me"
    assert not any(f.exists() for f in eps.socket_files())



def test_recorder_counts_frames_it_missed(workdir: Path) -> None:
    """A recorder paused (SIGSTOP) while a fast capture laps its 4-slot ring misses frames,
    counts them, and its count matches the gaps in the file."""
    path = workdir / "missed.mcap"

    def pause(rproc: mp.Process, _res: RunResult) -> None:
        os.kill(rproc.pid, signal.SIGSTOP)
        time.sleep(0.5)
        os.kill(rproc.pid, signal.SIGCONT)

    res = run_sidecar(CaptureConfig(source=SYNTH, fps=100, frames=150,
                                    ring=RingConfig(slots=4, max_height=64, max_width=64)),
                      recorder=RecorderConfig(path=path, record_latents=False), during=pause)
    assert res.capture_exit == 0 and res.recorder_exit == 0
    reader = SessionReader(path)
    info, end = reader.info(), reader.end_metadata["recorder"]
    assert end["missed_overwritten"] > 10
    assert end["missed"] == info["seq_missing"] and end["frames"] == info["frames"]
    assert info["seq_last"] == 149
    assert len(list(reader.transitions())) < info["frames"] - 1  # none across the gap


def test_recorder_sigkill_leaves_a_readable_prefix(workdir: Path) -> None:
    path = workdir / "killed.mcap"

    def kill(rproc: mp.Process, _res: RunResult) -> None:
        time.sleep(0.6)  # a few 0.1 s chunks are on disk
        os.kill(rproc.pid, signal.SIGKILL)

    res = run_sidecar(CaptureConfig(source=SYNTH, fps=50, frames=60),
                      recorder=RecorderConfig(path=path, chunk_seconds=0.1,
                                              record_latents=False), during=kill)
    assert res.recorder_exit == -signal.SIGKILL
    reader = SessionReader(path)
    assert reader.recovered
    seqs = [r.seq for r in reader.frame_records()]
    assert len(seqs) >= 5 and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    fixed = recover(path, workdir / "killed-fixed.mcap")
    assert fixed.frames == len(seqs) and not SessionReader(fixed.path).recovered


# ---------------------------------------------------------------- a real game


@pytest.mark.games
def test_record_real_game_pong(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        importlib.import_module("ale_py")
    except ImportError as e:
        pytest.skip(f"ale_py not installed ({e}); install the games extra")
    path = workdir / "pong.mcap"
    res = run_sidecar(CaptureConfig(source="gym:ALE/Pong-v5", fps=60, frames=40),
                      recorder=RecorderConfig(path=path, record_latents=False, metadata={
                          "source": {"spec": "gym:ALE/Pong-v5", "env_id": "ALE/Pong-v5"}}))
    assert res.capture_exit == 0 and res.recorder_exit == 0
    reader = SessionReader(path)
    info = reader.info()
    assert info["frames"] == 40 and info["frame_shapes"] == {"210x160x3": 40}
    assert info["seq_missing"] == 0
    transitions = list(reader.transitions())
    assert len(transitions) == 39
    # frames back-filled from the ring (their notices went out before the recorder's
    # subscription was up) have no action; every other one has a shared action id (0..17)
    known = [t.action["action_id"] for t in transitions if t.action is not None]
    assert len(transitions) - len(known) <= reader.end_metadata["recorder"]["from_ring"]
    assert known and all(0 <= a < 18 for a in known)
    assert any(not np.array_equal(t.frame.pixels, t.next_frame.pixels) for t in transitions)
    # and it replays: the replay source gives back the recorded frames
    src = ReplaySource(path)
    np.testing.assert_array_equal(src.reset().pixels, next(reader.frames()).pixels)
