"""The docs say what the code does: the README stays a short front door, every flag of every
console script is in docs/cli.md (whose tables tools/cli_doc.py generates), every command in
the README's and docs' code blocks names a console script and flags that exist, every
relative link resolves, and the README's agent snippet runs against a real sidecar.

    .venv/bin/pytest tests/test_docs.py -q
    .venv/bin/pytest tests/test_docs.py -q -m "not slow"     # without the sidecar
"""

from __future__ import annotations

import configparser
import importlib.util
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CLI_DOC = ROOT / "docs" / "cli.md"
MARKDOWN = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 12_000
#: the Quick start's two commands (CI runs the second: .ci/run; the first installs the sidecar extra)
QUICK_START = (
    "python3 -m venv .venv && .venv/bin/pip install -e '.[sidecar]' && .venv/bin/iwm-launch",
    "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test,games,bench]' && .venv/bin/pytest",
)
FLAG_RE = re.compile(r"(?<![\w-])--[a-zA-Z][\w-]*")
#: how long the snippet's sidecar may take to answer (it loads torch on a busy machine)
SIDECAR_START_S = 180.0
SNIPPET_S = 120.0


def _tool(name: str) -> ModuleType:
    """``tools/<name>.py`` as a module (tools/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"_tools_{name}", ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


cli_doc = _tool("cli_doc")


def console_scripts() -> dict[str, str]:
    """setup.cfg's console scripts: name -> ``module:function``."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict((s.strip() for s in line.split("=", 1)) for line in lines)  # type: ignore[misc]


SCRIPTS = console_scripts()
PARSERS = cli_doc.parsers()


