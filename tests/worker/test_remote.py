"""Remote workers (issue 13): a gateway on the game machine, workers elsewhere over tcp.

The end-to-end test runs the game side and the worker side in two network namespaces joined
by a veth pair (``unshare -rmn`` + ``ip netns``); where namespaces cannot be made it falls
back to two loopback addresses (127.0.0.1 for the game, the gateway on 127.0.0.2).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from conftest import find_free_port

from iwm_bus.bus import topics, wire
from iwm_bus.bus.link import Link
from iwm_bus.bus.link_frames import FrameDecoder
from iwm_bus.bus.security import ClientKeys, ServerKeys, check_bind, make_keys
from iwm_bus.bus.transport import Subscriber
from iwm_bus.session import SessionReader
from workers.ring_reader import InlineFrames

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = [sys.executable, str(ROOT / "launch.py")]
TWO_NETNS = Path(__file__).with_name("two_netns.sh")
TINY = ["--untrained", "--encoder", "vit_tiny_patch16_224", "--img-size", "64",
        "--no-standby", "--threads", "1"]


def _netns_available() -> bool:
    if not (shutil.which("unshare") and shutil.which("ip")):
        return False
    probe = subprocess.run(["unshare", "-rmn", "--propagation", "private", "sh", "-c",
                            "mkdir -p /run/netns && mount -t tmpfs tmpfs /run/netns && "
                            "ip netns add probe && ip link add veth-a type veth peer name veth-b"],
                           capture_output=True, timeout=20)
    return probe.returncode == 0


def _launch_cmd(*args: str) -> str:
    return " ".join([*LAUNCH, *args])


# ----------------------------------------------------------------------------- end to end


def test_remote_workers_get_every_frame_over_curve_across_two_namespaces(tmp_path: Path
                                                                         ) -> None:
    """Lossless, CURVE, zstd frames, two remote workers (the plain stream and a ``semantic``
    one) on one gateway: every frame reaches both, and both streams' results of every seq reach the game
    machine's recording, in the game machine's own run dir, as from a local worker."""
    keys = tmp_path / "keys"
    make_keys(keys)
    run_dir, rec = tmp_path / "run", tmp_path / "s.mcap"
    frames = 40
    netns = _netns_available()
    host = "10.77.0.1" if netns else "127.0.0.2"
    port = 5571 if netns else find_free_port(3, host)
    game = _launch_cmd("--source", "synthetic:64x64", "--mode", "lossless", "--frames",
                       str(frames), "--remote-worker", f"{host}:{port}", "--keys", str(keys),
                       "--link-codec", "zstd", "--run-dir", str(run_dir), "--record",
                       str(rec), "--quiet")
    worker = ["--worker-only", "--connect", f"{host}:{port}", "--keys", str(keys), "--mode",
              "lossless", *TINY, "--duration", "60"]
    semantic = [*worker, "--stream", "semantic", "--variant", "invariant"]
    wlog, slog = tmp_path / "worker.log", tmp_path / "semantic.log"
    # lossless: the capture starts with the first worker it hears, so both must be up first
    ready = (f"until grep -q 'worker ready' {wlog} 2>/dev/null && grep -q 'worker ready' "
             f"{slog} 2>/dev/null; do sleep 0.2; done")
    if netns:
        workers = f"{_launch_cmd(*worker)} > {wlog} 2>&1 & {_launch_cmd(*semantic)} > {slog} " \
                  "2>&1; wait"
        cmd = ["unshare", "-rmn", "--propagation", "private", "sh", str(TWO_NETNS),
               f"timeout 120 sh -c \"{ready}\"; {game}", workers,
               str(tmp_path / "workers.log")]
        # the workers stop at --duration; the game side stops after its frames
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
        code, log = out.returncode, out.stdout + out.stderr
    else:
        procs = [subprocess.Popen([*LAUNCH, *w], cwd=ROOT, stdout=f.open("w"),
                                  stderr=subprocess.STDOUT) for w, f in ((worker, wlog),
                                                                          (semantic, slog))]
        try:
            subprocess.run(["sh", "-c", ready], timeout=120)
            out = subprocess.run(game.split(), cwd=ROOT, capture_output=True, text=True,
                                 timeout=180)
            code, log = out.returncode, out.stdout + out.stderr
        finally:
            for p in procs:
                p.terminate()
                p.wait(30)
    assert code == 0, log[-3000:]
    assert "(CURVE)" in log and "frames as zstd:1" in log
    reader = SessionReader(rec)
    assert reader.num_frames == frames
    plain = [m["seq"] for m in reader.events(topics.SURPRISE)]
    sem = [m["seq"] for m in reader.events(topics.SURPRISE + ".semantic")]
    assert sorted(set(plain)) == list(range(frames)), plain
    assert sorted(set(sem)) == list(range(frames)), sem
    assert {m["variant"] for m in reader.events(topics.SURPRISE + ".semantic")} == {"invariant"}
    # the results are the frames' own: the latents of distinct frames differ
    z = [m["z_cls"] for m in reader.events(topics.LATENT)]
    assert len(z) >= frames and not np.allclose(z[0], z[-1])
    assert "10.77.0.1" in log if netns else True


def _frames_received(sub: zmq.Socket, seconds: float) -> int:
    n, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        if sub.poll(100):
            topic, header, pixels = sub.recv_multipart()  # the pixels: a part of their own
            msg = wire.unpack([topic, header])[1]
            assert msg["codec"] == "raw" and msg["pixels"] is None
            assert FrameDecoder().decode(msg, pixels).shape == (64, 64, 3)
            n += 1
    return n


def test_only_authorized_workers_get_frames(tmp_path: Path, zmq_ctx: zmq.Context) -> None:
    """A client with the worker's key gets the inline frames; one with an unknown key and
    one without CURVE get nothing, and the gateway counts the refusal."""
    keys, stranger = tmp_path / "keys", tmp_path / "stranger"
    make_keys(keys)
    make_keys(stranger)
    run_dir = tmp_path / "run"
    port = find_free_port(3)
    proc = subprocess.Popen([*LAUNCH, "--source", "synthetic:64x64", "--fps", "30",
                             "--duration", "30", "--remote-worker", str(port), "--keys",
                             str(keys), "--run-dir", str(run_dir), "--quiet"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    link = Link("127.0.0.1", port)
    ours = ClientKeys.load(keys)
    # a stranger knows the gateway's public key (it is public) but not an allowed key pair
    theirs = dataclasses.replace(ClientKeys.load(stranger), server=ours.server)
    socks = []
    try:
        for client in (ours, theirs, None):
            sock = zmq_ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            if client is not None:
                client.secure(sock)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.connect(link.frames)
            socks.append(sock)
        assert _frames_received(socks[0], 8.0) > 10  # the gateway is up and sending
        assert _frames_received(socks[1], 1.0) == 0
        assert _frames_received(socks[2], 1.0) == 0
        refused = 0
        with Subscriber([f"ipc://{run_dir.resolve()}/worker.sock"], [topics.STATS]) as sub:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and refused == 0:
                got = sub.recv(500)
                if got and got[1]["source"] == "gateway":
                    refused = got[1]["values"]["refused_peers"]
        assert refused >= 1
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        proc.wait(30)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("args", "says"), [
    (["--worker-only"], "--worker-only needs --connect"),
    (["--connect", "127.0.0.1:5570"], "--worker-only needs --connect"),
    (["--remote-worker", "0.0.0.0:5570"], "without CURVE"),
    (["--remote-worker", "5570", "--keys", "/nonexistent/keys"], "does not exist"),
    (["--worker-only", "--connect", "h:5570", "--source", "synthetic"], "--source belongs"),
    (["--worker-only", "--connect", "h:99999"], "port"),
    (["--stream", "semantic"], "--stream names a remote worker"),
    (["--keys", "k"], "--keys secures"),
    (["--remote-worker", "5570", "--link-codec", "webp"], "--link-codec: unknown link codec"),
    (["--remote-worker", "5570", "--link-codec", "jpeg:0"], "quality after 'jpeg:'"),
    (["--remote-worker", "5570", "--link-codec", "zstd:x"], "level after 'zstd:'"),
    (["--link-codec", "zstd"], "--link-codec sets how the gateway sends frames"),
    (["--worker-only", "--connect", "h:5570", "--link-codec", "zstd"], "needs --remote-worker"),
])
def test_bad_remote_flags_exit_2_with_one_line(args: list[str], says: str,
                                               tmp_path: Path) -> None:
    out = subprocess.run([*LAUNCH, "--run-dir", str(tmp_path), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and says in lines[0], out.stderr


def test_keys_are_made_once_and_checked(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    written = make_keys(folder)
    assert {p.name for p in written} >= {"server.key_secret", "worker.key_secret"}
    assert (folder / "server.key_secret").stat().st_mode & 0o077 == 0
    with pytest.raises(FileExistsError):
        make_keys(folder)
    server, client = ServerKeys.load(folder), ClientKeys.load(folder)
    assert client.public in server.allowed() and client.server == server.public
    (folder / "authorized" / "worker.key").unlink()
    with pytest.raises(FileNotFoundError, match="no worker public key"):
        ServerKeys.load(folder)
    with pytest.raises(FileNotFoundError, match="make-keys"):
        ClientKeys.load(tmp_path / "none")


def test_bind_policy_and_link_addresses() -> None:
    check_bind("127.0.0.1", secure=False, insecure=False)
    check_bind("0.0.0.0", secure=True, insecure=False)
    check_bind("0.0.0.0", secure=False, insecure=True)
    for host in ("0.0.0.0", "*", "10.0.0.5", "gpu-box"):
        with pytest.raises(ValueError, match="without CURVE"):
            check_bind(host, secure=False, insecure=False)
    assert Link.parse("6000") == Link("127.0.0.1", 6000)
    assert Link.parse("tcp://10.1.2.3:6000").frames == "tcp://10.1.2.3:6000"
    link = Link.parse("[::1]:6000")
    assert (link.results, link.rpc) == ("tcp://[::1]:6001", "tcp://[::1]:6002")
    assert Link.parse("gpu").port == 5570
    eps = Link.parse("h:7000").worker_endpoints()
    assert eps.capture == eps.agent == "tcp://h:7000" and eps.worker == "tcp://h:7001"


# ----------------------------------------------------------------------------- inline frames


def test_inline_frames_read_like_the_ring() -> None:
    frames = InlineFrames(keep=4)
    assert not frames.attach()
    pix = [np.full((8, 8, 3), i, np.uint8) for i in range(8)]
    for seq in (0, 1, 3):
        frames.add(seq, pix[seq], 1000 + seq)
    assert frames.attach() and frames.latest_seq == 3
    assert frames.slots == 4  # 0..3: the oldest held is seq 0
    got = frames.read(1)
    assert isinstance(got, tuple) and got[1] == (1, 1001, 8, 8) and (got[0] == 1).all()
    assert frames.read(2) == "unavailable"  # never arrived
    assert frames.slots == 1  # 0 and 1 let go
    for seq in range(4, 8):
        frames.add(seq, pix[seq], 1000 + seq)
    assert frames.slots == 4 and frames.read(3) == "unavailable"  # beyond keep
    grey = np.zeros((8, 8, 1), np.uint8)
    frames.add(8, grey, 9)
    assert frames.read(8)[0].shape == (8, 8, 1)  # as the ring holds it (the worker makes RGB)
    # a notice of another capture lets the frames held go
    frames.add(9, pix[1], 12)
    frames.see(9, 5, 12)
    assert frames.see(3, 6, 13) == "restart" and not frames.attach()
    frames.add(10, None, 10)
    frames.add(11, np.zeros((8, 8), np.uint8), 11)
    assert frames.missing == 2


def test_rpc_reaches_a_remote_worker_through_the_gateway(tmp_path: Path) -> None:
    """An agent's RPC client talks to the game machine's run dir as usual; the gateway
    passes each request to the remote worker and the reply back (no keys: loopback)."""
    from agent_bridge.client import IWMClient

    run_dir = tmp_path / "run"
    port = find_free_port(3)
    worker = subprocess.Popen([*LAUNCH, "--worker-only", "--connect", str(port), *TINY,
                               "--duration", "60"], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    game = subprocess.Popen([*LAUNCH, "--source", "synthetic:64x64", "--fps", "20",
                             "--duration", "60", "--remote-worker", str(port), "--run-dir",
                             str(run_dir), "--quiet"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not (run_dir / "sidecar.json").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        with IWMClient(run_dir, timeout_s=5.0) as client:
            health = None
            while time.monotonic() < deadline:
                try:
                    health = client.health()
                except TimeoutError:
                    continue
                if health["frames"] > 0:
                    break
                time.sleep(0.5)
            assert health is not None and health["frames"] > 0 and not health["trained"]
            frame = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
            a, b = client.encode_image(frame), client.encode_image(frame[::-1].copy())
            assert a.z_cls.shape == (192,) and not np.allclose(a.z_cls, b.z_cls)
    finally:
        for p in (game, worker):
            p.terminate()
            p.wait(30)


def test_inline_frames_are_writable_copies() -> None:
    """A decoded inline frame is a read-only view of the message; the worker holds a copy
    (torch warns on, and must not write through, read-only memory)."""
    frames = InlineFrames()
    msg = wire.unpack(wire.pack(topics.FRAME, {
        "seq": 0, "slot": 0, "t_capture_ns": 1, "height": 4, "width": 4, "channels": 3,
        "action": None, "pixels": np.full((4, 4, 3), 7, np.uint8), "source": None}))[1]
    assert not msg["pixels"].flags.writeable
    frames.add(0, msg["pixels"], 1)
    got = frames.read(0)
    assert isinstance(got, tuple) and got[0].flags.writeable and (got[0] == 7).all()


# ----------------------------------------------------------------------------- restarts


def _pid_of(log: Path, name: str, after: int = -1, timeout: float = 120) -> int:
    """The pid the launcher's log says it started ``name`` with, other than ``after``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = re.findall(rf"started {name} \(pid (\d+)\)", log.read_text())
        fresh = [int(p) for p in pids if int(p) != after]
        if fresh:
            return fresh[-1]
        time.sleep(0.2)
    raise AssertionError(f"no '{name}' pid in {log}: {log.read_text()[-2000:]}")


