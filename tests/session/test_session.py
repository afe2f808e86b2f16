"""Session files (iwm_bus.session), the iwm-session CLI and train.datasets.

Round trips for every frame encoding, time order across chunks, the transition rule, crash
safety against a real SIGKILLed writer process, and clear errors for bad files.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
from future import NEW_ACTION_KEY, NEW_FIELDS, future, future_kind
from mcap.reader import make_reader
from mcap.writer import Writer
from PIL import Image

from iwm_bus.bus.topics import ACTION, LATENT, MRR, SURPRISE
from iwm_bus.bus.wire import make_action
from iwm_bus.errors import SessionError
from iwm_bus.session import (
    FORMAT_VERSION,
    FRAMES_TOPIC,
    SessionOptions,
    SessionReader,
    SessionWriter,
    recover,
)
from iwm_bus.session.cli import main as cli
from iwm_bus.session.codec import encode_frame
from train.datasets import SessionDataset, iter_transitions, torch_dataset

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[2]
T0 = 5_000_000_000
DT = 20_000_000  # 50 fps


def frame_at(i: int, h: int = 48, w: int = 64, c: int = 3) -> np.ndarray:
    """A smooth, deterministic frame (a moving block on a gradient)."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 4 + i) % 256, (y * 5) % 256, np.full_like(x, (i * 7) % 256),
                    np.full_like(x, 255)], axis=-1)[:, :, :c].astype(np.uint8)
    img[10:20, (i * 3) % (w - 10):(i * 3) % (w - 10) + 10] = 250
    return img


def surprise_msg(i: int, value: float | None) -> dict:
    return {"seq": i, "t_capture_ns": T0 + i * DT, "t_publish_ns": T0 + i * DT + 1000,
            "surprise": value, "pred_seq": i - 1 if i else None, "action": None,
            "variant": "core"}


def write_session(path: Path, n: int = 40, *, events: bool = True, **options) -> Path:
    """n frames with discrete actions in the frames, agent actions and worker events."""
    meta = {"source": {"spec": "synthetic:64x48", "action_space": {"type": "discrete", "n": 5}},
            "config": {"fps": 50}}
    with SessionWriter(path, metadata=meta, **options) as w:
        for i in range(n):
            t = T0 + i * DT
            w.write_frame(i, t, frame_at(i), action=make_action(action_id=i % 5) if i else None)
            w.write_action(None, {"seq": i, "t_ns": t + 1000, "frame_seq": i,
                                  "action_id": (i + 1) % 5, "source": "test"})
            if events:
                w.write_event(SURPRISE, t, surprise_msg(i, None if i == 0 else
                                                        float(np.sin(i / 3) + 1.5)))
                w.write_event(MRR, t, {"seq": i, "t_capture_ns": t, "t_publish_ns": t + 1,
                                       "rr": 0.5, "mrr": 0.5 + i / (4 * n), "k": 8,
                                       "variant": "core"})
    return path


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("encoding,channels", [("png", 3), ("png", 1), ("png", 4),
                                               ("zstd-raw", 3), ("zstd-raw", 4)])
def test_lossless_round_trip(tmp_path: Path, encoding: str, channels: int) -> None:
    path = tmp_path / "s.mcap"
    with SessionWriter(path, frame_encoding=encoding) as w:
        for i in range(12):
            w.write_frame(100 + i, T0 + i * DT, frame_at(i, c=channels))
    r = SessionReader(path)
    frames = list(r.frames())
    assert [f.seq for f in frames] == list(range(100, 112))
    assert [f.t_ns for f in frames] == [T0 + i * DT for i in range(12)]
    for i, f in enumerate(frames):
        assert f.pixels.shape == (48, 64, channels) and f.pixels.flags.writeable
        np.testing.assert_array_equal(f.pixels, frame_at(i, c=channels))
    assert not r.recovered and r.metadata["frame_encoding"] == encoding


