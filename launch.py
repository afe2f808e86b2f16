"""iwm-launch: start and supervise the iwm-bus sidecar (capture -> ring -> worker -> bus).

    iwm-launch                     # the main job: the demo agent plays a real game (DEFAULT_SOURCE)
    iwm-launch --source gym:ALE/Pong-v5 --agent demo --duration 30
    iwm-launch --source synthetic --untrained --encoder vit_tiny_patch16_224 --duration 10
    iwm-launch --source synthetic --mode lossless --frames 200 --record /tmp/s.mcap
    iwm-launch --source replay:/tmp/s.mcap --mode lossless --rate 0
    IWM_DEVICE=cuda:0 IWM_MODEL_PATH=ckpt.pt iwm-launch --source screen --fps 30

Each part runs in its own process (spawn): the capture writes frames into a shared-memory
ring and announces them; the encoder worker publishes latent / surprise / MRR; an optional
recorder and demo agent. The launcher restarts a worker that dies (with backoff), prints a
status line each second, and on SIGINT / SIGTERM / end of source stops everything and leaves
no shared memory or socket files behind. Exit status: 0 on a clean stop, 2 on bad input
(before anything starts), 1 when a part failed.

What runs is one config tree, :class:`launch_config.SidecarConfig`: its fields' ``flag``
metadata are the flags, and ``to_dict`` of it is what ``sidecar.json`` and a recording's
metadata say was run.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import multiprocess as mp
from loguru import logger

from iwm_bus.bus import topics
from iwm_bus.bus.ring import env_ring_names
from iwm_bus.bus.rundir import RunDir
from iwm_bus.bus.transport import Endpoints, Subscriber
from iwm_bus.config import BusConfig, to_dict
from iwm_bus.default_model import DEFAULT_CHECKPOINT
from iwm_bus.errors import CheckpointError, RunDirBusyError
from launch_config import (
    check_action_vocab,
    checkpoint_headers,
    config_from_args,
    link_from_args,
    parse_args,
)

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
#: seconds between restarts of a dying worker: doubles up to this cap
MAX_BACKOFF_S = 10.0
#: seconds after the start (or a takeover) before a warm standby worker is started: not
#: while the serving worker starts, on a small machine they would share its cores
STANDBY_DELAY_S = 5.0
#: seconds before another standby when one exited by itself
STANDBY_RETRY_S = 30.0
#: worker exit codes that a restart cannot fix (workers/encoder.py run_worker)
PERMANENT_EXIT_CODES = {2: "its model could not be loaded", 3: "its sockets could not be bound"}

# ------------------------------------------------------------ the config tree


# ------------------------------------------------------------ processes


@dataclass
class Child:
    """One supervised process."""

    name: str
    target: Any
    args: tuple
    restart: bool = False
    proc: Any = None
    restarts: int = 0
    started_at: float = 0.0
    restart_at: float | None = None  # when a scheduled restart is due
    backoff: float = 0.5
    extra: dict = field(default_factory=dict)
    kwargs: dict = field(default_factory=dict)
    # the shared value a promoted standby was told to take over through: held while its
    # process runs, because a freed one is reused by the next standby's (set back to -1),
    # and a standby still warming up would then wait for a takeover that already happened
    takeover: Any = None

    def start(self, ctx: Any) -> None:
        from workers.entry import exit_with

        self.takeover = None  # a process of its own: no standby's value to hold
        kwargs = {**self.kwargs, **({"restarts": self.restarts} if self.restart else {})}
        self.proc = ctx.Process(target=exit_with, args=(self.target, *self.args), kwargs=kwargs,
                                name=f"iwm-{self.name}", daemon=False)
        self.proc.start()
        self.started_at = time.monotonic()
        logger.info("started {} (pid {})", self.name, self.proc.pid)


class Launcher:
    """Builds the config tree, starts the parts, supervises them and cleans up."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.link = link_from_args(args)
        self.cfg = cfg = config_from_args(args)
        self.bus = cfg.bus
        # a replay at --rate 0: its progress bar, no status line
        self.replay_bar = cfg.capture is not None and bool(cfg.capture.options.get("progress"))
        self.ring_name = f"iwm_{os.getpid()}_{secrets.token_hex(4)}"
        self.run_dir = RunDir(self.bus.run_dir)
        self.endpoints: Endpoints = self.bus.endpoints()
        self.children: list[Child] = []
        self.stopping = False
        self.recording_lost = False  # the recorder died: the run goes on, the exit code says it
        # the warm standby worker (--no-standby: none) and when the next one is due
        self.standby: Child | None = None
        self.standby_due: float | None = None

    # ------------------------------------------------------------ pre-flight

    def preflight(self) -> None:
        """Everything that can be wrong with the input, checked before anything starts."""
        a = self.args
        if self.link is not None and self.link.keys is not None:
            from iwm_bus.bus.security import ClientKeys, ServerKeys

            (ClientKeys if a.worker_only else ServerKeys).load(self.link.keys)
        if a.remote_worker is not None:
            from iwm_bus.bus.security import check_bind

            check_bind(self.link.host, self.link.keys is not None, a.insecure)
        if not a.remote_worker:
            self._check_checkpoints()
        else:
            self.checkpoint_info, self.headers = None, []
        if a.worker_only:
            self.frame_shape, self.action_space = None, None
            return
        self._check_source()

    def _check_checkpoints(self) -> None:
        worker = self.cfg.worker
        path = worker.checkpoint()
        paths = {"": path}
        if worker.dual:
            paths = {"equivariant stream ": path, "semantic stream ": worker.semantic_checkpoint()}
        for what, p in paths.items():
            if p is not None and not p.is_file():
                hint = ("--semantic-model" if what.startswith("semantic") else
                        "--model / IWM_MODEL_PATH")
                if worker.dual and p.parent == DEFAULT_CHECKPOINT.parent:
                    hint += "; the shipped pair is built by train/recipes/dual.sh"
                raise FileNotFoundError(f"{what}checkpoint {p} does not exist ({hint})")
        given = [p for p in paths.values() if p is not None]
        headers = checkpoint_headers(given, worker.variant, encoder=worker.encoder,
                                     img_size=worker.img_size)
        self.checkpoint_info = headers[0] if headers else None
        if len(headers) == 2:
            (eq, sem) = (h["config"] for h in headers)
            if (eq["encoder_name"], eq["img_size"]) != (sem["encoder_name"], sem["img_size"]):
                raise CheckpointError(
                    f"the dual streams must share one encoder input: {given[0]} is "
                    f"{eq['encoder_name']} at {eq['img_size']} px, {given[1]} "
                    f"{sem['encoder_name']} at {sem['img_size']} px")
            for f in ("cond_dim", "num_actions"):
                if eq[f] != sem[f]:
                    raise CheckpointError(
                        f"the dual streams must take one action format: {given[0]} has "
                        f"{f}={eq[f]}, {given[1]} {f}={sem[f]}")
        self.headers = list(zip(given, headers, strict=True))

    def _check_source(self) -> None:
        from workers.sources import open_source

        cfg, cap = self.cfg, self.cfg.capture
        assert cap is not None  # only a --worker-only launcher has no capture
        if cfg.viewer is not None:
            from workers.viewer import check_target

            check_target(cfg.viewer.spec)
        if cfg.recorder is not None and not cfg.recorder.path.parent.is_dir():
            raise FileNotFoundError(f"--record: folder {cfg.recorder.path.parent} does not exist")
        offsets = {k: v for k, v in cap.options.items() if k in ("start", "end")}
        source = open_source(cap.source, seed=cap.seed, **offsets)
        try:  # probe: the frame size (checked against the ring) and the action space
            h, w, c = source.reset().pixels.shape
            self.action_space = dict(source.action_space)
        finally:
            source.close()
        if h > cap.ring.max_height or w > cap.ring.max_width:
            raise ValueError(f"source {cap.source!r} gives {h}x{w} frames, larger than the "
                             f"ring's {cap.ring.max_height}x{cap.ring.max_width} (--max-frame)")
        self.frame_shape = (h, w, c)
        for p, header in self.headers:
            check_action_vocab(p, header, cap.source, self.action_space)

    # ------------------------------------------------------------ start / supervise

    def start(self) -> None:
        a = self.args
        if self.checkpoint_info is None and not a.remote_worker:
            logger.warning("no checkpoint (--untrained, or none shipped in this install): "
                           "latents come from an UNTRAINED model; surprise and MRR are not "
                           "meaningful yet")
        self.ctx = mp.get_context("spawn")
        if a.worker_only:  # the GPU machine: the worker (and its standby), fed by a gateway
            assert self.link is not None
            self.endpoints = self.link.worker_endpoints()
            self.worker = Child("worker", "workers.encoder:run_worker",
                                (self.cfg.worker, self.endpoints, ""), restart=True,
                                kwargs={"link": self.link})
            self.children.append(self.worker)
            self.worker.start(self.ctx)
            if not a.no_standby:
                self.standby_due = time.monotonic() + STANDBY_DELAY_S
            return
        if a.remote_worker:  # the worker runs elsewhere: the gateway stands in for it
            self.worker = Child("gateway", "workers.gateway:run_gateway",
                                (self.link, self.endpoints, self.ring_name))
        else:
            self.worker = Child("worker", "workers.encoder:run_worker",
                                (self.cfg.worker, self.endpoints, self.ring_name), restart=True)
        self.children.append(self.worker)
        cfg = self.cfg
        if cfg.recorder is not None:
            rec = replace(cfg.recorder, metadata=self.recording_metadata())
            self.children.append(Child("recorder", "workers.recorder:run_recorder",
                                       (rec, self.endpoints, self.ring_name)))
        if cfg.viewer is not None:
            self.children.append(Child("viewer", "workers.viewer:run_viewer",
                                       (cfg.viewer, self.endpoints, self.ring_name)))
        if cfg.agent is not None:
            self.children.append(Child("agent", "agent_bridge.demo_agent:run_demo_agent",
                                       (str(self.bus.run_dir), cfg.agent)))
        self.captures = self._capture_children()
        self.capture = self.captures[0]
        self.children.extend(self.captures)
        for child in self.children:
            child.start(self.ctx)
        if not self.args.no_standby and not a.remote_worker:
            self.standby_due = time.monotonic() + STANDBY_DELAY_S
        self.write_manifest()

    def _capture_children(self) -> list[Child]:
        """One capture, or with ``--envs N`` N of them: capture I runs the source with seed
        + I into ring ``<ring>.eI``, publishes on ``capture.eI.sock`` (I > 0) with ``env`` I
        on its notices, and takes as its credits the worker's results of stream I alone."""
        cap, n = self.cfg.capture, self.cfg.worker.envs
        assert cap is not None
        if n == 1:
            return [Child("capture", "workers.capture:run_capture",
                          (cap, self.endpoints, self.ring_name))]
        eps = self.endpoints.env_captures(n)
        return [Child(f"capture.e{i}", "workers.capture:run_capture",
                      (replace(cap, env=i, seed=cap.seed + i),
                       replace(self.endpoints, capture=eps[i]), name))
                for i, name in enumerate(env_ring_names(self.ring_name, n))]

    def _keep_standby(self) -> None:
        """Start the warm standby worker when one is due; notice when it died."""
        now = time.monotonic()
        if self.standby is not None and not self.standby.proc.is_alive():
            code = self.standby.proc.exitcode
            permanent = code in PERMANENT_EXIT_CODES
            logger.warning("standby worker exited ({}){}", _describe_exit(code),
                           "; no more standbys" if permanent
                           else f"; another in {STANDBY_RETRY_S:.0f}s")
            self.standby = None
            self.standby_due = None if permanent else now + STANDBY_RETRY_S
        if self.standby is None and self.standby_due is not None and now >= self.standby_due:
            self.standby_due = None
            self.standby = Child("standby", "workers.encoder:run_worker",
                                 self.worker.args, kwargs={**self.worker.kwargs,
                                                           "takeover": self.ctx.Value("i", -1)})
            self.standby.start(self.ctx)
            self.write_manifest()

    def _take_over(self, child: Child) -> bool:
        """The dead worker's standby serves in its place; False when there is none."""
        if child is not self.worker or self.standby is None or not self.standby.proc.is_alive():
            return False
        child.restarts += 1
        child.takeover = self.standby.kwargs["takeover"]
        child.takeover.value = child.restarts
        logger.warning("worker died ({}); the standby took over (restart #{})",
                       _describe_exit(child.proc.exitcode), child.restarts)
        child.proc, child.started_at = self.standby.proc, time.monotonic()
        self.standby, self.standby_due = None, time.monotonic() + STANDBY_DELAY_S
        self.write_manifest()
        return True

    def manifest(self) -> dict[str, Any]:
        """sidecar.json: what an agent (or an operator) needs to find every part (ring,
        endpoints, the probed frame shape and action space, pids), and the config tree it
        runs, ``to_dict(self.cfg)``: mode, capture, worker, bus, recorder, viewer, agent."""
        assert self.cfg.capture is not None
        return {"ring": self.ring_name, "endpoints": vars(self.endpoints),
                **({"rings": env_ring_names(self.ring_name, self.cfg.worker.envs),
                    "captures": self.endpoints.env_captures(self.cfg.worker.envs)}
                   if self.cfg.worker.envs > 1 else {}),
                "frame_shape": list(self.frame_shape), "action_space": self.action_space,
                "source": self.cfg.capture.source, **to_dict(self.cfg),
                "pids": {c.name: c.proc.pid for c in self.children if c.proc is not None},
                "standby_pid": self.standby.proc.pid if self.standby is not None else None,
                "restarts": {c.name: c.restarts for c in self.children if c.restart}}

    def write_manifest(self) -> None:
        if not self.args.worker_only:  # else the sidecar's manifest is on the game machine
            self.run_dir.write_manifest(self.manifest())

    def recording_metadata(self) -> dict[str, Any]:
        """What a recording says was run: the config tree, and the source's spec and probed
        action space (a replay of it takes them from here)."""
        assert self.cfg.capture is not None
        return {**to_dict(self.cfg), "source": {"spec": self.cfg.capture.source,
                                                "action_space": self.action_space}}

    def supervise(self) -> int:
        """Run until the capture ends, a signal arrives or the duration is over."""
        deadline = time.monotonic() + self.args.duration + 5 if self.args.duration else None
        # a worker-only launcher has no local bus to watch: the worker logs what it does
        status = StatusLine(self.endpoints, quiet=self.args.quiet or self.args.worker_only
                            or self.replay_bar)
        try:
            while not self.stopping:
                status.poll(200)
                if self.args.worker_only:
                    if deadline is not None and time.monotonic() > deadline - 5:
                        return EXIT_OK
                    if not self._check_child(self.worker):
                        return EXIT_FAILED
                    self._keep_standby()
                    continue
                ended = [c for c in self.captures if not c.proc.is_alive()]
                failed = [c for c in ended if c.proc.exitcode != 0]
                if failed or len(ended) == len(self.captures):  # (--envs: all, or one failed)
                    for c in ended:
                        logger.info("{} ended (exit code {})", c.name, c.proc.exitcode)
                    return EXIT_FAILED if failed else EXIT_OK
                for child in list(self.children):  # _check_child may remove one
                    if child not in self.captures and not self._check_child(child):
                        return EXIT_FAILED
                self._keep_standby()
                if deadline is not None and time.monotonic() > deadline:
                    logger.warning("capture did not stop by itself at --duration; stopping it")
                    return EXIT_OK
            return EXIT_OK
        finally:
            status.close()

    def _check_child(self, child: Child) -> bool:
        """Restart a dead restartable child (with backoff); False when a vital one died."""
        if child.proc.is_alive():
            if child.restarts and time.monotonic() > child.started_at + 30:
                child.backoff = 0.5  # stable again: reset the backoff
            return True
        if child.proc.exitcode is None:  # being restarted
            return True
        if self.stopping:  # children exit on the same Ctrl-C: nothing to restart
            return True
        if child.restart and child.proc.exitcode in PERMANENT_EXIT_CODES:
            logger.error("{} cannot run ({}): not restarting it", child.name,
                         PERMANENT_EXIT_CODES[child.proc.exitcode])
            return False
        if not child.restart:
            if child.name == "agent":
                logger.warning("demo agent exited (code {})", child.proc.exitcode)
                self.children.remove(child)
                return True
            if child.name == "recorder":  # the sidecar serves the agent without it
                logger.error("recorder died ({}); going on without recording: {} holds the "
                             "session so far (opening it recovers a killed recording)",
                             _describe_exit(child.proc.exitcode), self.cfg.recorder.path)
                self.children.remove(child)
                self.recording_lost = True
                return True
            if child.name == "viewer":  # the live view is optional: the sidecar goes on
                logger.error("viewer died ({}); going on without it",
                             _describe_exit(child.proc.exitcode))
                self.children.remove(child)
                return True
            logger.error("{} died (exit code {})", child.name, child.proc.exitcode)
            return False
        now = time.monotonic()
        if child.restart_at is None and self._take_over(child):
            return True
        if child.restart_at is None:  # just noticed: schedule the restart after the backoff
            child.restarts += 1
            child.restart_at = now + child.backoff
            logger.warning("{} died ({}); restart #{} after {:.1f}s backoff", child.name,
                           _describe_exit(child.proc.exitcode), child.restarts, child.backoff)
            return True
        if now < child.restart_at:
            return True
        child.restart_at = None
        child.backoff = min(child.backoff * 2, MAX_BACKOFF_S)
        child.start(self.ctx)
        self.write_manifest()
        return True

    # ------------------------------------------------------------ shutdown

    def shutdown(self) -> None:
        """Stop every child (SIGTERM, then SIGKILL), remove the ring and socket files."""
        children = [*self.children, *([self.standby] if self.standby is not None else [])]
        for child in reversed(children):
            if child.proc is not None and child.proc.is_alive():
                child.proc.terminate()
        deadline = time.monotonic() + 10
        for child in reversed(children):
            if child.proc is None:
                continue
            child.proc.join(max(0.1, deadline - time.monotonic()))
            if child.proc.is_alive():
                logger.warning("{} did not stop within 10 s; killing it", child.name)
                child.proc.kill()
                child.proc.join(5)
        if self.args.worker_only:
            return  # no ring, no run dir of ours here
        for name in env_ring_names(self.ring_name, self.cfg.worker.envs):
            _unlink_ring(name)
        self.run_dir.cleanup()