def test_a_remote_worker_killed_mid_stream_loses_nothing_in_lossless_mode(tmp_path: Path
                                                                          ) -> None:
    """issue 26, item 4: SIGKILL the remote worker mid-stream (lossless). The GPU machine's
    launcher starts another; the frames its predecessor had not answered reach it again, and
    the game machine's recording holds exactly one surprise, MRR and latent of every seq:
    none lost, none twice."""
    run_dir, rec, wlog = tmp_path / "run", tmp_path / "s.mcap", tmp_path / "worker.log"
    frames, kill_at = 80, 25
    port = find_free_port(3)
    worker = subprocess.Popen([*LAUNCH, "--worker-only", "--connect", str(port), "--mode",
                               "lossless", *TINY, "--duration", "170"], cwd=ROOT,
                              stdout=wlog.open("w"), stderr=subprocess.STDOUT)
    game = None
    sub = Subscriber([f"ipc://{run_dir.resolve()}/worker.sock"], [topics.SURPRISE])
    try:
        first = _pid_of(wlog, "worker")
        deadline = time.monotonic() + 120
        while "worker ready" not in wlog.read_text():
            assert time.monotonic() < deadline and worker.poll() is None, wlog.read_text()
            time.sleep(0.2)
        game = subprocess.Popen([*LAUNCH, "--source", "synthetic:64x64", "--mode", "lossless",
                                 "--fps", "20", "--frames", str(frames), "--remote-worker",
                                 str(port), "--run-dir", str(run_dir), "--record", str(rec),
                                 "--quiet"], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        seq = -1
        while seq < kill_at:  # mid-stream: frames in flight on the link
            got = sub.recv(1000)
            assert time.monotonic() < deadline + 60 and game.poll() is None, "no surprise"
            seq = max(seq, got[1]["seq"]) if got else seq
        os.kill(first, signal.SIGKILL)
        _pid_of(wlog, "worker", after=first)  # the launcher started another
        out, _ = game.communicate(timeout=170)
        assert game.returncode == 0, out[-3000:]
    finally:
        sub.close()
        for p in (game, worker):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(30)
    assert "restart #1" in wlog.read_text()
    reader = SessionReader(rec)
    assert reader.num_frames == frames
    for topic in (topics.SURPRISE, topics.MRR, topics.LATENT):
        seqs = sorted(m["seq"] for m in reader.events(topic))
        assert seqs == list(range(frames)), (topic, [s for s in set(seqs) if seqs.count(s) > 1],
                                             sorted(set(range(frames)) - set(seqs)))
