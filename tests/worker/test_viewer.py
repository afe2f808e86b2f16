"""The Rerun viewer: ``iwm-launch --viewer`` (workers/viewer.py) and ``iwm-session view``.

Each test writes an .rrd file and reads it back with Rerun's own reader, comparing what was
logged on the ``frame`` timeline with what the sidecar published or the session holds: the
frames pixel for pixel (the synthetic source is deterministic), the scalar values and the
demo agent's arbiter decisions.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from iwm_bus.bus import topics
from iwm_bus.bus.transport import Endpoints, Subscriber
from iwm_bus.bus.wire import make_action, make_decision, pack, unpack
from iwm_bus.session import FRAMES_TOPIC, SessionWriter
from iwm_bus.session.cli import main as session_cli
from workers.sources import open_source
from workers.viewer import RerunLog, ViewerTarget, downscale

pytestmark = pytest.mark.timeout(90)
ROOT = Path(__file__).resolve().parents[2]
TINY = ["--untrained", "--encoder", "vit_tiny_patch16_224", "--img-size", "32"]
T0 = 5_000_000_000
DT = 20_000_000


def _rrd_reader() -> Any:
    pytest.importorskip("rerun", reason="the viewer extra (rerun-sdk) is not installed")
    chunk = pytest.importorskip("rerun.chunk", reason="reading .rrd files back needs "
                                "rerun.chunk.RrdReader (a recent rerun-sdk)")
    return chunk.RrdReader


def read_rrd(path: Path) -> dict[str, dict[int, Any]]:
    """Entity path -> {frame seq: value}: scalars as float (a list when several), images as
    ``(H, W[, C])`` uint8 arrays, text logs as str, bar charts as a list of floats."""
    import pyarrow as pa

    out: dict[str, dict[int, Any]] = {}
    for chunk in _rrd_reader()(path).stream():
        rb = chunk.to_record_batch()
        names = rb.schema.names
        if "frame" not in names:
            continue
        seqs = rb.column("frame").cast(pa.int64()).to_pylist()
        rows = out.setdefault(chunk.entity_path, {})
        for name in names:
            values = rb.column(name).to_pylist() if name.endswith(
                ("Scalars:scalars", "Image:buffer", "Image:format", "TextLog:text",
                 "BarChart:values")) else None
            if values is None:
                continue
            for seq, value in zip(seqs, values, strict=True):
                if value is None:
                    continue
                if name.endswith("Scalars:scalars"):
                    rows[seq] = value[0] if len(value) == 1 else list(value)
                elif name.endswith("TextLog:text"):
                    rows[seq] = value[0]
                elif name.endswith("BarChart:values"):
                    rows[seq] = list(value[0]["buffer"])
                elif name.endswith("Image:buffer"):
                    rows.setdefault(seq, {})["buffer"] = bytes(value[0])
                else:
                    rows.setdefault(seq, {})["format"] = value[0]
    for rows in out.values():
        for seq, value in list(rows.items()):
            if isinstance(value, dict) and {"buffer", "format"} <= value.keys():
                fmt = value["format"]
                channels = {1: 1, 2: 3, 3: 4}[fmt["color_model"]]
                shape = (fmt["height"], fmt["width"]) + ((channels,) if channels > 1 else ())
                rows[seq] = np.frombuffer(value["buffer"], np.uint8).reshape(shape)
    return out


# ---------------------------------------------------------------- live: iwm-launch --viewer


def _synthetic_frames(n: int) -> list[np.ndarray]:
    """What ``--source synthetic:64x64`` (seed 0, no agent) captures as seqs 0..n-1."""
    src = open_source("synthetic:64x64", seed=0)
    try:
        return [src.reset().pixels] + [src.step(None).pixels for _ in range(n - 1)]
    finally:
        src.close()


def test_launch_viewer_logs_published_frames_and_scalars() -> None:
    _rrd_reader()
    n = 16
    with tempfile.TemporaryDirectory(prefix="iwmv", dir="/tmp") as tmp:
        run_dir, rrd = Path(tmp) / "run", Path(tmp) / "live.rrd"
        sub = Subscriber([Endpoints.ipc(run_dir).worker], [topics.SURPRISE, topics.MRR])
        log = tempfile.TemporaryFile()
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "launch.py"), "--run-dir", str(run_dir), "--quiet",
             "--source", "synthetic:64x64", "--mode", "lossless", "--frames", str(n),
             "--fps", "20", "--no-standby", *TINY, "--viewer", f"save:{rrd}"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        published: dict[str, dict[int, Any]] = {"surprise": {}, "surprise_z": {}, "mrr": {},
                                                 "rr": {}}
        try:
            deadline = time.monotonic() + 75
            while proc.poll() is None and time.monotonic() < deadline:
                got = sub.recv(100)
                while got is not None:
                    topic, msg = got
                    keys = {topics.SURPRISE: ("surprise", "surprise_z"),
                            topics.MRR: ("mrr", "rr")}.get(topic, ())
                    for key in keys:  # exact topics: a suffixed stream is another series
                        if msg.get(key) is not None:
                            published[key][msg["seq"]] = msg[key]
                    got = sub.recv(0)
            code = proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            sub.close()
            log.seek(0)
            output = log.read().decode(errors="replace")
            log.close()
        assert code == 0, output[-3000:]
        assert "viewer: stopped" in output, output[-3000:]
        logged = read_rrd(rrd)

    # scalars: the values the worker published, on the seqs it published them for
    assert len(published["surprise"]) >= n - 4, (published, output[-2000:])
    for key, values in published.items():
        got = logged.get(f"/{key}", {})
        assert set(got) <= set(values), (key, sorted(got), sorted(values))
        # the viewer may stop before the worker's last messages arrive, nothing earlier
        assert sorted(values)[:-3] == [s for s in sorted(values)[:-3] if s in got], (
            key, sorted(got), sorted(values))
        for seq, value in got.items():
            assert value == pytest.approx(values[seq], rel=1e-6, abs=1e-9), (key, seq)
    assert len(logged["/surprise"]) >= n - 4

    # frames: every captured seq, pixel for pixel (64x64 is under max_side: no downscale)
    frames = logged.get("/frame", {})
    assert sorted(frames) == list(range(n)), sorted(frames)
    for seq, expected in enumerate(_synthetic_frames(n)):
        np.testing.assert_array_equal(frames[seq], downscale(expected), err_msg=f"seq {seq}")


DECISION_SERIES = (("slow_down", "slow_down"), ("wait", "prefer_wait"),
                   ("escalate", "escalate"), ("stale", "stale"), ("delay_s", "delay_s"))


def test_launch_viewer_logs_the_demo_agents_decisions() -> None:
    """``--agent demo``: each arbiter decision the agent publishes (``agent.decision``) is
    in the .rrd on the frame it was made on: a text line and a value per kind."""
    _rrd_reader()
    with tempfile.TemporaryDirectory(prefix="iwmv", dir="/tmp") as tmp:
        run_dir, rrd = Path(tmp) / "run", Path(tmp) / "agent.rrd"
        sub = Subscriber([Endpoints.ipc(run_dir).agent], [topics.DECISION])
        log = tempfile.TemporaryFile()
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "launch.py"), "--run-dir", str(run_dir), "--quiet",
             "--source", "synthetic:64x64", "--agent", "demo", "--mode", "lossless",
             "--frames", "60", "--fps", "20", "--no-standby", *TINY, "--viewer",
             f"save:{rrd}"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        published: dict[int, dict[str, Any]] = {}  # frame seq -> the agent's decision
        try:
            deadline = time.monotonic() + 75
            while proc.poll() is None and time.monotonic() < deadline:
                got = sub.recv(100)
                while got is not None:
                    if got[1]["frame_seq"] is not None:  # stale ones have no frame
                        published[got[1]["frame_seq"]] = got[1]
                    got = sub.recv(0)
            code = proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            sub.close()
            log.seek(0)
            output = log.read().decode(errors="replace")
            log.close()
        assert code == 0, output[-3000:]
        logged = read_rrd(rrd)

    seqs = sorted(published)
    assert len(seqs) >= 5, (seqs, output[-2000:])
    text = logged.get("/agent/decision", {})
    # the viewer may stop before the agent's last decisions arrive, nothing earlier
    assert [s for s in seqs[:-3] if s not in text] == [], (seqs, sorted(text))
    compared = 0
    for seq in seqs:
        if seq not in text or logged["/agent/decision/stale"][seq]:
            continue  # a stale decision (start-up) was put on this frame after the agent's
        msg = published[seq]
        for entity, key in DECISION_SERIES:
            assert logged[f"/agent/decision/{entity}"][seq] == pytest.approx(float(msg[key])), \
                (entity, seq)
        assert text[seq].endswith(f"(frame {seq})") and ("ESCALATE" in text[seq]) == \
            msg["escalate"], text[seq]
        compared += 1
    assert compared >= 5
    assert logged.get("/agent/action"), "the demo agent's actions are logged too"


def test_decisions_and_plan_costs_are_logged_on_their_frames(tmp_path: Path) -> None:
    _rrd_reader()
    sent = [
        make_decision(0, T0, slow_down=False, prefer_wait=False, escalate=False, frame_seq=2,
                      surprise=0.3),
        make_decision(1, T0, slow_down=True, prefer_wait=True, escalate=False, delay_s=0.25,
                      frame_seq=4, reasons=["surprise 0.91 > 0.69"]),
        make_decision(2, T0, slow_down=True, prefer_wait=False, escalate=True, delay_s=0.4,
                      frame_seq=7, reasons=["surprise_z 9.0 > escalate 7"],
                      plan_costs=[0.5, 0.125, 0.75], plan_choice=1),
        # no fresh vision: no frame of its own, so on the last frame the viewer saw (9)
        make_decision(3, T0, slow_down=True, prefer_wait=True, escalate=False, stale=True,
                      delay_s=0.1, reasons=["stale vision: 1200 ms old"])]
    with RerunLog(ViewerTarget(tmp_path / "d.rrd")) as log:
        for msg in sent:
            assert log.event(*unpack(pack(topics.DECISION, msg)), last_frame=9)  # off the bus
    assert log.counts["decisions"] == 4
    logged = read_rrd(tmp_path / "d.rrd")
    want = {"slow_down": [0, 1, 1, 1], "wait": [0, 1, 0, 1], "escalate": [0, 0, 1, 0],
            "stale": [0, 0, 0, 1], "delay_s": [0, 0.25, 0.4, 0.1]}
    for entity, values in want.items():
        assert logged[f"/agent/decision/{entity}"] == dict(zip([2, 4, 7, 9], values, strict=True)), entity
    text = logged["/agent/decision"]
    assert sorted(text) == [2, 4, 7, 9]
    assert "ESCALATE" not in text[2] + text[4] + text[9]
    assert text[4].startswith("slow down 0.25 s, wait") and "surprise 0.91" in text[4]
    assert "ESCALATE" in text[7] and "surprise_z 9.0 > escalate 7" in text[7]
    assert "stale" in text[9]
    assert logged["/agent/plan/costs"] == {7: [0.5, 0.125, 0.75]}
    assert logged["/agent/plan/cost"] == {7: 0.125}  # the chosen candidate's, not the first


def test_downscale_strides_to_max_side() -> None:
    img = np.arange(100 * 60 * 3, dtype=np.uint32).reshape(100, 60, 3).astype(np.uint8)
    small = downscale(img, max_side=32)
    np.testing.assert_array_equal(small, img[::4, ::4])
    assert max(small.shape[:2]) <= 32
    assert downscale(img[:, :, :1], 320).shape == (100, 60)


# ---------------------------------------------------------------- iwm-session view


def _frame(i: int) -> np.ndarray:
    y, x = np.mgrid[0:24, 0:32]
    return np.stack([(x * 7 + i) % 256, (y * 9) % 256, np.full_like(x, i * 11 % 256)],
                    axis=-1).astype(np.uint8)


def _write_session(path: Path, n: int, bad_seq: int | None = None) -> dict[str, dict]:
    """n frames (frame ``bad_seq`` with undecodable PNG bytes), surprise + MRR, a dual
    stream's ``iwm.surprise.semantic`` and agent actions; returns the values written."""
    want: dict[str, dict] = {"surprise": {}, "surprise_z": {}, "mrr": {}, "rr": {},
                             "surprise/semantic": {}, "agent/action_id": {}}
    with SessionWriter(path, metadata={"source": {"spec": "test"}}) as w:
        for i in range(n):
            t = T0 + i * DT
            if i == bad_seq:
                w._add(FRAMES_TOPIC, "frame-record", t, msgpack.packb(
                    {"seq": i, "t_ns": t, "encoding": "png", "height": 24, "width": 32,
                     "channels": 3, "data": b"not a png", "action": None}, use_bin_type=True),
                    i)
            else:
                w.write_frame(i, t, _frame(i), action=make_action(action_id=i % 3))
            s, z = (None, None) if i == 0 else (0.25 + i / 7, i / 3 - 1)
            w.write_event(topics.SURPRISE, t, {"seq": i, "t_capture_ns": t, "t_publish_ns": t,
                                               "surprise": s, "surprise_z": z,
                                               "pred_seq": i - 1 if i else None,
                                               "action": None, "variant": "core"})
            w.write_event(topics.SURPRISE + ".semantic", t, {
                "seq": i, "t_capture_ns": t, "t_publish_ns": t, "surprise": 2.0 + i,
                "pred_seq": None, "action": None, "variant": "invariant"})
            w.write_event(topics.MRR, t, {"seq": i, "t_capture_ns": t, "t_publish_ns": t,
                                          "rr": 1 / (1 + i % 4), "mrr": 0.5 + i / 100, "k": 8,
                                          "variant": "core"})
            w.write_action(None, {"seq": i, "t_ns": t + 1000, "frame_seq": i,
                                  "action_id": (i + 1) % 3, "source": "test"})
            for key, value in (("surprise", s), ("surprise_z", z), ("mrr", 0.5 + i / 100),
                               ("rr", 1 / (1 + i % 4)), ("surprise/semantic", 2.0 + i),
                               ("agent/action_id", (i + 1) % 3)):
                if value is not None:
                    want[key][i] = value
    return want


