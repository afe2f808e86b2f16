"""The install's parts: setup.cfg's extras and ``iwm_bus.extras`` name the same packages, the
core dependencies carry nothing of the extras, and a missing part is one line naming its
extra (a command exits 2; an import raises MissingExtraError). The real client-only install
is tests/test_client_install.py."""

from __future__ import annotations

import configparser
import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

import pytest

from iwm_bus import commands, extras
from iwm_bus.extras import EXTRAS, MissingExtraError, require

ROOT = Path(__file__).resolve().parents[1]


def _requirements(section: str, key: str) -> list[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [line.split("#")[0].strip() for line in cfg[section][key].splitlines()]
    return [line for line in lines if line]


def _dists(extra: str) -> set[str]:
    """The distributions extra ``extra`` installs, its self-references (iwm-bus[x]) expanded."""
    out: set[str] = set()
    for req in _requirements("options.extras_require", extra):
        name = re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower()
        if name == "iwm-bus":
            for sub in re.search(r"\[(.*)\]", req).group(1).split(","):
                out |= _dists(sub.strip())
        else:
            out.add(name)
    return out


def _providers() -> dict[str, set[str]]:
    """top-level module -> distributions (lower case) installed here that provide it."""
    return {mod: {d.lower() for d in dists} for mod, dists in md.packages_distributions().items()}


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_each_extra_installs_the_modules_it_is_checked_for(extra: str) -> None:
    providers, dists = _providers(), _dists(extra)
    for module in EXTRAS[extra]:
        top = module.split(".")[0]
        assert providers.get(top, set()) & dists, \
            f"{module} (of extras.EXTRAS[{extra!r}]) comes from none of setup.cfg's [{extra}]"
    checked = {m.split(".")[0] for m in EXTRAS[extra]}
    for dist in dists:
        tops = {mod for mod, by in providers.items() if dist in by}
        assert tops & checked, f"setup.cfg's [{extra}] installs {dist}, which no module of " \
                               f"extras.EXTRAS[{extra!r}] ({sorted(checked)}) comes from"


def test_the_core_dependencies_bring_nothing_of_an_extra() -> None:
    providers = _providers()
    heavy = {m.split(".")[0] for mods in EXTRAS.values() for m in mods}
    core = {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower()
            for r in _requirements("options", "install_requires")}
    brought = {mod for mod, by in providers.items() if by & core} & heavy
    assert not brought, f"install_requires brings {sorted(brought)}: they belong in an extra"
    assert core == {"numpy", "pyzmq", "msgpack", "loguru"}, core


def test_require_names_the_extra_and_what_needs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    require("sidecar", "the worker")  # installed here: no error
    monkeypatch.setitem(EXTRAS, "sidecar", (*EXTRAS["sidecar"], "iwm_no_such_module"))
    with pytest.raises(MissingExtraError, match=r"the worker needs iwm_no_such_module "
                                                r"\(not installed\): pip install 'iwm-bus\[sidecar\]'"):
        require("sidecar", "the worker")
    with pytest.raises(ValueError, match="unknown extra 'gpu'"):
        require("gpu", "x")
    assert extras.missing(["google.protobuf", "iwm_no.such", "numpy"]) == ["iwm_no.such"]


def test_a_command_without_its_extra_prints_one_line_and_exits_2(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(EXTRAS, "train", (*EXTRAS["train"], "iwm_no_such_module"))
    assert commands.run("iwm-train", ["--help"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["iwm-train needs iwm_no_such_module (not installed): "
                   "pip install 'iwm-bus[train]'"], err


def test_a_command_with_its_extra_runs_its_main(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        commands.run("iwm-session", ["--help"])
    assert exit_.value.code == 0
    assert "usage: iwm-session" in capsys.readouterr().out


@pytest.mark.parametrize(("module", "blocked"), [("iwm_bus.model", "torch"),
                                                 ("iwm_bus.session", "mcap"),
                                                 ("agent_bridge.gym", "gymnasium")])
def test_importing_a_part_without_its_package_names_the_extra(module: str, blocked: str) -> None:
    # sys.modules[name] = None: find_spec says "not installed" and import fails, as without it
    code = f"import sys; sys.modules[{blocked!r}] = None; import {module}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode != 0 and last.startswith("iwm_bus.extras.MissingExtraError"), out.stderr
    assert f"{module} needs {blocked}" in last and "pip install 'iwm-bus[sidecar]'" in last, last
