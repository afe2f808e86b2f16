"""Configs (validation, env), the run directory (lock, manifest, cleanup) and rpc.check_params.

    .venv/bin/pytest tests/test_config.py -q
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from iwm_bus import config
from iwm_bus.bus import rpc
from iwm_bus.bus.rundir import LOCK, MANIFEST, RunDir, default_run_dir
from iwm_bus.bus.transport import Endpoints, Publisher
from iwm_bus.config import (
    BusConfig,
    ConfigError,
    RingConfig,
    WorkerConfig,
    add_flags,
    flag,
    flag_error,
    flag_values,
    to_dict,
)
from iwm_bus.errors import RunDirBusyError

WAIT_S = 30.0

# ------------------------------------------------------------------ configs

BAD_CONFIGS = [
    (RingConfig, "slots", 1), (RingConfig, "slots", 1025), (RingConfig, "slots", "8"),
    (RingConfig, "slots", True), (RingConfig, "max_height", 0),
    (RingConfig, "max_width", 9000), (RingConfig, "max_width", 640.0),
    (RingConfig, "channels", 2),
    (BusConfig, "tcp_port", 0), (BusConfig, "tcp_port", 65533), (BusConfig, "tcp_port", "80"),
    (WorkerConfig, "variant", "big"), (WorkerConfig, "device", "gpu"),
    (WorkerConfig, "device", "cuda:x"), (WorkerConfig, "device", 3),
    (WorkerConfig, "mode", "fast"), (WorkerConfig, "mrr_bank", 0),
    (WorkerConfig, "mrr_bank", 5000), (WorkerConfig, "mrr_bank", "32"),
    (WorkerConfig, "img_size", 15), (WorkerConfig, "img_size", 100),
    (WorkerConfig, "img_size", "224"), (WorkerConfig, "stats_interval_s", 0.01),
    (WorkerConfig, "stats_interval_s", "1"), (WorkerConfig, "precision", "fp16"),
]


@pytest.mark.parametrize("cls,field,value", BAD_CONFIGS,
                         ids=[f"{c.__name__}.{f}={v!r}" for c, f, v in BAD_CONFIGS])
def test_validation_error_names_field_and_value(cls: type, field: str, value: Any) -> None:
    with pytest.raises(ValueError) as info:
        cls(**{field: value})
    text = str(info.value)
    assert f"{cls.__name__}.{field}" in text and repr(value) in text, text


def test_defaults_are_valid() -> None:
    ring, bus, worker = RingConfig(), BusConfig(), WorkerConfig()
    assert (ring.slots, ring.max_height, ring.max_width, ring.channels) == (8, 1080, 1920, 3)
    assert bus.tcp_port is None and bus.endpoints() == Endpoints.ipc(default_run_dir())
    assert worker.variant is None and worker.device == "cpu"  # None: the checkpoint's
    assert WorkerConfig(device="cuda:1", img_size=64, mode="lossless").device == "cuda:1"


def test_bus_from_env(tmp_path: Path) -> None:
    env = {"IWM_RUN_DIR": str(tmp_path), "IWM_SERVICE_HOST": "10.0.0.2",
           "IWM_SERVICE_PORT": "6000"}
    bus = BusConfig.from_env(env)
    assert bus.run_dir == tmp_path and bus.tcp_host == "10.0.0.2" and bus.tcp_port == 6000
    assert bus.endpoints() == Endpoints.tcp("10.0.0.2", 6000)
    ipc = BusConfig.from_env({"IWM_RUN_DIR": str(tmp_path)})
    assert ipc.endpoints() == Endpoints.ipc(tmp_path)
    assert BusConfig.from_env(env, tcp_port=7000, tcp_host=None).tcp_port == 7000
    with pytest.raises(ValueError, match="IWM_SERVICE_PORT='http'"):
        BusConfig.from_env({"IWM_SERVICE_PORT": "http"})
    with pytest.raises(ValueError, match="BusConfig.tcp_port=70000"):
        BusConfig.from_env({"IWM_SERVICE_PORT": "70000"})


def test_worker_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ckpt = tmp_path / "m.pt"
    env = {"IWM_MODEL_VARIANT": "invariant", "IWM_MODEL_PATH": str(ckpt),
           "IWM_DEVICE": "cuda:0"}
    cfg = WorkerConfig.from_env(env, mode="lossless", img_size=None)
    assert (cfg.variant, cfg.model_path, cfg.device, cfg.mode) == ("invariant", ckpt, "cuda:0",
                                                                   "lossless")
    assert cfg.img_size is None
    with pytest.raises(ValueError, match="WorkerConfig.variant='huge'"):
        WorkerConfig.from_env({"IWM_MODEL_VARIANT": "huge"})
    monkeypatch.setenv("IWM_DEVICE", "cuda")  # an explicit env mapping wins over os.environ
    assert WorkerConfig.from_env({}).device == "cpu"
    assert WorkerConfig.from_env().device == "cuda"


def test_to_dict_is_json_ready(tmp_path: Path) -> None:
    data = to_dict(WorkerConfig(model_path=tmp_path / "m.pt"))
    assert data["model_path"] == str(tmp_path / "m.pt")
    assert json.loads(json.dumps(data)) == data
    assert to_dict(BusConfig(run_dir=tmp_path))["run_dir"] == str(tmp_path)


@dataclass
class Probe:
    n: int | None = None
    x: float = 1.0
    on: bool = False

    def __post_init__(self) -> None:
        config.check(self, "n", int, 1, 10, optional=True)
        config.check(self, "x", float, 0, 1, open_low=True)
        config.check(self, "on", bool)


@pytest.mark.parametrize("kwargs,says", [
    ({"n": "3"}, "Probe.n='3': must be an int or None, got str"),  # type first: no TypeError
    ({"n": True}, "Probe.n=True: must be an int or None, got bool"),
    ({"n": 0}, "Probe.n=0: must be in 1..10"),
    ({"x": 0}, "Probe.x=0: must be in (0, 1]"),
    ({"x": float("nan")}, "Probe.x=nan: must be in (0, 1]"),
    ({"x": True}, "Probe.x=True: must be a number, got bool"),
    ({"on": 1}, "Probe.on=1: must be a bool, got int"),
])
def test_check_tests_the_type_before_the_range(kwargs: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError) as info:
        Probe(**kwargs)
    assert str(info.value) == says
    assert isinstance(info.value, ValueError)
    (name, value), = kwargs.items()
    assert (info.value.owner, info.value.name) == ("Probe", name)
    again = pickle.loads(pickle.dumps(info.value))  # crosses process boundaries whole
    assert str(again) == says and again.name == name
    assert Probe(n=None, x=1, on=True).x == 1  # None passes an optional field; ints are numbers


def _every_part() -> list[tuple[Any, dict[str, Any], str]]:
    """One bad value for each config class of the project: (class, kwargs, bad field)."""
    from agent_bridge.arbiter import ArbiterConfig
    from agent_bridge.demo_agent import DemoConfig
    from agent_bridge.planner import PlannerConfig
    from launch_config import SidecarConfig
    from workers.capture import CaptureConfig
    from workers.recorder import RecorderConfig
    from workers.viewer import ViewerConfig

    return [(RingConfig, {"slots": "8"}, "slots"), (BusConfig, {"tcp_port": 1.5}, "tcp_port"),
            (WorkerConfig, {"threads": -1}, "threads"),
            (CaptureConfig, {"seed": "0"}, "seed"), (CaptureConfig, {"loop": "yes"}, "loop"),
            (RecorderConfig, {"path": "x.mcap", "queue_bytes": "1"}, "queue_bytes"),
            (ViewerConfig, {"max_side": 8}, "max_side"),
            (DemoConfig, {"period_s": "0.1"}, "period_s"), (DemoConfig, {"repeat": 0}, "repeat"),
            (ArbiterConfig, {"escalate_mrr": "0.2"}, "escalate_mrr"),
            (PlannerConfig, {"horizon": "5"}, "horizon"), (PlannerConfig, {"elites": 400}, "elites"),
            (SidecarConfig, {"mode": "fast"}, "mode"), (SidecarConfig, {"worker": None}, "worker")]


def test_every_config_uses_the_one_validator() -> None:
    """Each part of the tree (and the agent's arbiter and planner) says ``Class.field=value:
    why`` through one ConfigError, a type error included."""
    for cls, kwargs, name in _every_part():
        with pytest.raises(ConfigError) as info:
            cls(**kwargs)
        value = kwargs[name]
        assert str(info.value).startswith(f"{cls.__name__}.{name}={value!r}: "), info.value
        assert (info.value.owner, info.value.name) == (cls.__name__, name)


@dataclass
class Inner:
    depth: int = field(default=3, metadata=flag("--depth", "how deep"))
    where: Path | None = field(default=None, metadata=flag("--where", group="b"))
    hidden: int = 0  # no flag


@dataclass
class Outer:
    fast: bool = field(default=False, metadata=flag("--fast", "go fast"))
    inner: Inner = field(default_factory=Inner, metadata={"group": "a"})
    level: str = field(default="x", metadata=flag("--level", choices=("x", "y")))


def test_flags_come_from_field_metadata() -> None:
    p = argparse.ArgumentParser()
    groups = {"a": p.add_argument_group("A"), "b": p.add_argument_group("B")}
    flags = add_flags(p, Outer, groups)
    assert [(f.name, f.path, f.group) for f in flags] == [
        ("--fast", ("fast",), None), ("--depth", ("inner", "depth"), "a"),
        ("--where", ("inner", "where"), "b"), ("--level", ("level",), None)]
    assert [a.option_strings for a in groups["a"]._group_actions] == [["--depth"]]
    assert flag_values(p.parse_args([]), flags) == {}  # not given: the defaults stay theirs
    args = p.parse_args(["--fast", "--depth", "5", "--where", "/tmp/w", "--level", "y"])
    assert flag_values(args, flags) == {"fast": True, "level": "y",
                                        "inner": {"depth": 5, "where": Path("/tmp/w")}}
    with pytest.raises(SystemExit):
        p.parse_args(["--level", "z"])
    e = ConfigError("Inner", "depth", 0, "must be >= 1")
    assert str(flag_error(e, args, flags)) == "--depth: Inner.depth=0: must be >= 1"
    assert flag_error(e, p.parse_args([]), flags) is e  # not set by a flag: not blamed on it


def test_to_dict_is_json_ready_all_the_way_down(tmp_path: Path) -> None:
    @dataclass
    class Tree:
        worker: WorkerConfig
        shape: tuple[int, int] = (2, 3)

    data = to_dict(Tree(WorkerConfig(model_path=tmp_path / "m.pt")))
    assert data["worker"]["model_path"] == str(tmp_path / "m.pt") and data["shape"] == [2, 3]
    assert json.loads(json.dumps(data)) == data


# ------------------------------------------------------------------ run dir


def hold_run_dir(path: str, held: Any, release: Any) -> None:
    """Child: acquire the run dir, say so, hold it until released (or killed)."""
    rd = RunDir(path).acquire()
    rd.write_manifest({"role": "holder"})
    held.set()
    release.wait(WAIT_S)
    rd.cleanup()


def test_second_acquire_from_another_process_is_busy(run_dir: Path, spawn: Any,
                                                     mp_ctx: Any) -> None:
    path = run_dir / "rd"
    held, release = mp_ctx.Event(), mp_ctx.Event()
    proc = spawn(hold_run_dir, str(path), held, release)
    assert held.wait(WAIT_S), "child never acquired the run dir"
    with pytest.raises(RunDirBusyError, match=rf"in use .*pid {proc.pid}"):
        RunDir(path).acquire()
    assert RunDir(path).read_manifest()["role"] == "holder"
    release.set()
    proc.join(WAIT_S)
    assert proc.exitcode == 0
    with RunDir(path) as rd:  # free again
        assert (rd.path / LOCK).read_text().strip() == str(os.getpid())
    assert not path.exists()


def test_killed_holder_releases_the_lock(run_dir: Path, spawn: Any, mp_ctx: Any) -> None:
    path = run_dir / "rd"
    held, release = mp_ctx.Event(), mp_ctx.Event()
    proc = spawn(hold_run_dir, str(path), held, release)
    assert held.wait(WAIT_S)
    proc.kill()  # a crashed sidecar: no cleanup ran
    proc.join(WAIT_S)
    rd = RunDir(path).acquire()  # the kernel dropped the flock with the process
    rd.cleanup()
    assert not path.exists()


def test_acquire_makes_owner_only_dir(run_dir: Path) -> None:
    path = run_dir / "a" / "b"
    with RunDir(path) as rd:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
        assert rd.endpoints() == Endpoints.ipc(path)
        assert rd.manifest_path == path / MANIFEST


def test_cleanup_leaves_nothing(run_dir: Path, zmq_ctx: zmq.Context) -> None:
    path = run_dir / "rd"
    rd = RunDir(path).acquire()
    eps = rd.endpoints()
    pubs = [Publisher(ep, ctx=zmq_ctx) for ep in (eps.capture, eps.worker, eps.rpc, eps.agent)]
    try:
        rd.write_manifest({"ring": "iwm_test"})
        assert all(p.exists() for p in eps.socket_files())
        rd.cleanup()
        assert not path.exists(), list(path.iterdir()) if path.exists() else None
    finally:
        for pub in pubs:
            pub.close()


def test_cleanup_keeps_user_files(run_dir: Path) -> None:
    path = run_dir / "rd"
    with RunDir(path) as rd:
        rd.write_manifest({})
        (path / "notes.txt").write_text("mine")
    assert sorted(p.name for p in path.iterdir()) == ["notes.txt"]


def test_manifest_round_trip(run_dir: Path) -> None:
    info = {"ring": "iwm_abc", "endpoints": {"capture": "ipc:///tmp/x/capture.sock"},
            "slots": 8, "variant": "core", "path": Path("/tmp/ckpt.pt")}
    with RunDir(run_dir / "rd") as rd:
        assert rd.read_manifest(missing_ok=True) is None
        with pytest.raises(FileNotFoundError, match="no sidecar manifest"):
            rd.read_manifest()
        rd.write_manifest(info)
        got = rd.read_manifest()
        assert got == {"pid": os.getpid(), **info, "path": "/tmp/ckpt.pt"}
        assert stat.S_IMODE(rd.manifest_path.stat().st_mode) == 0o600
        rd.write_manifest({"ring": "iwm_new"})  # atomic replace, no tmp file left
        assert rd.read_manifest()["ring"] == "iwm_new"
        assert sorted(p.name for p in rd.path.iterdir()) == [LOCK, MANIFEST]
        rd.manifest_path.write_text("{not json")
        with pytest.raises(ValueError, match="not valid JSON"):
            rd.read_manifest()


def test_default_run_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    assert default_run_dir() == Path("/run/user/1234/iwm")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_run_dir().name.startswith("iwm-")
    Endpoints.ipc(default_run_dir())  # short enough for socket paths


# ------------------------------------------------------------------ rpc.check_params

D, C, A, N = 8, 4, 3, 5
SIZES = {"embed_dim": D, "cond_dim": C, "num_actions": A, "num_patches": N}


def check(method: str, **params: Any) -> dict[str, Any]:
    return rpc.check_params(method, params, **SIZES)


def test_check_params_happy_paths() -> None:
    assert check("health") == {}
    enc = check("encode", frames=np.zeros((4, 6, 3), np.uint8))
    assert enc["frames"].shape == (1, 4, 6, 3) and enc["patches"] is False
    assert check("encode", frames=np.zeros((2, 4, 6, 3), np.uint8), patches=True)["patches"]

    pred = check("predict", z_cls=np.arange(D), cond=[0.5, 1.0], action_id=[2])
    assert pred["z_cls"].dtype == np.float32 and pred["z_cls"].shape == (1, D)
    assert pred["cond"].shape == (1, C) and pred["cond"].tolist() == [[0.5, 1.0, 0, 0]]
    assert pred["action_id"].dtype == np.int64
    pred = check("predict", z_cls=np.zeros((2, D)), patches=np.zeros((2, N, D)),
                 action_id=[-1, 0])
    assert pred["patches"].shape == (2, N, D) and "cond" not in pred

    roll = check("rollout", z_cls=np.zeros((2, D)), k=5)
    assert roll["cond_seq"].shape == (2, 5, C) and not roll["cond_seq"].any()
    roll = check("rollout", z_cls=np.zeros(D), cond_seq=np.ones((3, 2)), action_seq=[0, 1, 2],
                 k=3)
    assert roll["cond_seq"].shape == (1, 3, C) and roll["action_seq"].shape == (1, 3)
    assert check("rollout", z_cls=np.zeros(D), action_seq=[[1, 2]])["action_seq"].shape == (1, 2)


BAD_PARAMS = [
    ("teleport", {}, "unknown method"),
    ("health", {"x": 1}, "unknown params"),
    ("encode", {}, "needs the parameter 'frames'"),
    ("encode", {"frames": np.zeros((4, 4, 3), np.float32)}, "uint8"),
    ("encode", {"frames": "abc"}, "uint8"),
    ("encode", {"frames": np.zeros((4, 4), np.uint8)}, r"\(H,W,3\)"),
    ("encode", {"frames": np.zeros((4, 4, 4), np.uint8)}, r"\(H,W,3\)"),
    ("encode", {"frames": np.zeros((0, 4, 4, 3), np.uint8)}, "batch"),
    ("encode", {"frames": np.zeros((257, 1, 1, 3), np.uint8)}, "batch"),
    ("encode", {"frames": np.zeros((1, 0, 4, 3), np.uint8)}, "non-empty"),
    ("predict", {}, "needs the parameter 'z_cls'"),
    ("predict", {"z_cls": np.zeros(D + 1)}, "last dimension must be 8"),
    ("predict", {"z_cls": np.zeros((1, 1, D))}, "2 dims"),
    ("predict", {"z_cls": np.full(D, np.nan)}, "NaN or inf"),
    ("predict", {"z_cls": np.array(["a"] * D)}, "numeric"),
    ("predict", {"z_cls": [[1.0, 2.0], [3.0]]}, "z_cls is not an array"),
    ("predict", {"z_cls": np.zeros((rpc.MAX_BATCH + 1, D))}, "batch must be"),
    ("predict", {"z_cls": np.zeros(D), "patches": np.zeros((1, N + 1, D))}, "5 tokens"),
    ("predict", {"z_cls": np.zeros(D), "patches": np.zeros((2, N, D))}, "patches batch"),
    ("predict", {"z_cls": np.zeros(D), "cond": np.zeros(C + 1)}, "at most 4"),
    ("predict", {"z_cls": np.zeros(D), "cond": np.zeros((2, C))}, "cond batch"),
    ("predict", {"z_cls": np.zeros(D), "action_id": [A]}, "values must be"),
    ("predict", {"z_cls": np.zeros(D), "action_id": [-2]}, "values must be"),
    ("predict", {"z_cls": np.zeros(D), "action_id": [1.0]}, "integers"),
    ("predict", {"z_cls": np.zeros(D), "k": 3}, "unknown params"),
    ("rollout", {"z_cls": np.zeros(D)}, "needs cond_seq, action_seq or an int k"),
    ("rollout", {"z_cls": np.zeros(D), "k": True}, "must be an int"),
    ("rollout", {"z_cls": np.zeros(D), "k": 2.0}, "must be an int"),
    ("rollout", {"z_cls": np.zeros(D), "k": 0}, "1..64"),
    ("rollout", {"z_cls": np.zeros(D), "k": 65}, "1..64"),
    ("rollout", {"z_cls": np.zeros(D), "cond_seq": np.zeros((1, 3, C)), "k": 4}, "disagrees"),
    ("rollout", {"z_cls": np.zeros(D), "cond_seq": np.zeros((1, 3, C)),
                 "action_seq": [[0, 1]]}, "action_seq has 2 steps but cond_seq has 3"),
    ("rollout", {"z_cls": np.zeros(D), "cond_seq": np.zeros((1, 65, C))}, "1..64"),
    ("rollout", {"z_cls": np.zeros(D), "action_seq": [[0, A]]}, "values must be"),
    ("rollout", {"z_cls": np.zeros(D), "cond_seq": np.zeros((2, 3, C))}, "cond_seq batch"),
]


@pytest.mark.parametrize("method,params,match", BAD_PARAMS,
                         ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(BAD_PARAMS)])
def test_check_params_errors(method: str, params: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rpc.check_params(method, params, **SIZES)


def test_rollout_huge_k_rejected_before_allocating() -> None:
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="1..64"):
        check("rollout", z_cls=np.zeros((rpc.MAX_BATCH, D)), k=10**12)
    assert time.perf_counter() - t0 < 1.0
