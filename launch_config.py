"""What ``iwm-launch`` runs: the sidecar's config tree, its flags, and the checks made of it
before anything starts.

:class:`SidecarConfig` is the tree: ``mode`` (stated once, handed to capture and worker),
``capture`` (with the ring), ``worker``, ``bus``, and ``recorder`` / ``viewer`` / ``agent``
when asked for. Its fields' ``flag`` metadata are the flags (:func:`parse_args`,
:func:`config_from_args`), and ``to_dict`` of it is what ``sidecar.json`` and a recording's
metadata say was run. :func:`checkpoint_headers` and :func:`check_action_vocab` check the
checkpoints against the tree and the source (exit 2 before anything starts);
:mod:`launch` starts and supervises what the tree says.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from loguru import logger

from agent_bridge.demo_agent import DemoConfig
from iwm_bus.bus.link import Link
from iwm_bus.bus.link_frames import LinkCodec
from iwm_bus.config import (
    MODE_FLAG,
    MODES,
    BusConfig,
    ConfigError,
    RingConfig,
    WorkerConfig,
    add_flags,
    check,
    flag_error,
    flag_values,
    flags_of,
)
from iwm_bus.errors import CheckpointError
from workers.capture import CaptureConfig
from workers.recorder import RecorderConfig
from workers.sources import check_spec
from workers.viewer import ViewerConfig

__all__ = ["DEFAULT_SOURCE", "GROUPS", "SidecarConfig", "check_action_vocab", "checkpoint_header",
           "checkpoint_headers", "config_from_args", "link_from_args", "parse_args"]

#: the first line of ``iwm-launch --help``
DESCRIPTION = "iwm-launch: start and supervise the iwm-bus sidecar (capture -> ring -> worker -> bus)."

#: what ``iwm-launch`` with no --source plays, with the demo agent and the shipped model
DEFAULT_SOURCE = "gym:ALE/Breakout-v5"


@dataclass
class SidecarConfig:
    """Everything one ``iwm-launch`` runs: each part is the config its process takes.

    A part field's ``group`` metadata is the ``--help`` group of its flags (:data:`GROUPS`).
    """

    # realtime: the worker takes the newest frame (skips counted); lossless: every frame,
    # the capture paced by the worker. Stated here only: handed to capture and worker
    mode: str = field(default="realtime", metadata=MODE_FLAG)
    # the capture, with the ring's geometry; None on a --worker-only machine
    capture: CaptureConfig | None = field(default_factory=CaptureConfig,
                                          metadata={"group": "source"})
    # the encoder worker (and its warm standby)
    worker: WorkerConfig = field(default_factory=WorkerConfig, metadata={"group": "model"})
    # run dir (ipc sockets, sidecar.json) or tcp endpoints
    bus: BusConfig = field(default_factory=BusConfig, metadata={"group": "run"})
    # --record, --viewer, --agent demo: the optional parts (None = not started)
    recorder: RecorderConfig | None = field(default=None, metadata={"group": "run"})
    viewer: ViewerConfig | None = field(default=None, metadata={"group": "run"})
    agent: DemoConfig | None = None

    def __post_init__(self) -> None:
        check(self, "mode", str, choices=MODES)
        for name, kind in (("capture", CaptureConfig), ("recorder", RecorderConfig),
                           ("viewer", ViewerConfig), ("agent", DemoConfig)):
            check(self, name, kind, optional=True)
        check(self, "worker", WorkerConfig)
        check(self, "bus", BusConfig)
        # the one mode, handed down: capture and worker cannot disagree (a part takes the
        # sidecar's mode, whatever it was built with)
        self.worker = replace(self.worker, mode=self.mode)
        if self.capture is not None:
            self.capture = replace(self.capture, mode=self.mode)


#: the --help groups, in order
GROUPS = {"source": "source",
          "model": "model (env: IWM_MODEL_VARIANT, IWM_MODEL_PATH, IWM_DEVICE)",
          "run": "run (env: IWM_RUN_DIR, IWM_SERVICE_HOST, IWM_SERVICE_PORT)",
          "remote": "remote worker (the GPU on another machine; docs/scale-out.md)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags: :class:`SidecarConfig`'s, and the hand-written ones that are no field of
    it (--source, --start/--end, --max-frame and --agent set several, the rest steer the
    launcher)."""
    p = argparse.ArgumentParser(prog="iwm-launch", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {key: p.add_argument_group(title) for key, title in GROUPS.items()}
    src, run, remote = groups["source"], groups["run"], groups["remote"]
    src.add_argument("--source",
                     help="synthetic[:WxH] | gym:<env id> | screen[:monitor] | video:PATH | "
                          f"folder:PATH | replay:PATH (default: {DEFAULT_SOURCE}, played by "
                          "the demo agent)")
    remote.add_argument("--remote-worker", metavar="[HOST:]PORT",
                        help="game machine: run no worker here; a gateway on HOST (default "
                             "127.0.0.1) ports PORT..PORT+2 serves workers started elsewhere "
                             "with --worker-only --connect")
    remote.add_argument("--worker-only", action="store_true",
                        help="GPU machine: run only the worker (and its standby), fed by the "
                             "gateway at --connect")
    remote.add_argument("--connect", metavar="HOST[:PORT]",
                        help="with --worker-only: the game machine's gateway")
    add_flags(p, SidecarConfig, groups)
    src.add_argument("--start", type=float, help="replay: start offset in seconds")
    src.add_argument("--end", type=float, help="replay: end offset in seconds")
    src.add_argument("--max-frame", default="1080x1920", metavar="HxW",
                     help="largest frame the ring accepts (default 1080x1920)")
    run.add_argument("--agent", choices=["demo", "none"],
                     help="also start the demo agent (default: demo without --source, else none)")
    run.add_argument("--quiet", action="store_true", help="no status line")
    run.add_argument("--no-standby", action="store_true",
                     help="no warm standby worker (saves its memory: one more model loaded; "
                          "a dead worker is then restarted from scratch, seconds not ms)")
    run.add_argument("--cleanup", action="store_true",
                     help="remove what killed sidecars left (rings in /dev/shm, the run "
                          "dir's sockets and manifest), then exit")
    run.add_argument("--log-level", default="INFO")
    remote.add_argument("--keys", type=Path, metavar="DIR",
                        help="CURVE key folder (encrypted, authenticated link)")
    remote.add_argument("--insecure", action="store_true",
                        help="allow a gateway on a non-loopback address without --keys")
    remote.add_argument("--link-codec", metavar="CODEC",
                        help="with --remote-worker: how frames travel to the workers: raw "
                             "(default), zstd[:LEVEL] (lossless), jpeg[:QUALITY] (lossy, "
                             "default quality 90) or inline (for workers older than wire 1.5); "
                             "docs/scale-out.md")
    remote.add_argument("--make-keys", type=Path, metavar="DIR",
                        help="write a gateway and a worker key pair into DIR, then exit")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace,
                     env: Mapping[str, str] = os.environ) -> SidecarConfig:
    """The tree that the flags (and the ``IWM_*`` environment) describe. A bad value raises
    a ValueError naming the flag that set it: one line, exit 2, before anything starts."""
    flags = flags_of(SidecarConfig)
    try:
        return _build_config(args, flag_values(args, flags), env)
    except ConfigError as e:
        raise flag_error(e, args, flags) from None