def test_jpeg_is_lossy_within_tolerance(tmp_path: Path) -> None:
    path = tmp_path / "j.mcap"
    with SessionWriter(path, frame_encoding="jpeg", jpeg_quality=90) as w:
        for i in range(5):
            w.write_frame(i, T0 + i * DT, frame_at(i))
    for i, f in enumerate(SessionReader(path).frames()):
        err = np.abs(f.pixels.astype(int) - frame_at(i).astype(int))
        assert f.pixels.shape == (48, 64, 3)
        assert err.mean() < 4.0, err.mean()
    with pytest.raises(ValueError, match="jpeg cannot hold 4-channel"):
        with SessionWriter(tmp_path / "j4.mcap", frame_encoding="jpeg") as w:
            w.write_frame(0, T0, frame_at(0, c=4))


def test_events_metadata_and_info(tmp_path: Path) -> None:
    path = write_session(tmp_path / "s.mcap", n=40)
    r = SessionReader(path)
    surprises = list(r.events(SURPRISE))
    assert len(surprises) == 40 and surprises[0]["surprise"] is None
    assert surprises[5]["surprise"] == pytest.approx(np.sin(5 / 3) + 1.5)
    acts = list(r.actions())
    assert [a["action_id"] for a in acts[:3]] == [1, 2, 3] and acts[0]["source"] == "test"
    info = r.info()
    assert info["frames"] == 40 and info["seq_missing"] == 0
    assert info["duration_s"] == pytest.approx(39 * DT / 1e9)
    assert info["fps"] == pytest.approx(50.0)
    assert info["topics"] == {FRAMES_TOPIC: 40, ACTION: 40, SURPRISE: 40, MRR: 40}
    assert info["frame_shapes"] == {"48x64x3": 40}
    assert info["actions"]["messages"] == 40
    assert info["metadata"]["source"]["spec"] == "synthetic:64x48"
    assert info["metadata"]["software_version"] and info["end"]["frames"] == 40
    assert info["size_bytes"] == path.stat().st_size and not info["recovered"]


def test_latent_arrays_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "l.mcap"
    z = np.linspace(-1, 1, 192, dtype=np.float32)
    with SessionWriter(path) as w:
        w.write_event(LATENT + ".invariant", T0, {"seq": 3, "t_capture_ns": T0,
                                                  "t_publish_ns": T0 + 5, "z_cls": z,
                                                  "patches": None, "variant": "invariant"})
    (msg,) = SessionReader(path).events(LATENT + ".invariant")
    np.testing.assert_array_equal(msg["z_cls"], z)


def test_time_order_across_chunks(tmp_path: Path) -> None:
    """Events written late (the worker lags) still come out in capture-time order."""
    path = tmp_path / "o.mcap"
    with SessionWriter(path, chunk_size=4096) as w:
        for i in range(30):
            w.write_frame(i, T0 + i * DT, frame_at(i))
            if i >= 3:  # surprise of frame i-3 arrives now
                w.write_event(SURPRISE, T0 + (i - 3) * DT, surprise_msg(i - 3, 1.0))
            if i % 7 == 0:
                w.flush()
        assert w.chunks_written >= 5
    times = [t for _, t, _ in SessionReader(path).messages()]
    assert times == sorted(times) and len(times) == 57


def test_transition_actions(tmp_path: Path) -> None:
    """action_t: the frame's own action > agent action linked by frame_seq > latest between."""
    path = tmp_path / "t.mcap"
    with SessionWriter(path) as w:
        w.write_frame(0, T0, frame_at(0))
        w.write_frame(1, T0 + DT, frame_at(1), action={"action_id": 4})  # the frame knows
        w.write_action(T0 + DT + 5, {"seq": 0, "t_ns": T0 + DT + 5, "frame_seq": 1,
                                     "vector": np.array([0.5, -1.0], np.float32)})
        w.write_action(T0 + DT + 9, {"seq": 1, "t_ns": T0 + DT + 9, "action_id": 2})
        w.write_frame(2, T0 + 2 * DT, frame_at(2))  # linked vector wins over the later id
        w.write_action(T0 + 2 * DT + 5, {"seq": 2, "t_ns": T0 + 2 * DT + 5, "action_id": 3})
        w.write_frame(3, T0 + 3 * DT, frame_at(3))  # latest between
        w.write_frame(4, T0 + 4 * DT, frame_at(4))  # nothing
        w.write_frame(6, T0 + 6 * DT, frame_at(6))  # gap: 5 missed
    r = SessionReader(path)
    trs = list(r.transitions())
    assert [(t.frame.seq, t.next_frame.seq) for t in trs] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert trs[0].action == {"action_id": 4}
    np.testing.assert_array_equal(trs[1].action["vector"], [0.5, -1.0])
    assert trs[2].action == {"action_id": 3} and trs[3].action is None
    np.testing.assert_array_equal(trs[2].next_frame.pixels, frame_at(3))
    assert len(list(r.transitions(allow_gaps=True))) == 5
    assert r.info()["seq_missing"] == 1


