"""Mutation testing of the metric and model core (issue 12, item 7). Not run by CI.

Applies one mutant at a time to a private copy of the repository (never to the working
tree: other people edit it while this runs), runs a few fast test files against the copy
and reports which mutants the tests kill. The mutated code: ``iwm_bus/metrics.py``, the
predictor's conditioning path (``iwm_bus/model/predictor.py``, ``iwm.py``, ``inputs.py``)
and the worker's per-frame surprise / MRR step (``workers/model_stream.py``, and the
horizon ranking in ``workers/stream.py``).

Mutants are of two kinds. *Named* ones are written by hand: the four the issue found the
suite could not catch (N1-N4: the conditioning vector zeroed before the predictor, the
uncertainty a constant, per-frame and horizon MRR queried with the observed latent) plus a
few more of the same sort (H*). *Generated* ones (A*) come from the AST of selected
functions: operator swaps, constant replacement, return value replaced by zeros, argument
dropping; a seeded sample of them runs. A mutant is killed when a test fails (a timeout or
an import error counts as killed), survives when all selected tests pass.

    .venv/bin/python tools/mutation.py                    # named + 40 generated, 5-7 min
    .venv/bin/python tools/mutation.py --named-only       # the named mutants, ~2 min
    .venv/bin/python tools/mutation.py --list             # list the mutants, run nothing
    .venv/bin/python tools/mutation.py --only N3,A012 --keep   # a few, keep the copy
    .venv/bin/python tools/mutation.py --max-auto 0 --jobs 1 --timeout 90 --budget 300

The copy is ``git ls-files`` (tracked + untracked, not ignored) of the working tree under a
temporary directory; tests run there with ``PYTHONPATH=<copy>``, ``--rootdir <copy>`` and no
bytecode writing, and the run checks first that the copy's modules are the ones imported
and that the selected tests pass unmutated. Each mutated file is restored in a ``finally``
(also on Ctrl-C) and all copies are checked against the originals' sha256 at the end.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: files bigger than this are symlinked into the copy, not copied (weights; never mutated)
LINK_OVER_BYTES = 1 << 20

# ----------------------------------------------------------------------------- what runs

#: test groups: (file, regex on the test name); resolved to node ids by one collection run.
#: Fast files only: the worker-process tests of test_encoder.py and the 11 s training-loss
#: test are left out (both are covered by the in-process tests selected here).
GROUPS: dict[str, tuple[tuple[str, str], ...]] = {
    "stream": (("tests/worker/test_encoder.py", r"model_stream|latent_bank"),),
    "metrics": (("tests/test_metrics.py", r""),),
    "model": (("tests/model/test_model.py", r""),
              ("tests/training/test_model_training.py", r"^(?!test_loss_decreases)")),
}


@dataclass(frozen=True)
class Target:
    """A file whose functions are mutated and the test groups run against its mutants."""

    path: str
    functions: tuple[str, ...]  # "func" or "Class.method": the bodies generated mutants touch
    groups: tuple[str, ...]  # fastest first (pytest runs with -x)


TARGETS = (
    Target("iwm_bus/metrics.py",
           ("layer_norm", "surprise", "patch_errors", "errors_surprise", "cosine_similarity",
            "reciprocal_ranks", "reciprocal_rank", "mrr", "RunningMean.update",
            "RunningMean.value", "SurpriseZ.score", "SurpriseZ.update"),
           ("metrics", "stream")),
    Target("iwm_bus/model/predictor.py",
           ("IWMPredictor.condition", "IWMPredictor.forward", "ensemble_spread"),
           ("stream", "model")),
    Target("iwm_bus/model/iwm.py", ("IWM._heads", "IWM._step_device", "IWM.rollout"),
           ("stream", "model")),
    Target("iwm_bus/model/inputs.py", ("check_cond", "check_actions"), ("stream", "model")),
    Target("workers/model_stream.py", ("ModelStream.step", "ModelStream._predict"),
           ("stream",)),
    Target("workers/stream.py", ("HorizonMRR.observe", "LatentBank.rank"), ("stream",)),
)
TARGET_BY_PATH = {t.path: t for t in TARGETS}

#: hand-written mutants: (id, file, exact source text (must occur once), replacement, what)
NAMED = (
    ("N1", "iwm_bus/model/iwm.py",
     "        b = z.shape[0]\n        tgt_idx = self.all_idx.expand(b, -1)",
     "        c = torch.zeros_like(c)  # mutant\n"
     "        b = z.shape[0]\n        tgt_idx = self.all_idx.expand(b, -1)",
     "action/conditioning vector zeroed before the predictor (IWM._heads)"),
    ("N2", "iwm_bus/model/iwm.py",
     "mean if p is not None else None, ensemble_spread(heads)",
     "mean if p is not None else None, torch.full_like(z[:, 0], 0.5)",
     "uncertainty replaced by a constant 0.5 (IWM._step_device)"),
    ("N3", "workers/model_stream.py",
     "rr = self.bank.rank(frame_key(pred), key)",
     "rr = self.bank.rank(key, key)",
     "per-frame MRR queried with the observed latent (trivially 1.0)"),
    ("N4", "workers/model_stream.py",
     "list(preds[1:])",
     "[p] * (len(preds) - 1)",
     "horizon MRR leaked: rollout chains' predictions replaced by the observed latent"),
    ("H1", "workers/model_stream.py",
     "cond = np.repeat(action.cond[None], b, axis=0)",
     "cond = np.zeros((b, len(action.cond)), np.float32)",
     "worker zeroes the action vector before predicting"),
    ("H2", "workers/model_stream.py",
     "ids = np.full(b, action.action_id) if self.model.config.num_actions else None",
     "ids = None",
     "worker drops the discrete action id"),
    ("H3", "iwm_bus/model/predictor.py",
     "c = self.cond_embed(cond)",
     "c = self.cond_embed(torch.zeros_like(cond))",
     "conditioning vector ignored inside the predictor"),
    ("H4", "iwm_bus/model/predictor.py",
     "return dev.square().mean(dim=(0, 2, 3)).sqrt()",
     "return torch.full_like(dev[0, :, 0, 0], 0.5)",
     "ensemble spread replaced by a constant 0.5"),
    ("H5", "workers/model_stream.py",
     "errors = metrics.patch_errors(pred, p)",
     "errors = metrics.patch_errors(p_prev, p)",
     "surprise scored against the previous frame, not the prediction"),
    ("H6", "iwm_bus/model/predictor.py",
     "return out + prior[None] if prior is not None else out",
     "return out",
     "predicted change not added to the current latent"),
    ("H7", "iwm_bus/model/iwm.py",
     "            z, p = pred.z_cls, pred.patches\n",
     "            pass  # mutant: the start state is fed at every step\n",
     "rollout not autoregressive (start state fed at every step)"),
    ("H8", "iwm_bus/metrics.py",
     "dist = np.linalg.norm(layer_norm(p) - layer_norm(o), axis=-1)",
     "dist = np.linalg.norm(p - o, axis=-1)",
     "surprise without the layer norm"),
    ("H9", "iwm_bus/metrics.py",
     "sims = cosine_similarity(pool, p[:, None])",
     "sims = cosine_similarity(pool, o[:, None])",
     "reciprocal_ranks queried with the observed latent"),
    ("H10", "workers/stream.py",
     "rr_h = bank.rank(frame_key(p), key)",
     "rr_h = bank.rank(key, key)",
     "horizon rank queried with the observed latent (HorizonMRR.observe)"),
)


@dataclass(frozen=True)
class Mutant:
    id: str
    path: str
    line: int
    what: str
    start: int  # byte offsets of the replaced span in the original file
    end: int
    new: bytes

    def apply(self, original: bytes) -> bytes:
        return original[:self.start] + self.new + original[self.end:]


@dataclass
class Outcome:
    status: str  # killed | timeout | survived | error | skipped
    seconds: float = 0.0
    by: str = ""  # the first failing test, or why
    tail: str = ""  # the end of pytest's output (for errors)


# ----------------------------------------------------------------------------- mutants


def named_mutants(sources: dict[str, bytes]) -> list[Mutant]:
    out = []
    for mid, path, old, new, what in NAMED:
        src, old_b = sources[path], old.encode()
        n = src.count(old_b)
        if n != 1:
            raise SystemExit(f"named mutant {mid}: its anchor occurs {n} times in {path} "
                             f"(expected once); update NAMED in {__file__}:\n{old}")
        start = src.index(old_b)
        out.append(Mutant(mid, path, src[:start].count(b"\n") + 1, what, start,
                          start + len(old_b), new.encode()))
    return out


def _line_starts(src: bytes) -> list[int]:
    starts, pos = [0], 0
    while (pos := src.find(b"\n", pos) + 1) > 0:
        starts.append(pos)
    return starts


def _functions(tree: ast.Module, names: tuple[str, ...]) -> list[tuple[str, ast.AST]]:
    found = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            found.append((node.name, node))
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                qual = f"{node.name}.{item.name}" if isinstance(item, ast.FunctionDef) else ""
                if qual in names:
                    found.append((qual, item))
    return found


def _walk(node: ast.AST) -> Iterator[ast.AST]:
    """Nodes of a function body, skipping error paths, f-strings and annotations."""
    if isinstance(node, ast.Raise | ast.JoinedStr | ast.Assert):
        return
    yield node
    for name, value in ast.iter_fields(node):
        if name in ("annotation", "returns", "decorator_list"):
            continue
        for child in value if isinstance(value, list) else [value]:
            if isinstance(child, ast.AST):
                yield from _walk(child)


SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
        ast.Pow: ast.Mult, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
        ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
        ast.In: ast.NotIn, ast.NotIn: ast.In, ast.And: ast.Or, ast.Or: ast.And}
SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**",
          ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==",
          ast.NotEq: "!=", ast.Is: "is", ast.IsNot: "is not", ast.In: "in",
          ast.NotIn: "not in", ast.And: "and", ast.Or: "or"}


def _copy(node: ast.AST) -> ast.AST:
    return ast.parse(ast.unparse(node), mode="eval").body


def _variants(node: ast.AST) -> Iterator[tuple[ast.AST, ast.AST, str]]:
    """(span node, replacement expression node, what) for each mutation of ``node``."""
    if isinstance(node, ast.BinOp) and type(node.op) in SWAP:
        new = _copy(node)
        new.op = SWAP[type(node.op)]()
        yield node, new, f"{SYMBOL[type(node.op)]} -> {SYMBOL[type(new.op)]}"
    elif isinstance(node, ast.BoolOp):
        new = _copy(node)
        new.op = SWAP[type(node.op)]()
        yield node, new, f"{SYMBOL[type(node.op)]} -> {SYMBOL[type(new.op)]}"
    elif isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in SWAP:
                new = _copy(node)
                new.ops[i] = SWAP[type(op)]()
                yield node, new, f"{SYMBOL[type(op)]} -> {SYMBOL[type(new.ops[i])]}"
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.Not):
        yield node, _copy(node.operand), f"drop unary {'-' if isinstance(node.op, ast.USub) else 'not'}"
    elif isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, bool):
            new_v = not v
        elif isinstance(v, int):
            new_v = {0: 1, 1: 0}.get(v, v + 1)
        elif isinstance(v, float) and (v == 0.0 or abs(v) >= 1e-3):  # not eps guards
            new_v = 1.0 if v == 0.0 else v * 2
        else:
            return
        yield node, ast.Constant(new_v), f"constant {v!r} -> {new_v!r}"
    elif isinstance(node, ast.Return) and node.value is not None \
            and not isinstance(node.value, ast.Tuple | ast.Constant):
        yield node.value, ast.BinOp(ast.Constant(0), ast.Mult(), _copy(node.value)), \
            "return value replaced by 0 * value"
    elif isinstance(node, ast.Call):
        for i, kw in enumerate(node.keywords):
            if kw.arg is not None:
                new = _copy(node)
                del new.keywords[i]
                yield node, new, f"drop argument {kw.arg}="
        if len(node.args) >= 3 and not any(isinstance(a, ast.Starred) for a in node.args):
            new = _copy(node)
            new.args.pop()
            yield node, new, f"drop last argument {ast.unparse(node.args[-1])}"


def generated_mutants(path: str, src: bytes, functions: tuple[str, ...]) -> list[Mutant]:
    tree = ast.parse(src)
    starts = _line_starts(src)
    original_dump = ast.dump(tree)
    seen: set[bytes] = set()
    out = []
    for qual, fn in _functions(tree, functions):
        body = fn.body[1:] if (fn.body and isinstance(fn.body[0], ast.Expr)
                               and isinstance(fn.body[0].value, ast.Constant)) else fn.body
        for stmt in body:
            for node in _walk(stmt):
                for span, new, what in _variants(node):
                    start = starts[span.lineno - 1] + span.col_offset
                    end = starts[span.end_lineno - 1] + span.end_col_offset
                    text = f"({ast.unparse(new)})".encode()
                    mutated = src[:start] + text + src[end:]
                    try:
                        changed = ast.dump(ast.parse(mutated)) != original_dump
                    except SyntaxError:
                        continue
                    digest = hashlib.sha256(mutated).digest()
                    if changed and digest not in seen:
                        seen.add(digest)
                        out.append(Mutant("", path, span.lineno, f"{qual}: {what}", start, end,
                                          text))
    return out


def all_mutants(sources: dict[str, bytes], max_auto: int, seed: int) -> list[Mutant]:
    named = named_mutants(sources)
    rng = random.Random(seed)
    per_file = [generated_mutants(t.path, sources[t.path], t.functions) for t in TARGETS]
    for ms in per_file:
        rng.shuffle(ms)
    # round robin over the files, so that each is sampled evenly whatever its size
    auto = [ms[i] for i in range(max(map(len, per_file))) for ms in per_file if i < len(ms)]
    chosen = sorted(auto[:max_auto], key=lambda m: (m.path, m.start))
    chosen = [Mutant(f"A{i:03d}", m.path, m.line, m.what, m.start, m.end, m.new)
              for i, m in enumerate(chosen, start=1)]
    print(f"{len(named)} named mutants, {len(chosen)} of {len(auto)} generated "
          f"(seed {seed})", flush=True)
    return named + chosen


# ----------------------------------------------------------------------------- the copy


def make_copy(dest: Path) -> None:
    """The working tree's files (tracked and untracked, not ignored) under ``dest``."""
    names = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True, timeout=60).stdout.split(b"\0")
    for name in filter(None, names):
        rel = name.decode()
        src, dst = ROOT / rel, dest / rel
        if not src.is_file():  # deleted in the working tree, or a submodule
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.stat().st_size > LINK_OVER_BYTES:
            dst.symlink_to(src)
        else:
            shutil.copy2(src, dst)