def _build_config(args: argparse.Namespace, given: dict[str, Any],
                  env: Mapping[str, str]) -> SidecarConfig:
    if args.semantic_model is not None and not args.dual:
        raise ValueError("--semantic-model is the second stream's checkpoint: it needs --dual")
    if args.dual and args.variant is not None:
        raise ValueError("--variant does not apply with --dual (its streams are an "
                         "equivariant and an invariant model)")
    agent = args.agent
    capture = None
    if not args.worker_only:
        if args.source is None and not (args.envs or 1) > 1:  # the main job: a real game,
            agent = agent or "demo"                            # the demo agent playing it
        capture = _capture_config(args, given.pop("capture", {}))
    _check_envs(args, capture)
    top = {k: v for k, v in given.items() if not isinstance(v, dict)}  # the tree's own: mode
    return SidecarConfig(
        **top, capture=capture, worker=WorkerConfig.from_env(env, **given.get("worker", {})),
        bus=BusConfig.from_env(env, **given.get("bus", {})),
        recorder=RecorderConfig(**given["recorder"]) if "recorder" in given else None,
        viewer=ViewerConfig(**given["viewer"]) if "viewer" in given else None,
        agent=DemoConfig() if agent == "demo" else None)


def _check_envs(args: argparse.Namespace, capture: CaptureConfig | None) -> None:
    """``--envs N`` (N > 1: N captures, one batched worker) with what it cannot go with:
    one line naming the flag (exit 2, before anything starts). A bad N itself is
    WorkerConfig's to refuse."""
    n = args.envs
    if not isinstance(n, int) or n <= 1:
        return
    why = None
    if args.worker_only or args.remote_worker:
        why = "a remote worker serves one game; run one sidecar a game"
    elif capture is not None and capture.source.startswith("screen"):
        why = "the screen cannot be duplicated; --envs needs a source each capture opens " \
              "on its own (gym:, synthetic)"
    elif args.agent == "demo" or args.record is not None or args.viewer is not None:
        why = "--agent demo, --record and --viewer follow one game; leave them out"
    elif os.environ.get("IWM_SERVICE_PORT"):
        why = "several captures need ipc sockets in a run dir, not tcp (IWM_SERVICE_PORT)"
    if why:
        raise ValueError(f"--envs {n}: {why}")