def help_text(script: str, *args: str) -> str:
    """What ``script *args --help`` prints, run as the console script runs."""
    module, function = SCRIPTS[script].split(":")
    code = (f"import sys; sys.argv = {[script, *args, '--help']!r}; "
            f"from {module} import {function}; sys.exit({function}())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def cli_block(name: str) -> str:
    """The generated table of ``name`` (a script, or ``script subcommand``) in docs/cli.md."""
    m = re.search(rf"<!-- cli:begin {re.escape(name)} -->\n(.*?)<!-- cli:end {re.escape(name)} -->",
                  CLI_DOC.read_text(), re.S)
    assert m, f"docs/cli.md has no generated table for {name}"
    return m.group(1)


def help_cases() -> Iterator[tuple[str, ...]]:
    for script in SCRIPTS:
        subs = cli_doc.subparsers(PARSERS[script])
        if subs:
            yield from ((script, sub) for sub in subs)
        else:
            yield (script,)


# ------------------------------------------------------------------ the README


def test_readme_is_a_front_door_not_a_reference() -> None:
    size = len(README.read_text())
    assert size <= README_LIMIT, (f"README.md is {size} characters (limit {README_LIMIT}): "
                                  "move reference material into docs/, numbers into "
                                  "docs/results.md")


def test_quick_start_holds_the_two_commands_and_ci_runs_the_second() -> None:
    text = README.read_text()
    block = text.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    assert block.splitlines() == list(QUICK_START)
    assert QUICK_START[1] in (ROOT / ".ci" / "run").read_text()


def test_changelog_has_the_version_in_setup_cfg() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    version = cfg["metadata"]["version"]
    assert re.search(rf"^## \[{re.escape(version)}\]", (ROOT / "CHANGELOG.md").read_text(),
                     re.M), f"CHANGELOG.md has no '## [{version}]' entry (setup.cfg's version)"


def test_results_page_has_the_model_section_issue_23_fills() -> None:
    text = (ROOT / "docs" / "results.md").read_text()
    assert "## World model on held-out data\n<!-- model-results: filled by issue 23 -->" in text


# ------------------------------------------------------------------ docs/cli.md


@pytest.mark.parametrize("command", list(help_cases()), ids=" ".join)
def test_every_flag_in_help_is_in_the_cli_reference(command: tuple[str, ...]) -> None:
    text = help_text(*command)
    flags = set(FLAG_RE.findall(text)) - {"--help"}
    positional = text.split("positional arguments:\n", 1)[1].split("\n\n", 1)[0] \
        if "positional arguments:" in text else ""
    flags |= set(re.findall(r"^  (\w+)", positional, re.M))
    assert flags, f"no arguments read from {' '.join(command)} --help"
    block = cli_block(" ".join(command))
    missing = sorted(f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", block))
    assert not missing, (f"{' '.join(command)} --help has {missing}, which docs/cli.md does not: "
                         "run .venv/bin/python tools/cli_doc.py")


def test_cli_reference_tables_are_generated_from_the_code() -> None:
    assert cli_doc.main(["--check"], out=lambda _: None) == 0, (
        "docs/cli.md's tables differ from the parsers and the config tree: run "
        ".venv/bin/python tools/cli_doc.py")


def test_architecture_picture_is_generated_from_its_script() -> None:
    assert _tool("architecture").main(["--check"]) == 0


# ------------------------------------------------------------------ commands in code blocks


def code_blocks(path: Path) -> Iterator[tuple[str, str]]:
    """(language, body) of every fenced block."""
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", path.read_text(), re.S | re.M):
        yield m.group(1), m.group(2)


def shell_commands(body: str) -> Iterator[list[str]]:
    """Each simple command of a shell block, as words, without comments and env settings."""
    text = re.sub(r"\\\n", " ", body)
    for line in text.splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        command: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", "||", ";", "|"):
                while command and re.match(r"^[A-Z_][A-Z0-9_]*=", command[0]):
                    command.pop(0)
                if command:
                    yield command
                command = []
            else:
                command.append(word)


def program(words: list[str]) -> tuple[str | None, list[str]]:
    """The console script a command runs (``python -m train`` and ``torchrun ... -m train``
    are iwm-train) and its arguments; None for another program."""
    name = Path(words[0]).name
    if name.startswith("iwm-"):
        return name, words[1:]
    if "-m" in words and name in ("python", "python3", "torchrun"):
        module = words[words.index("-m") + 1]
        if module == "train":
            return "iwm-train", words[words.index("-m") + 2:]
    return None, words[1:]


def command_problems(path: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with the commands in ``path``'s shell blocks (``root``: where the
    scripts they run live)."""
    problems = []
    for lang, body in code_blocks(path):
        if lang not in ("", "bash", "sh", "console"):
            continue
        for words in shell_commands(body):
            script, args = program(words)
            where = f"{path.relative_to(root)}: {' '.join(words)}"
            if script is None:
                if Path(words[0]).name in ("python", "python3", "bash") and len(args) and \
                        args[0].endswith((".py", ".sh")) and not (root / args[0]).exists():
                    problems.append(f"{where}: {args[0]} does not exist")
                continue
            if script not in SCRIPTS:
                problems.append(f"{where}: no console script {script} (setup.cfg)")
                continue
            known = cli_doc.flag_names(PARSERS[script])
            for word in args:
                flag = word.split("=", 1)[0]
                if flag.startswith("--") and flag not in known:
                    problems.append(f"{where}: {script} has no flag {flag}")
    return problems


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_commands_in_code_blocks_name_scripts_and_flags_that_exist(path: Path) -> None:
    problems = command_problems(path)
    assert not problems, "\n".join(problems)


def test_the_command_check_catches_a_wrong_flag_and_a_wrong_script(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```bash\niwm-launch --source synthetic --no-such-flag 3\n"
                    "IWM_DEVICE=cuda .venv/bin/iwm-lanch --fps 3   # typo\n"
                    "python tools/no_such_script.py\n```\n")
    problems = command_problems(page, root=tmp_path)
    assert any("no flag --no-such-flag" in p for p in problems)
    assert any("no console script iwm-lanch" in p for p in problems)
    assert any("tools/no_such_script.py does not exist" in p for p in problems)


# ------------------------------------------------------------------ links


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip()).lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    out: set[str] = set()
    seen: dict[str, int] = {}
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    for m in re.finditer(r"^#{1,6} (.+)$", text, re.M):
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(path: Path) -> None:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.name}")
    assert not broken, f"{path.relative_to(ROOT)}: {broken}"


# ------------------------------------------------------------------ the README's snippet


def readme_snippet() -> str:
    """The Python block of "Plug it into your agent"."""
    section = README.read_text().split("## Plug it into your agent", 1)[1].split("\n## ", 1)[0]
    blocks = [body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", section, re.S | re.M)
              if lang == "python"]
    assert len(blocks) == 1, "the section holds one Python snippet"
    return blocks[0]


def test_readme_snippet_is_about_fifteen_lines_and_uses_the_three_names() -> None:
    code = readme_snippet()
    assert len(code.strip().splitlines()) <= 16
    for name in ("VisionBridge", "BeingState", "IWMClient"):
        assert name in code


@pytest.mark.slow
@pytest.mark.timeout(SIDECAR_START_S + SNIPPET_S + 90)
def test_readme_snippet_runs_against_a_real_sidecar() -> None:
    """The snippet as printed, its run dir swapped for a fresh one, against ``iwm-launch``
    (synthetic frames, a small untrained model so the worker loads quickly)."""
    from agent_bridge import IWMClient

    code = readme_snippet()
    assert '"/tmp/iwm-demo"' in code
    with tempfile.TemporaryDirectory(prefix="iwmd", dir="/tmp") as tmp, \
            tempfile.TemporaryFile() as log:
        run_dir = Path(tmp) / "run"
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "launch.py"), "--run-dir", str(run_dir), "--quiet",
             "--no-standby", "--source", "synthetic:64x64", "--fps", "15", "--untrained",
             "--encoder", "vit_tiny_patch16_224", "--img-size", "32", "--duration", "600"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

        def output() -> str:
            log.seek(0)
            return log.read().decode(errors="replace")[-3000:]

        try:
            deadline = time.monotonic() + SIDECAR_START_S
            while not (run_dir / "sidecar.json").exists():
                assert proc.poll() is None, f"iwm-launch exited {proc.returncode}\n{output()}"
                assert time.monotonic() < deadline, f"no sidecar after {SIDECAR_START_S} s\n{output()}"
                time.sleep(0.2)
            with IWMClient(run_dir, timeout_s=max(1.0, deadline - time.monotonic())) as client:
                client.health()  # the worker has loaded its model
            run = subprocess.run([sys.executable, "-c", code.replace("/tmp/iwm-demo", str(run_dir))],
                                 cwd=ROOT, capture_output=True, text=True, timeout=SNIPPET_S)
            assert run.returncode == 0, f"{run.stderr[-3000:]}\n--- sidecar:\n{output()}"
            first = run.stdout.splitlines()[0].split()
            assert int(first[0]) >= 0  # frame_seq, surprise, MRR of a real frame
            assert "(3, 192)" in run.stdout  # three imagined steps of the ViT-Ti latent
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