def test_dataset_numpy_and_torch(tmp_path: Path) -> None:
    a = write_session(tmp_path / "a.mcap", n=10, events=False)
    b = write_session(tmp_path / "b.mcap", n=6, events=False, frame_encoding="zstd-raw")
    ds = SessionDataset([a, b], cond_dim=4)
    assert len(ds) == 9 + 5 and ds.num_actions == 5
    s = ds[3]
    np.testing.assert_array_equal(s.frame, frame_at(3))
    np.testing.assert_array_equal(s.next_frame, frame_at(4))
    assert int(s.action["action_id"]) == 4 and s.action["vector"].shape == (4,)
    assert bool(s.action["has_id"]) and not bool(s.action["has_vector"])
    assert len(list(iter_transitions([a, b]))) == len(ds)
    with pytest.raises(IndexError):
        ds[len(ds)]
    import torch

    loader = torch.utils.data.DataLoader(torch_dataset(ds), batch_size=5)
    frame, action, next_frame = next(iter(loader))
    assert frame.shape == (5, 48, 64, 3) and frame.dtype == torch.uint8
    assert action["action_id"].tolist() == [1, 2, 3, 4, 0]


def test_writer_validation(tmp_path: Path) -> None:
    path = write_session(tmp_path / "s.mcap", n=2, events=False)
    with pytest.raises(FileExistsError, match="s.mcap exists"):
        SessionWriter(path)
    with pytest.raises(ValueError, match="SessionOptions.frame_encoding='gif'"):
        SessionOptions(frame_encoding="gif")
    with pytest.raises(ValueError, match="SessionOptions.chunk_size=10"):
        SessionOptions(chunk_size=10)
    with SessionWriter(tmp_path / "v.mcap") as w:
        with pytest.raises(ValueError, match="uint8"):
            w.write_frame(0, T0, np.zeros((4, 4, 3), np.float32))
        with pytest.raises(ValueError, match="reserved"):
            SessionWriter(tmp_path / "m.mcap", metadata={"format": "x"})


# ---------------------------------------------------------------- crash safety

_CHILD = r"""
import sys, time, numpy as np
from iwm_bus.session import SessionWriter
path, mode = sys.argv[1], sys.argv[2]
img = np.zeros((32, 48, 3), np.uint8)
if mode == "explicit":
    w = SessionWriter(path, chunk_seconds=3600, chunk_size=1 << 24)
    for i in range(25):
        img[:] = i
        w.write_frame(i, 10**9 + i * 10**7, img)
    w.flush()
    print("flushed 25", flush=True)
    for i in range(25, 40):  # an open chunk that never reaches the file
        img[:] = i
        w.write_frame(i, 10**9 + i * 10**7, img)
    print("open", flush=True)
else:  # chunks closed by age while frames keep coming
    w = SessionWriter(path, chunk_seconds=0.05)
    chunks = 0
    for i in range(100000):
        img[:] = i % 256
        w.write_frame(i, 10**9 + i * 10**7, img)
        if w.chunks_written != chunks:
            chunks = w.chunks_written
            print("chunk", chunks, w.frames_written, flush=True)
        time.sleep(0.002)
time.sleep(60)
"""