def _capture_config(args: argparse.Namespace, given: dict[str, Any]) -> CaptureConfig:
    source = DEFAULT_SOURCE if args.source is None else args.source
    check_spec(source)  # its own message, which lists the forms
    options = {k: v for k, v in (("start", args.start), ("end", args.end)) if v is not None}
    if options and not source.startswith("replay:"):
        raise ValueError("--start/--end apply only to a replay:PATH source")
    if given.get("rate") == 0:  # "as fast as the worker allows": no fps cap either, and a
        given["fps"] = 0.0      # replay shows a progress bar instead of the status line
        if source.startswith("replay:"):
            options["progress"] = True
    h, w = _parse_hw(args.max_frame)
    ring = RingConfig(**given.pop("ring", {}), max_height=h, max_width=w)
    return CaptureConfig(source=source, ring=ring, options=options, **given)


def checkpoint_header(path: Path, variant: str | None = None, *, encoder: str | None = None,
                      img_size: int | None = None) -> dict[str, Any]:
    """A checkpoint's config and ``info`` extra, validated before anything starts.

    Raises :class:`~iwm_bus.errors.CheckpointError` (a ValueError: exit 2) for a corrupt,
    foreign or truncated file, an invalid config, or another variant, encoder or image size
    than the ones asked for (None: whatever the checkpoint has).
    """
    return checkpoint_headers([path], variant, encoder=encoder, img_size=img_size)[0]


def checkpoint_headers(paths: list[Path], variant: str | None = None, *,
                       encoder: str | None = None, img_size: int | None = None
                       ) -> list[dict[str, Any]]:
    """:func:`checkpoint_header` of each path, read in one helper process."""
    if not paths:
        return []
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # read (and fully validate) it in a short-lived process: torch + timm cost the launcher
    # ~0.7 GB of RSS for its whole life otherwise, and it needs neither
    from concurrent.futures.process import BrokenProcessPool

    out = []
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        for path in paths:
            try:
                cfg, info = pool.submit(_read_header, str(path), variant).result()
            except BrokenProcessPool as e:  # killed (out of memory?) or crashed while reading
                raise CheckpointError(f"{path}: the process reading the checkpoint died "
                                      f"({e}); is the file a checkpoint, and is there "
                                      "memory?") from e
            for flag, asked, has in (("--encoder", encoder, cfg["encoder_name"]),
                                     ("--img-size", img_size, cfg["img_size"])):
                if asked is not None and asked != has:
                    raise CheckpointError(f"{path} holds a {cfg['encoder_name']} model at "
                                          f"{cfg['img_size']} px but {flag} asks for {asked}; "
                                          f"drop {flag} to use the checkpoint's, or give "
                                          "--untrained for random weights")
            out.append({"config": cfg, "info": info})
    return out


