"""The flag tables of docs/cli.md, generated from the console scripts' own parsers and, for
``iwm-launch``, from the config tree those flags set (``launch_config.SidecarConfig``: each
flag's field, its default, the comment above it and the ``IWM_*`` variable it names).

    .venv/bin/python tools/cli_doc.py           # rewrite the generated tables in docs/cli.md
    .venv/bin/python tools/cli_doc.py --check   # exit 1 if docs/cli.md is out of date

Each table sits between ``<!-- cli:begin NAME -->`` and ``<!-- cli:end NAME -->`` in
docs/cli.md; the prose around them is written by hand and left alone.
``tests/test_docs.py`` runs the check, so a flag added to a config field or a parser without
running this script fails the tests.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "cli.md"
_ENV_RE = re.compile(r"env (IWM_[A-Z_]+)")


# ------------------------------------------------------------------ the parsers


def launch_parser() -> argparse.ArgumentParser:
    """``iwm-launch``'s parser. ``launch_config.parse_args`` builds and parses in one call,
    so the parser is taken from it as it parses (a ``build_parser()`` there, as iwm-train
    and iwm-eval have, would make this a plain call)."""
    import launch_config

    got: list[argparse.ArgumentParser] = []

    class _Built(Exception):
        pass

    def take(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        got.append(self)
        raise _Built

    with mock.patch.object(argparse.ArgumentParser, "parse_args", take):
        try:
            launch_config.parse_args([])
        except _Built:
            pass
    return got[0]


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every console script of setup.cfg, by name."""
    from iwm_bus.session.cli import build_parser as session_parser
    from train.cli import build_parser as train_parser
    from train.eval_cli import build_parser as eval_parser

    return {"iwm-launch": launch_parser(), "iwm-session": session_parser(),
            "iwm-train": train_parser(), "iwm-eval": eval_parser()}


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's subcommands (``iwm-session info``, ...), in order; {} for none."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    """The parser's arguments as ``--help`` lists them, without -h and subcommands."""
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        yield action


def flag_names(parser: argparse.ArgumentParser) -> set[str]:
    """Every ``--flag`` a parser (and its subcommands) takes."""
    names = {s for a in options(parser) for s in a.option_strings if s.startswith("--")}
    for sub in subparsers(parser).values():
        names |= flag_names(sub)
    return names


# ------------------------------------------------------------------ the config tree


def field_docs(path: Path, class_name: str) -> dict[str, tuple[Any, str]]:
    """A config dataclass's fields, read from its source without importing it (train's
    configs import torch): name -> (the default as written, or None; the comment lines above
    the field, joined: STYLE's "a comment above each field")."""
    source = path.read_text()
    lines = source.splitlines()
    cls = next(n for n in ast.walk(ast.parse(source))
               if isinstance(n, ast.ClassDef) and n.name == class_name)
    out: dict[str, tuple[Any, str]] = {}
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        comment: list[str] = []
        row = node.lineno - 2
        while row >= 0 and lines[row].strip().startswith("#"):
            comment.insert(0, lines[row].strip().lstrip("#").strip())
            row -= 1
        out[node.target.id] = (_default_source(node.value, source), " ".join(comment))
    return out


def _default_source(value: ast.expr | None, source: str) -> Any:
    """The default a field is declared with: ``= 30.0`` -> 30.0, ``field(default=X, ...)``
    -> X, a literal as its value (``"cpu"`` -> cpu); a factory or an expression as written
    (``default_run_dir()``); None for none, or an empty list / None default."""
    if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "field":
        kws = {kw.arg: kw.value for kw in value.keywords}
        if "default_factory" in kws:
            text = ast.get_source_segment(source, kws["default_factory"])
            return None if text in ("list", "dict") else f"{text}()"
        value = kws.get("default")
    if value is None:
        return None
    try:
        return ast.literal_eval(value)
    except ValueError:
        return ast.get_source_segment(source, value)


def tree_fields() -> dict[str, tuple[str, Any, str]]:
    """``--flag`` -> (``Owner.field``, default, comment) for every flag of iwm-launch's tree."""
    from iwm_bus.config import flags_of
    from launch_config import SidecarConfig

    out = {}
    for fl in flags_of(SidecarConfig):
        name = fl.path[-1]
        f = {f.name: f for f in dataclasses.fields(fl.owner)}[name]
        default: Any = None  # a required field (the recorder's path): no default
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f"{f.default_factory.__name__}()"
        docs = field_docs(Path(inspect.getsourcefile(fl.owner) or ""), fl.owner.__name__)
        out[fl.name] = (f"{fl.owner.__name__}.{name}", default, docs[name][1])
    return out


# ------------------------------------------------------------------ the tables


def _cell(text: Any) -> str:
    """Text in a table cell: ``|`` escaped, ``<env id>`` kept visible (not taken for HTML)."""
    return (str(text).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
            .replace("\n", " "))


def _code(text: str) -> str:
    """Inline code that keeps a ``|`` inside it (GitHub tables split on a bare one)."""
    return f"`{text}`".replace("|", "\\|")


def usage(action: argparse.Action) -> str:
    """``--fps FPS``, ``--mode {realtime,lossless}``, ``--viewer [SPEC]``, ``path``."""
    if not action.option_strings:
        return action.metavar or action.dest
    name = ", ".join(action.option_strings)
    if action.nargs == 0:
        return name
    if action.choices is not None:
        arg = "{" + ",".join(str(c) for c in action.choices) + "}"
    else:
        metavar = action.metavar or action.dest.upper()
        arg = metavar if isinstance(metavar, str) else " ".join(metavar)
    if action.nargs == "?":
        arg = f"[{arg}]"
    elif action.nargs in ("+", "*"):
        arg = f"{arg} [{arg} ...]"
    return f"{name} {arg}"


def _default(value: Any) -> str:
    if value is None or value is argparse.SUPPRESS or value == []:
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        value = "x".join(str(v) for v in value)
    return _code(str(value))


def launch_table(parser: argparse.ArgumentParser) -> list[str]:
    """iwm-launch: one row per flag, grouped as ``--help`` groups them. A flag of the tree
    names its field, the field's default and ``IWM_*`` variable (from the comment above the
    field), and the comment itself where the flag has no help."""
    tree = tree_fields()
    rows = ["| flag | default | env | sets | meaning |", "|---|---|---|---|---|"]
    for group in parser._action_groups:
        acts = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if not acts:
            continue
        rows.append(f"| **{_cell(group.title.split(' (')[0])}** | | | | |")
        for a in acts:
            path, default, comment = tree.get(a.option_strings[-1], ("", a.default, ""))
            env = ", ".join(f"`{e}`" for e in _ENV_RE.findall(comment))
            sets = f"`{path}`" if path else "launcher"
            rows.append(f"| {_code(usage(a))} | {_default(default)} | {env} | {sets} | "
                        f"{_cell(a.help or comment)} |")
    return rows


def plain_table(parser: argparse.ArgumentParser,
                fields: dict[str, tuple[Any, str]] | None = None,
                owner: str = "") -> list[str]:
    """One row per argument: usage, default, meaning. With ``fields`` (the config class
    ``owner`` the flags set, by field name), a flag named after a field says so and takes
    the field's default and, without a help of its own, its comment."""
    fields = fields or {}
    head = "| argument | default | sets | meaning |" if fields else "| argument | default | meaning |"
    rows = [head, "|---|---|---|---|" if fields else "|---|---|---|"]
    for a in options(parser):
        default, comment = fields.get(a.dest, (None, ""))
        meaning = _cell(a.help or comment)
        if a.option_strings and a.required:
            meaning = f"**required.** {meaning}".strip()
        elif not a.option_strings and a.nargs == "?":
            meaning = f"(optional) {meaning}".strip()
        default_cell = _default(a.default if default is None else default)
        sets = [f"`{owner}.{a.dest}`" if a.dest in fields else ""] if fields else []
        rows.append(" | ".join([f"| {_code(usage(a))}", default_cell, *sets, meaning]) + " |")
    return rows


def tables() -> dict[str, list[str]]:
    """Each generated block of docs/cli.md by its marker name."""
    train_fields = field_docs(ROOT / "train" / "config.py", "TrainConfig")
    out: dict[str, list[str]] = {}
    for name, parser in parsers().items():
        subs = subparsers(parser)
        if name == "iwm-launch":
            out[name] = launch_table(parser)
        elif name == "iwm-train":
            out[name] = plain_table(parser, train_fields, "TrainConfig")
        elif subs:
            for sub_name, sub in subs.items():
                out[f"{name} {sub_name}"] = plain_table(sub)
        else:
            out[name] = plain_table(parser)
    return out


# ------------------------------------------------------------------ docs/cli.md


def _block(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- cli:begin {re.escape(name)} -->\n)(.*?)(<!-- cli:end "
                      rf"{re.escape(name)} -->)", re.S)


def render(text: str, blocks: dict[str, list[str]]) -> str:
    """``text`` with each generated block replaced; a block without its markers in the
    text raises (a new console script or subcommand needs a place in the page)."""
    for name, rows in blocks.items():
        pattern = _block(name)
        if not pattern.search(text):
            raise KeyError(f"{DOC.relative_to(ROOT)} has no <!-- cli:begin {name} --> / "
                           f"<!-- cli:end {name} --> markers: add them where its table goes")
        body = "\n".join(rows) + "\n"
        text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(3), text)
    return text


def main(argv: list[str] | None = None,
         out: Callable[[str], object] = print) -> int:
    p = argparse.ArgumentParser(prog="tools/cli_doc.py", description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md is stale")
    args = p.parse_args(argv)
    old = DOC.read_text()
    new = render(old, tables())
    if args.check:
        if new != old:
            out(f"{DOC.relative_to(ROOT)} is out of date: run .venv/bin/python tools/cli_doc.py")
            return 1
        return 0
    if new != old:
        DOC.write_text(new)
        out(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