def test_session_view_save_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _rrd_reader()
    n = 12
    want = _write_session(tmp_path / "s.mcap", n)
    out = tmp_path / "s.rrd"
    assert session_cli(["view", str(tmp_path / "s.mcap"), "--save", str(out)]) == 0
    assert f"{n} frames" in capsys.readouterr().out
    logged = read_rrd(out)
    for key, values in want.items():
        got = logged.get(f"/{key}", {})
        assert sorted(got) == sorted(values), key
        for seq, value in values.items():
            assert got[seq] == pytest.approx(value, rel=1e-6), (key, seq)
    frames = logged["/frame"]
    assert sorted(frames) == list(range(n))
    for i in range(n):
        np.testing.assert_array_equal(frames[i], _frame(i), err_msg=f"frame {i}")
    assert sorted(logged["/agent/action"]) == list(range(n))


def test_session_view_names_bad_frames_and_goes_on(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    _rrd_reader()
    n, bad = 8, 3
    _write_session(tmp_path / "bad.mcap", n, bad_seq=bad)
    out = tmp_path / "bad.rrd"
    assert session_cli(["view", str(tmp_path / "bad.mcap"), "--save", str(out)]) == 1
    err = capsys.readouterr().err
    assert "bad.mcap" in err and f"frame {bad} does not decode" in err, err
    frames = read_rrd(out)["/frame"]
    assert sorted(frames) == [i for i in range(n) if i != bad]
    np.testing.assert_array_equal(frames[bad + 1], _frame(bad + 1))


# ---------------------------------------------------------------- without rerun-sdk


@pytest.fixture()
def no_rerun(tmp_path: Path) -> dict[str, str]:
    """An environment in which ``import rerun`` fails (a shim module first on the path)."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "rerun.py").write_text("raise ImportError('rerun is hidden by the test')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(shim), *filter(None, [env.get("PYTHONPATH")])])
    return env


def test_launch_viewer_without_rerun_exits_2_in_one_line(tmp_path: Path,
                                                         no_rerun: dict[str, str]) -> None:
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--run-dir", str(run_dir),
                          "--source", "synthetic", *TINY, "--viewer",
                          f"save:{tmp_path / 'x.rrd'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, env=no_rerun)
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if "rerun" in ln]
    assert len(lines) == 1 and "pip install 'iwm-bus[viewer]'" in lines[0], out.stderr
    assert not run_dir.exists(), "bad input must fail before anything starts"
    assert not (tmp_path / "x.rrd").exists()


def test_session_view_without_rerun_exits_2(tmp_path: Path, no_rerun: dict[str, str]) -> None:
    _write_session(tmp_path / "s.mcap", 2)
    out = subprocess.run([sys.executable, "-m", "iwm_bus.session.cli", "view",
                          str(tmp_path / "s.mcap"), "--save", str(tmp_path / "s.rrd")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, env=no_rerun)
    assert out.returncode == 2, out.stderr
    assert "pip install 'iwm-bus[viewer]'" in out.stderr
    assert not (tmp_path / "s.rrd").exists()


@pytest.mark.parametrize("spec,needle", [("save:/nonexistent-dir/x.rrd", "does not exist"),
                                         ("open:x", "expected spawn or save:PATH.rrd")])
def test_launch_bad_viewer_spec_exits_2(tmp_path: Path, spec: str, needle: str) -> None:
    pytest.importorskip("rerun")
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--run-dir", str(run_dir),
                          "--source", "synthetic", *TINY, "--viewer", spec],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr
    assert not run_dir.exists()