def _read_header(path: str, variant: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """checkpoint_header's child: the validated config as a plain dict, and the info."""
    import dataclasses

    from iwm_bus.model import read_header

    cfg, info = read_header(path, variant)
    return dataclasses.asdict(cfg), info


def check_action_vocab(path: Path, header: dict[str, Any], spec: str,
                       space: dict[str, Any]) -> None:
    """Refuse a source whose action ids mean something else than the checkpoint's.

    A source that names its vocabulary (``action_space["vocab"]``) must name the
    checkpoint's; one with more ids than the model has is refused; discrete ids of a source
    without a vocabulary (synthetic, other gym envs) only get a warning.
    """
    vocab = header["info"].get("action_vocab")
    n_model = header["config"]["num_actions"]
    if vocab is None or "discrete" not in str(space.get("type", "")):
        return
    src_vocab, n_src = space.get("vocab"), int(space.get("n", 0))
    if src_vocab is not None and src_vocab != vocab:
        raise CheckpointError(f"{path} was trained for action vocabulary {vocab!r} but source "
                              f"{spec!r} gives {src_vocab!r} ids; use a checkpoint trained "
                              "on this vocabulary")
    if n_src > n_model:
        raise CheckpointError(f"{path} knows {n_model} action ids but source {spec!r} has "
                              f"{n_src}; use a checkpoint trained on this source's actions")
    if src_vocab is None:
        logger.warning("source {!r} has its own {} action ids, not the vocabulary {!r} that "
                       "{} was trained on: predictions conditioned on them mean little",
                       spec, n_src, vocab, path.name)


def link_from_args(args: argparse.Namespace) -> Link | None:
    """The remote-worker link of ``--remote-worker`` (gateway) or ``--worker-only --connect``,
    after checking that the flags fit together; None for a local worker."""
    a = args
    if a.worker_only and a.remote_worker:
        raise ValueError("--worker-only runs the worker for a game machine's "
                         "--remote-worker gateway: give one of them")
    if a.worker_only != (a.connect is not None):
        raise ValueError("--worker-only needs --connect HOST[:PORT] (the game machine's "
                         "gateway), and --connect applies only with --worker-only")
    if a.stream is not None and not a.worker_only:
        raise ValueError("--stream names a remote worker's stream: it needs --worker-only")
    if a.insecure and not a.remote_worker:
        raise ValueError("--insecure allows a gateway without keys: it needs --remote-worker")
    codec = None
    if a.link_codec is not None:
        if not a.remote_worker:
            raise ValueError("--link-codec sets how the gateway sends frames: it needs "
                             "--remote-worker (a worker decodes what each frame says)")
        try:
            codec = LinkCodec.parse(a.link_codec)
        except ValueError as e:
            raise ValueError(f"--link-codec: {e}") from None
    if a.worker_only:
        given = [f"--{n.replace('_', '-')}" for n in ("source", "record", "viewer", "agent")
                 if getattr(a, n) is not None]
        if given:
            raise ValueError(f"{given[0]} belongs on the game machine, not with --worker-only")
    spec = a.remote_worker or a.connect
    if spec is None:
        if a.keys is not None:
            raise ValueError("--keys secures a remote worker's link: it needs "
                             "--remote-worker or --worker-only")
        return None
    return Link.parse(spec, keys=a.keys, insecure=a.insecure, codec=codec)


def _parse_hw(text: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--max-frame must look like HxW (e.g. 1080x1920), got {text!r}") from None
    return h, w