class StatusLine:
    """Subscribes to stats/surprise/MRR and prints one status line a second."""

    def __init__(self, endpoints: Endpoints, quiet: bool) -> None:
        self.quiet = quiet
        self.sub = Subscriber([endpoints.worker], [topics.STATS, topics.SURPRISE, topics.MRR])
        self.worker: dict[str, Any] = {}
        self.surprise: float | None = None
        self.mrr: float | None = None
        self.next_print = time.monotonic() + 1.0

    def poll(self, timeout_ms: int) -> None:
        got = self.sub.recv(timeout_ms)
        while got is not None:
            topic, msg = got
            if msg["kind"] == "stats":
                self.worker = msg["values"]
            elif msg["kind"] == "surprise" and msg["surprise"] is not None:
                self.surprise = msg["surprise"]
            elif msg["kind"] == "mrr" and msg["mrr"] is not None:
                self.mrr = msg["mrr"]
            got = self.sub.recv(0)
        if not self.quiet and time.monotonic() >= self.next_print:
            self.next_print += 1.0
            print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        w = self.worker

        def num(key: str, fmt: str = "{:.1f}") -> str:
            value = w.get(key)
            return fmt.format(value) if isinstance(value, (int, float)) else "-"

        surprise = f"{self.surprise:.3f}" if self.surprise is not None else "-"
        mrr = f"{self.mrr:.3f}" if self.mrr is not None else "-"
        return (f"[iwm] fps in {num('fps_in')} out {num('fps_out')} | latency p50 "
                f"{num('latency_p50_ms')} p99 {num('latency_p99_ms')} ms | surprise {surprise}"
                f" | MRR {mrr} | frames {num('frames', '{:.0f}')} skipped "
                f"{num('skipped', '{:.0f}')} dropped {num('dropped_overwritten', '{:.0f}')} "
                f"| restarts {num('restarts', '{:.0f}')}")

    def close(self) -> None:
        self.sub.close()