def _env(copy: Path, threads: int) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "HYPOTHESIS_STORAGE_DIRECTORY": str(copy / ".hypothesis")}


def check_imports(copy: Path, threads: int) -> None:
    """Fail unless the copy's modules (not the working tree's) are the ones imported."""
    mods = sorted({t.path[:-3].replace("/", ".") for t in TARGETS})
    code = ("import importlib\n"
            f"for m in {mods!r}:\n"
            "    print(importlib.import_module(m).__file__)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=_env(copy, threads),
                         capture_output=True, text=True, timeout=120)
    if out.returncode:
        raise SystemExit(f"importing the copy's modules failed:\n{out.stderr[-3000:]}")
    for line in out.stdout.split():
        if not Path(line).resolve().is_relative_to(copy.resolve()):
            raise SystemExit(f"{line} was imported instead of the copy in {copy}: check "
                             "PYTHONPATH and the editable install")


def collect(copy: Path, threads: int) -> dict[str, list[str]]:
    """Node ids of each test group, from one ``pytest --collect-only`` in the copy."""
    files = sorted({f for group in GROUPS.values() for f, _ in group})
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                          "-p", "no:cacheprovider", "--rootdir", str(copy), *files],
                         cwd=copy, env=_env(copy, threads), capture_output=True, text=True,
                         timeout=300)
    if out.returncode:
        raise SystemExit(f"collecting the tests failed:\n{out.stdout[-3000:]}")
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    groups = {}
    for name, parts in GROUPS.items():
        groups[name] = [i for f, pattern in parts for i in ids
                        if i.startswith(f + "::") and re.search(pattern, i.split("::")[1])]
        if not groups[name]:
            raise SystemExit(f"test group {name!r} selects no tests")
    return groups


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- running


