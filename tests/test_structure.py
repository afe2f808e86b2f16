"""The shape of the code: no import cycles, layers that only import downwards, private names
that stay in their module, and a bus an agent can import without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("iwm_bus", "workers", "agent_bridge", "train")
#: what each top-level package may import of the others (the library at the bottom)
ALLOWED = {"iwm_bus": set(), "agent_bridge": {"iwm_bus"}, "workers": {"iwm_bus"},
           "train": {"iwm_bus", "workers"}}
#: entry points that start or drive the processes above them (imported by no library code)
ENTRY_POINTS = {
    "iwm_bus.session.cli": {"workers"},  # `iwm-session view` draws with the live viewer's log
    "agent_bridge.gym": {"workers"},  # the gymnasium wrapper runs a capture and a worker
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> list[tuple[str, str]]:
    """(module imported, name taken from it or "") for every import in the file, wherever
    it is (module level, TYPE_CHECKING, inside functions)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join([*pkg, base] if base else pkg)
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, "") if sub in modules else (base, a.name))
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for target, _ in _imports(path, name, modules):
            if target in modules and target != name:
                graph[name].add(target)
    return graph


def test_no_import_cycles() -> None:
    graph = _graph()
    # a package's __init__ importing its own modules is how a package re-exports; an edge
    # from a module up to its own package's __init__ would close a cycle through it
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_packages_import_only_downwards() -> None:
    modules = _modules()
    bad = []
    for name, path in modules.items():
        top = name.split(".")[0]
        for target, _ in _imports(path, name, modules):
            other = target.split(".")[0]
            allowed = ALLOWED[top] | ENTRY_POINTS.get(name, set())
            if other in PACKAGES and other != top and other not in allowed:
                bad.append(f"{name} imports {target}")
    assert not bad, bad
    # and the entry points are imported by nothing but tests and console scripts
    for name, path in modules.items():
        for target, _ in _imports(path, name, modules):
            assert target not in ENTRY_POINTS or target == name, f"{name} imports {target}"


def test_private_names_stay_in_their_module() -> None:
    modules = _modules()
    bad = []
    for name, path in modules.items():
        for target, taken in _imports(path, name, modules):
            if taken.startswith("_") and not taken.startswith("__") and target in modules:
                bad.append(f"{name} takes {target}.{taken}")
    assert not bad, bad


def test_an_agent_imports_the_bus_and_bridge_without_torch() -> None:
    code = ("import sys, iwm_bus.bus.ring, iwm_bus.bus.wire, iwm_bus.bus.transport, "
            "iwm_bus.bus.rpc, iwm_bus.config, iwm_bus.metrics, agent_bridge, "
            "agent_bridge.client, workers.ring_reader; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