def make_keys(folder: Path) -> int:
    """``--make-keys DIR``: write the key pairs, say what goes where; the exit code."""
    from iwm_bus.bus.security import make_keys as write_keys

    try:
        written = write_keys(folder)
    except OSError as e:
        logger.error("{}", e)
        return EXIT_BAD_INPUT
    logger.info("wrote {}. Game machine: --remote-worker ... --keys {}. GPU machine: copy "
                "{}/worker.key_secret and {}/server.key into a folder there and pass it as "
                "--keys; more workers: put their public .key files in {}/authorized/",
                ", ".join(p.name for p in written), folder, folder, folder, folder)
    return EXIT_OK


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _unlink_ring(name: str) -> None:
    """Remove the ring's segment if a crashed capture left it (the capture unlinks normally)."""
    path = Path("/dev/shm") / name
    if path.exists():
        logger.warning("removing shared-memory segment {} left behind", name)
        path.unlink(missing_ok=True)


def reclaim_rings() -> None:
    """Unlink the rings of sidecars that were killed (they cannot unlink their own)."""
    from iwm_bus.bus.ring import reclaim_dead

    try:
        gone = reclaim_dead()
    except OSError as e:  # a read-only or foreign /dev/shm must not stop the launch
        logger.warning("could not reclaim rings left in /dev/shm: {}", e)
        return
    if gone:
        logger.warning("reclaimed {} ring(s) left in /dev/shm by killed sidecars, {:.1f} MB: "
                       "{}", len(gone), sum(size for *_, size in gone) / 1e6,
                       ", ".join(f"{name} ({f'pid {pid}' if pid else 'blank'})"
                                 for name, pid, _ in gone))