@dataclass
class Runner:
    copies: list[Path]
    originals: dict[str, bytes]
    groups: dict[str, list[str]]
    timeout: float
    deadline: float
    threads: int
    stop: threading.Event = field(default_factory=threading.Event)
    procs: dict[int, subprocess.Popen] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def tests_for(self, path: str) -> list[str]:
        return [i for g in TARGET_BY_PATH[path].groups for i in self.groups[g]]

    def pytest(self, copy: Path, node_ids: list[str], timeout: float) -> Outcome:
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
               "--rootdir", str(copy), "-rfE", "--hypothesis-seed=0", *node_ids]
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=copy, env=_env(copy, self.threads),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        with self.lock:
            self.procs[proc.pid] = proc
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            out, _ = proc.communicate(timeout=30)
            return Outcome("timeout", time.monotonic() - t0, f"over {timeout:.0f} s",
                           out[-2000:])
        except BaseException:  # Ctrl-C / SIGTERM while waiting: take the tests down too
            _kill(proc)
            proc.wait(30)
            raise
        finally:
            with self.lock:
                self.procs.pop(proc.pid, None)
        dt = time.monotonic() - t0
        if self.stop.is_set():
            return Outcome("error", dt, "interrupted")
        failed = re.search(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
        by = failed.group(1).split("::")[-1] if failed else ""
        if proc.returncode == 0:
            return Outcome("survived", dt)
        if proc.returncode in (1, 2):  # tests failed / collection or import error
            return Outcome("killed", dt, by or "collection error", out[-2000:])
        return Outcome("error", dt, f"pytest exit {proc.returncode}", out[-2000:])

    def run_one(self, copy: Path, m: Mutant) -> Outcome:
        path = copy / m.path
        original = self.originals[m.path]
        try:
            path.write_bytes(m.apply(original))
            return self.pytest(copy, self.tests_for(m.path), self.timeout)
        finally:
            path.write_bytes(original)

    def work(self, copy: Path, todo: queue.Queue, results: dict[str, Outcome],
             done: threading.Event) -> None:
        try:
            self._work(copy, todo, results)
        finally:
            done.set()

    def _work(self, copy: Path, todo: queue.Queue, results: dict[str, Outcome]) -> None:
        while not self.stop.is_set():
            try:
                m = todo.get_nowait()
            except queue.Empty:
                return
            if time.monotonic() > self.deadline:
                results[m.id] = Outcome("skipped", by="over --budget")
                continue
            results[m.id] = r = self.run_one(copy, m)
            print(f"  {m.id:5} {r.status:8} {r.seconds:5.1f} s  {m.path}:{m.line}  {m.what}"
                  + (f"  [{r.by}]" if r.by else ""), flush=True)

    def kill_all(self) -> None:
        with self.lock:
            for proc in list(self.procs.values()):
                _kill(proc)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the session we started for it
    except ProcessLookupError:
        pass


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def report(mutants: list[Mutant], results: dict[str, Outcome]) -> int:
    """Print the table and the score; the number of named mutants that survived or did not run."""
    print(f"\n{'id':5} {'where':22} {'result':8} {'what':62} killed by")
    for m in mutants:
        r = results.get(m.id, Outcome("skipped", by="not run"))
        what = m.what if len(m.what) <= 62 else m.what[:59] + "..."
        print(f"{m.id:5} {m.path.split('/')[-1] + ':' + str(m.line):22} {r.status:8} "
              f"{what:62} {r.by if r.status != 'survived' else ''}")
    counted = [results[m.id] for m in mutants if m.id in results
               and results[m.id].status in ("killed", "timeout", "survived")]
    killed = sum(r.status != "survived" for r in counted)
    named = [m for m in mutants if m.id.startswith("N")]
    named_alive = [m.id for m in named if results.get(m.id, Outcome("")).status
                   == "survived"]
    named_not_run = [m.id for m in named if results.get(m.id, Outcome("")).status
                     not in ("killed", "timeout", "survived")]
    other = len(mutants) - len(counted)
    score = 100.0 * killed / len(counted) if counted else float("nan")
    print(f"\nmutation score: {killed}/{len(counted)} killed = {score:.0f} % "
          f"(timeouts count as killed; {other} not counted: error or skipped)")
    for kind in ("N", "H", "A"):
        part = [results[m.id] for m in mutants if m.id.startswith(kind) and m.id in results
                and results[m.id].status in ("killed", "timeout", "survived")]
        if part:
            print(f"  {kind}: {sum(r.status in ('killed', 'timeout') for r in part)}/"
                  f"{len(part)} killed")
    print(f"named mutants ({', '.join(m.id for m in named) or 'none selected'}): "
          + (f"SURVIVED: {', '.join(named_alive)}" if named_alive else
             f"not run: {', '.join(named_not_run)}" if named_not_run else "all killed"))
    return len(named_alive) + len(named_not_run)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--named-only", action="store_true", help="no generated mutants")
    ap.add_argument("--max-auto", type=int, default=40, help="generated mutants to sample")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated sample")
    ap.add_argument("--only", default="", help="comma-separated mutant ids to run")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--jobs", type=int, default=2, help="mutants run at once (one copy each)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per mutant")
    ap.add_argument("--budget", type=float, default=480.0,
                    help="no new mutant starts after this many seconds")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copies")
    args = ap.parse_args()
    if args.jobs < 1 or args.timeout <= 0 or args.budget <= 0 or args.max_auto < 0:
        ap.error("--jobs >= 1, --timeout > 0, --budget > 0, --max-auto >= 0")

    sources = {t.path: (ROOT / t.path).read_bytes() for t in TARGETS}
    mutants = all_mutants(sources, 0 if args.named_only else args.max_auto, args.seed)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {m.id for m in mutants}
        if unknown:
            ap.error(f"unknown mutant ids: {sorted(unknown)}")
        mutants = [m for m in mutants if m.id in wanted]
    if args.list:
        for m in mutants:
            print(f"{m.id:5} {m.path}:{m.line}  {m.what}\n      -> {m.new.decode()[:100]!r}")
        return 0

    signal.signal(signal.SIGTERM, _raise_interrupt)
    tmp = Path(tempfile.mkdtemp(prefix="iwm-mutation-"))
    copies = [tmp / f"copy{j}" for j in range(args.jobs)]
    threads_per_job = max(1, (os.cpu_count() or 1) // args.jobs)
    results: dict[str, Outcome] = {}
    runner: Runner | None = None
    # one "finished" event per worker thread: the main thread waits on these, never on
    # Thread.join, which a Ctrl-C on Python 3.11 can leave believing a running thread ended
    finished: list[threading.Event] = []
    try:
        t0 = time.monotonic()
        for c in copies:
            make_copy(c)
            for rel, data in sources.items():  # mutate exactly what was read above
                (c / rel).write_bytes(data)
        check_imports(copies[0], threads_per_job)
        groups = collect(copies[0], threads_per_job)
        runner = Runner(copies, sources, groups, args.timeout, 0.0, threads_per_job)
        every = sorted({i for g in groups.values() for i in g})
        print(f"copies in {tmp}; baseline: {len(every)} tests ...", flush=True)
        base = runner.pytest(copies[0], every, args.timeout * 3)
        if base.status != "survived":
            raise SystemExit(f"the selected tests do not pass unmutated ({base.status}, "
                             f"{base.by}):\n{base.tail}")
        print(f"baseline passed in {base.seconds:.1f} s; running {len(mutants)} mutants "
              f"({args.jobs} at a time, {args.timeout:.0f} s each at most)", flush=True)
        runner.deadline = time.monotonic() + args.budget
        todo: queue.Queue = queue.Queue()
        for m in mutants:
            todo.put(m)
        finished = [threading.Event() for _ in copies]
        for c, done in zip(copies, finished, strict=True):
            threading.Thread(target=runner.work, args=(c, todo, results, done),
                             daemon=True).start()
        for done in finished:
            while not done.wait(0.5):
                pass
        print(f"done in {time.monotonic() - t0:.0f} s", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the running tests and restoring the copies", flush=True)
        if runner is not None:
            runner.stop.set()
            runner.kill_all()
            for done in finished:
                if not done.wait(60):
                    print("a worker thread did not stop within 60 s", file=sys.stderr)
    finally:
        bad = [f"{c / rel}" for c in copies for rel, data in sources.items()
               if (c / rel).exists() and _sha((c / rel).read_bytes()) != _sha(data)]
        if bad:
            print(f"NOT RESTORED (sha256 differs): {bad}", file=sys.stderr)
        if args.keep or bad:
            print(f"copies kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    changed = [rel for rel, data in sources.items() if _sha((ROOT / rel).read_bytes()) != _sha(data)]
    if changed:  # never written by this tool: someone edited them while it ran
        print(f"note: {changed} changed in the working tree during the run (not by this tool)")
    alive = report(mutants, results)
    return 1 if alive or bad else 0


if __name__ == "__main__":
    sys.exit(main())
