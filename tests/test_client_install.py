"""The agent's client install: a fresh venv with a bare ``pip install`` of this project (no
extras) holds no torch, timm or gymnasium, stays small, and its ``VisionBridge`` and
``IWMClient`` work against a sidecar started from the full environment; the sidecar's
commands and packages say which extra to install, in one line.

Needs the package index (pip fetches numpy, pyzmq, msgpack, loguru and the build backend; a
warm pip cache makes it ~30 s).

    .venv/bin/python -m pytest tests/test_client_install.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import find_free_port

ROOT = Path(__file__).resolve().parents[1]
#: the issue's budget for a bare install's site-packages
MAX_CLIENT_MB = 150
#: what a bare install must not bring (each pulls torch, or is the sidecar's)
HEAVY = ("torch", "torchvision", "timm", "gymnasium", "ale_py", "mcap", "tensorboard",
         "matplotlib", "rerun")
#: what ``pip install .`` reads: the metadata and the packages it lists
SOURCE = ("setup.cfg", "pyproject.toml", "README.md", "launch.py", "launch_config.py",
          "iwm_bus", "workers", "agent_bridge", "train")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


class ClientVenv:
    """A venv with ``pip install <copy of this project>``: the client, nothing else."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.python = root / "bin" / "python"

    def run(self, *args: str, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        return subprocess.run([*args], capture_output=True, text=True, timeout=timeout,
                              env=env, cwd=self.root, **kw)

    def py(self, code: str, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.run(str(self.python), "-c", code, *argv, timeout=timeout)

    def site_packages(self) -> Path:
        out = self.py("import sysconfig; print(sysconfig.get_paths()['purelib'])")
        assert out.returncode == 0, out.stderr
        return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClientVenv]:
    base = tmp_path_factory.mktemp("client")
    src = base / "src"
    src.mkdir()
    for name in SOURCE:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    # the base interpreter, not this venv's: the client venv must not see its packages
    base_python = Path(sysconfig.get_config_var("BINDIR") or "") / "python3"
    python = str(base_python) if base_python.exists() else sys.executable
    subprocess.run([python, "-m", "venv", str(base / "venv")], check=True, timeout=300)
    venv = ClientVenv(base / "venv")
    out = venv.run(str(venv.python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                   str(src), timeout=540)
    assert out.returncode == 0, f"bare install failed:\n{out.stdout[-2000:]}{out.stderr[-3000:]}"
    yield venv


def _size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()
               ) / 2**20


def test_a_bare_install_is_the_light_client(client: ClientVenv) -> None:
    code = ("import importlib.util, json, sys; "
            "import agent_bridge, agent_bridge.client, agent_bridge.planner, iwm_bus.bus.wire; "
            f"heavy = {list(HEAVY)!r}; "
            "print(json.dumps({'present': [m for m in heavy if importlib.util.find_spec(m)], "
            "'loaded': sorted(m for m in sys.modules if m.split('.')[0] in heavy)}))")
    out = client.py(code)
    assert out.returncode == 0, f"the client does not import in a bare install:\n{out.stderr}"
    got = json.loads(out.stdout)
    assert got["present"] == [], f"a bare install brought {got['present']}"
    assert got["loaded"] == [], f"importing the client loaded {got['loaded']}"
    size = _size_mb(client.site_packages())
    assert size <= MAX_CLIENT_MB, f"client site-packages is {size:.0f} MB > {MAX_CLIENT_MB}"


@pytest.mark.parametrize(("command", "extra"), [("iwm-launch", "sidecar"),
                                                ("iwm-session", "sidecar"),
                                                ("iwm-train", "train"), ("iwm-eval", "train")])
def test_a_sidecar_command_in_a_client_install_names_its_extra(client: ClientVenv, command: str,
                                                               extra: str) -> None:
    out = client.run(str(client.root / "bin" / command), "--help")
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"pip install 'iwm-bus[{extra}]'" in lines[0] and command in lines[0], lines[0]


@pytest.mark.parametrize(("module", "extra"), [("iwm_bus.model", "sidecar"),
                                               ("iwm_bus.session", "sidecar"),
                                               ("agent_bridge.gym", "sidecar")])
def test_importing_a_sidecar_part_in_a_client_install_names_its_extra(
        client: ClientVenv, module: str, extra: str) -> None:
    out = client.py(f"import {module}")
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("iwm_bus.extras.MissingExtraError: ") and module in last, last
    assert f"pip install 'iwm-bus[{extra}]'" in last, last


def test_the_client_talks_to_a_running_sidecar_over_tcp(client: ClientVenv,
                                                       tmp_path: Path) -> None:
    """The README's "agent on another machine": the sidecar on IWM_SERVICE_HOST/PORT, the
    client-only venv's VisionBridge and IWMClient on tcp://HOST:PORT."""
    port = find_free_port(4)
    env = {**os.environ, "IWM_SERVICE_HOST": "127.0.0.1", "IWM_SERVICE_PORT": str(port)}
    log = tmp_path / "sidecar.log"
    with log.open("wb") as sink:
        sidecar = subprocess.Popen(
            [sys.executable, str(ROOT / "launch.py"), "--run-dir", str(tmp_path / "run"),
             "--quiet", "--source", "synthetic:64x64", "--fps", "30", "--untrained",
             "--encoder", "vit_tiny_patch16_224", "--img-size", "32"],
            cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            code = (
                "import json, sys, time\n"
                "from agent_bridge import IWMClient, VisionBridge\n"
                "target = sys.argv[1]\n"
                "deadline = time.monotonic() + 150\n"
                "with VisionBridge(target) as bridge:\n"
                "    state = bridge.wait_update(timeout_s=150)\n"
                "    while state.vision_prediction_surprise is None:\n"
                "        assert time.monotonic() < deadline, 'no surprise'\n"
                "        state = bridge.wait_update(timeout_s=30)\n"
                "with IWMClient(target, timeout_s=30) as rpc:\n"
                "    health = rpc.health()\n"
                "print(json.dumps({'surprise': state.vision_prediction_surprise,\n"
                "                  'seq': state.frame_seq, 'health': sorted(health),\n"
                "                  'torch': 'torch' in sys.modules}))\n")
            out = client.py(code, f"tcp://127.0.0.1:{port}", timeout=240)
            assert out.returncode == 0, f"{out.stderr[-3000:]}\nsidecar:\n{log.read_text()[-3000:]}"
        finally:
            sidecar.terminate()
            try:
                sidecar.wait(60)
            except subprocess.TimeoutExpired:
                sidecar.kill()
                sidecar.wait(10)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["torch"] is False
    assert isinstance(got["surprise"], float) and got["surprise"] >= 0.0
    assert got["seq"] is not None and "variant" in got["health"], got