def cleanup(run_dir: Path) -> int:
    """``--cleanup``: reclaim dead rings and ``run_dir`` when no sidecar holds it."""
    reclaim_rings()
    rd = RunDir(run_dir)
    if not rd.path.exists():
        logger.info("run dir {} does not exist: nothing to clean there", rd.path)
        return 0
    try:
        rd.acquire()
    except RunDirBusyError as e:
        logger.info("{}: left alone", e)
        return 0
    rd.cleanup()
    logger.info("cleaned run dir {} (sockets, manifest, lock)", rd.path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["IWM_LOG_LEVEL"] = args.log_level  # read by the children (workers/entry.py)
    from workers.entry import setup_logging

    try:
        setup_logging(args.log_level, "launcher")
    except ValueError:
        print(f"iwm-launch: error: --log-level {args.log_level!r} is not a level (DEBUG, "
              "INFO, WARNING, ERROR)", file=sys.stderr)
        return EXIT_BAD_INPUT
    from workers.sources import SourceError

    if args.cleanup:
        return cleanup(BusConfig.from_env(run_dir=args.run_dir).run_dir)
    if args.make_keys is not None:
        return make_keys(args.make_keys)
    try:
        launcher = Launcher(args)
        launcher.preflight()
    except (ValueError, FileNotFoundError, SourceError, OSError) as e:
        logger.error("{}", e)
        return EXIT_BAD_INPUT

    def on_signal(signum: int, _frame: Any) -> None:
        logger.info("{} received: shutting down", signal.Signals(signum).name)
        launcher.stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if not args.worker_only:
        reclaim_rings()
        try:
            launcher.run_dir.acquire()
        except RunDirBusyError as e:
            logger.error("{}", e)
            return EXIT_BAD_INPUT
    code = EXIT_FAILED
    try:
        launcher.start()
        code = launcher.supervise()
        if code == EXIT_OK and launcher.recording_lost:
            code = EXIT_FAILED  # the recording asked for is incomplete
    finally:
        launcher.shutdown()
    logger.info("stopped (exit code {})", code)
    return code


if __name__ == "__main__":
    sys.exit(main())