def _read_line(proc: subprocess.Popen, buf: bytearray, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            raise TimeoutError(f"writer child printed nothing in {timeout} s")
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            raise RuntimeError(f"writer child exited with {proc.wait(5)}")
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line.decode()


def _kill_writer_after(path: Path, mode: str, until: str) -> list[str]:
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), mode], cwd=REPO,
                            stdout=subprocess.PIPE)
    lines: list[str] = []
    buf = bytearray()
    try:
        while not lines or not lines[-1].startswith(until):
            lines.append(_read_line(proc, buf, 30))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
    return lines


def test_sigkilled_writer_open_chunk_is_lost_rest_is_read(tmp_path: Path) -> None:
    path = tmp_path / "killed.mcap"
    _kill_writer_after(path, "explicit", "open")
    r = SessionReader(path)
    assert r.recovered and "no footer" in r.problem
    assert [f.seq for f in r.frames()] == list(range(25))  # exactly the complete chunk
    out = tmp_path / "fixed.mcap"
    res = recover(path, out)
    # messages: the 25 frames and their 25 viewer copies (/viewer/frames)
    assert res.needed and res.frames == 25 and res.messages == 50
    with open(out, "rb") as f:  # plain mcap reads the recovered file, through its index
        reader = make_reader(f)
        assert len(reader.get_summary().chunk_indexes) >= 1
        assert sum(1 for _ in reader.iter_messages()) == 50
    fixed = SessionReader(out)
    assert not fixed.recovered and fixed.num_frames == 25
    for i, f in enumerate(fixed.frames()):
        assert f.pixels[0, 0, 0] == i
    assert fixed.metadata["software_version"]  # metadata survived
    assert fixed.viewer_topics == {"/viewer/frames": 25}


def test_sigkilled_writer_running_chunks(tmp_path: Path) -> None:
    path = tmp_path / "killed2.mcap"
    lines = _kill_writer_after(path, "running", "chunk 4 ")
    flushed = int(lines[-1].split()[2])  # frames in the file when chunk 4 was closed
    seqs = [rec.seq for rec in SessionReader(path).frame_records()]
    assert len(seqs) >= flushed and seqs == list(range(len(seqs)))
    res = recover(path)  # in place
    assert res.path == path and res.needed and res.frames == len(seqs)
    assert not SessionReader(path).recovered
    assert not recover(path).needed  # now valid: nothing to do


# ---------------------------------------------------------------- bad files


def test_truncated_corrupted_and_foreign_files(tmp_path: Path) -> None:
    good = write_session(tmp_path / "good.mcap", n=60, chunk_size=8192)
    data = good.read_bytes()

    def bad(name: str, blob: bytes) -> Path:
        (tmp_path / name).write_bytes(blob)
        return tmp_path / name

    with pytest.raises(SessionError, match=r"tiny\.mcap: no complete chunk"):
        SessionReader(bad("tiny.mcap", data[:30]))
    half = SessionReader(bad("half.mcap", data[: len(data) // 2]))
    assert half.recovered and "no footer" in half.problem
    seqs = [f.seq for f in half.frames()]
    assert 0 < len(seqs) < 60 and seqs == list(range(len(seqs)))
    with open(good, "rb") as f:
        chunk = make_reader(f).get_summary().chunk_indexes[1]
    flipped = bytearray(data)  # bytes in the middle of the second chunk's compressed data
    mid = chunk.chunk_start_offset + chunk.chunk_length // 2
    flipped[mid: mid + 4] = bytes(b ^ 0xFF for b in flipped[mid: mid + 4])
    with pytest.raises(SessionError, match=rf"flipped\.mcap: corrupted chunk at byte "
                                           rf"{chunk.chunk_start_offset}"):
        SessionReader(bad("flipped.mcap", bytes(flipped))).info()
    garbage = bytearray(data[: len(data) // 2])  # unindexed, and a record opcode smashed
    garbage[chunk.chunk_start_offset] = 0x7F
    with pytest.raises(SessionError, match=r"garbage\.mcap: corrupted MCAP record at byte "
                                           rf"{chunk.chunk_start_offset}: unknown record"):
        SessionReader(bad("garbage.mcap", bytes(garbage)))
    with pytest.raises(SessionError, match=r"notes\.mcap: not an MCAP session file"):
        SessionReader(bad("notes.mcap", b"just some text\n" * 10))
    with pytest.raises(SessionError, match=r"empty\.mcap: not an MCAP session file \(empty"):
        SessionReader(bad("empty.mcap", b""))
    with pytest.raises(SessionError, match=r"missing\.mcap: no such session file"):
        SessionReader(tmp_path / "missing.mcap")
    with open(tmp_path / "other.mcap", "wb") as f:  # valid MCAP, not ours
        w = Writer(f)
        w.start()
        w.register_channel("x", "json", 0)
        w.finish()
    with pytest.raises(SessionError, match=r"other\.mcap: is an MCAP file but not an iwm-bus"):
        SessionReader(tmp_path / "other.mcap")


# ---------------------------------------------------------------- a newer writer


class _NewerWriter(SessionWriter):
    """The session writer of a newer iwm-bus of format ``major``: a metadata key, a
    frame-record field, a channel, and wire fields and kinds in the events that today's
    reader does not know (tests/future.py)."""

    major = FORMAT_VERSION

    def _header_metadata(self, user: dict) -> dict[str, str]:
        return {**super()._header_metadata(user), "format_version": json.dumps(self.major),
                "codec_q": json.dumps({"frames": "av1"})}

    def _channel(self, topic: str, kind: str) -> int:
        if kind.endswith("_q") and topic not in self._channels:  # no schema of ours for it
            self._channels[topic] = self._mcap.register_channel(topic, "msgpack", 0,
                                                                {"kind": kind})
        return super()._channel(topic, kind)


def test_a_newer_writers_session_is_read_without_what_this_reader_does_not_know(
        tmp_path: Path) -> None:
    """Session files follow the wire's compatibility rule (docs/wire.md): what a newer
    writer added is left out and counted; a newer major format is refused in one line
    naming both versions."""
    path = tmp_path / "newer.mcap"
    px = frame_at(3)
    with _NewerWriter(path) as w:
        for i in range(3):
            w.write_frame(i, T0 + i * DT, frame_at(i), action=make_action(action_id=i))
        w._add(FRAMES_TOPIC, "frame-record", T0 + 3 * DT, msgpack.packb(
            {"seq": 3, "t_ns": T0 + 3 * DT, "encoding": "zstd-raw", "height": 48, "width": 64,
             "channels": 3, "data": encode_frame(px, "zstd-raw"),
             "action": {"action_id": 1, NEW_ACTION_KEY: 33}, "codec_params_q": {"level": 3}},
            use_bin_type=True), 3)
        w._add("depth_q", "depth_q", T0 + DT, b"\x01\x02", 1)
        w.write_event(SURPRISE, T0, surprise_msg(0, None))
        w._add(SURPRISE, "surprise", T0 + DT, future(SURPRISE, surprise_msg(1, 0.5))[1], 1)
        w._add(SURPRISE, "flow_q", T0 + 2 * DT, future_kind(SURPRISE)[1], 2)
    with SessionReader(path) as reader:
        assert "depth_q" in reader.topics  # listed, and passed over when read
        got = list(reader.messages())
        assert reader.unknown.fields == 2 and reader.unknown.kinds == 2
        assert {t for t, _, _ in got} == {FRAMES_TOPIC, SURPRISE}
        frames = list(reader.frames())
        assert [f.seq for f in frames] == [0, 1, 2, 3]
        np.testing.assert_array_equal(frames[3].pixels, px)
        assert frames[3].action == {"action_id": 1}
        assert [m["surprise"] for m in reader.events(SURPRISE)] == [None, 0.5]
        assert not set(NEW_FIELDS) & set().union(*reader.events(SURPRISE))
        assert len(list(reader.transitions())) == 3 and reader.info()["frames"] == 4

    class NextMajorWriter(_NewerWriter):
        major = FORMAT_VERSION + 1

    newer = tmp_path / "major.mcap"
    with NextMajorWriter(newer) as w:
        w.write_frame(0, T0, frame_at(0))
    with pytest.raises(SessionError, match=rf"session format {FORMAT_VERSION + 1} is newer "
                                           rf"than this iwm-bus reads \({FORMAT_VERSION}\)"):
        SessionReader(newer)


# ---------------------------------------------------------------- CLI


def test_cli_info_recover_export(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_session(tmp_path / "s.mcap", n=20)
    assert cli(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "frames     20 (seq 0..19, 0 missing), 50.0 fps" in text
    assert "session format 2" in text and "/viewer/frames 20" in text
    assert cli(["info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["frames"] == 20
    out = tmp_path / "export"
    assert cli(["export", str(path), str(out)]) == 0
    pngs = sorted(out.glob("frame_*.png"))
    assert len(pngs) == 20
    np.testing.assert_array_equal(np.asarray(Image.open(pngs[7])), frame_at(7))
    rows = (out / "actions.csv").read_text().splitlines()
    assert rows[0] == "frame,action_id" and rows[1] == "1,1" and len(rows) == 20
    assert len((out / "agent_actions.csv").read_text().splitlines()) == 21
    bad = tmp_path / "bad.mcap"
    bad.write_bytes(b"nope")
    assert cli(["info", str(bad)]) == 1
    assert "bad.mcap: not an MCAP session file" in capsys.readouterr().err
    assert cli(["recover", str(path)]) == 0
    assert "already a valid session" in capsys.readouterr().out


def test_exported_folder_replays_as_folder_source(tmp_path: Path) -> None:
    from workers.sources import open_source

    path = write_session(tmp_path / "s.mcap", n=8, events=False)
    assert cli(["export", str(path), str(tmp_path / "ex")]) == 0
    src = open_source(f"folder:{tmp_path / 'ex'}")
    try:
        first = src.reset()
        np.testing.assert_array_equal(first.pixels, frame_at(0))
        got = [src.step(None) for _ in range(7)]
        assert [g.action for g in got] == [{"action_id": i % 5} for i in range(1, 8)]
        assert src.knows_actions
    finally:
        src.close()


def test_cli_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_session(tmp_path / "s.mcap", n=60)
    out = tmp_path / "report.png"
    assert cli(["report", str(path), "--out", str(out), "--size", "1000x700",
                "--peaks", "4"]) == 0
    with Image.open(out) as img:
        assert img.size == (1000, 700)
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.std() > 10  # something was drawn
    assert "4 peaks" in capsys.readouterr().out
    plain = write_session(tmp_path / "plain.mcap", n=5, events=False)
    assert cli(["report", str(plain), "--out", str(tmp_path / "r2.png")]) == 1
    assert "no iwm.surprise values" in capsys.readouterr().err
    assert not (tmp_path / "r2.png").exists()


def test_cli_export_video_with_a_surprise_strip(tmp_path: Path) -> None:
    av = pytest.importorskip("av")
    from iwm_bus.session.video import STRIP_HEIGHT

    path = write_session(tmp_path / "s.mcap", n=30)
    out = tmp_path / "s.mp4"
    assert cli(["export", str(path), "--video", str(out)]) == 0
    with av.open(str(out)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        rate = c.streams.video[0].average_rate
    assert len(frames) == 30 and frames[0].shape == (48 + STRIP_HEIGHT, 64, 3)
    assert round(float(rate)) == 50
    # the picture is the recorded frame (H.264 is lossy: close, not equal)
    assert np.abs(frames[7][:48].astype(int) - frame_at(7).astype(int)).mean() < 12
    # frame 20's surprise (sin(20/3) + 1.5 = 1.87) is past the alert line: a red bar at right
    bar = frames[20][48 + 4:, -3:].reshape(-1, 3).astype(int).mean(0)
    assert bar[0] > bar[1] + 60, bar
    # frame 0 has no surprise (nothing predicted it): no bar
    assert frames[0][48:, -3:].astype(int).mean() < 60
    plain = tmp_path / "plain.mp4"
    assert cli(["export", str(path), "--video", str(plain), "--no-overlay"]) == 0
    with av.open(str(plain)) as c:
        assert next(c.decode(video=0)).to_ndarray(format="rgb24").shape == (48, 64, 3)
    assert cli(["export", str(path)]) == 1  # neither a folder nor --video
