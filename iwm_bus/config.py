"""Configuration dataclasses, one per component, validated on construction, and the few
helpers every config in the project uses (one validator, flags from field metadata, to_dict).

Environment variables (the seed guide's ``IWM_*`` names) are read only at entry points, via
``BusConfig.from_env`` / ``WorkerConfig.from_env``, and the resulting objects are passed down.

    IWM_MODEL_VARIANT  core | invariant | equivariant       (WorkerConfig.variant)
    IWM_MODEL_PATH     checkpoint to load                     (WorkerConfig.model_path)
    IWM_DEVICE         cpu | cuda | cuda:N                    (WorkerConfig.device)
    IWM_RUN_DIR        run directory (ipc sockets, manifest)  (BusConfig.run_dir)
    IWM_SERVICE_HOST   host for tcp endpoints                 (BusConfig.tcp_host)
    IWM_SERVICE_PORT   base tcp port; set it to use tcp       (BusConfig.tcp_port)

Validation: ``check(self, "slots", int, 2, 1024)`` in ``__post_init__`` checks the type
before the range and raises :class:`ConfigError` (a ValueError) worded
``RingConfig.slots=1: must be in 2..1024``; ``fail(self, name, why)`` for any other rule.

Flags: a field whose metadata is ``flag("--fps", "capture rate cap")`` is a command-line
flag of every entry point that walks its config with :func:`add_flags` (``iwm-launch`` walks
the whole tree, ``launch_config.SidecarConfig``; ``python -m workers.encoder`` its worker part);
:func:`flag_values` reads back the flags given. Type and ``store_true`` come from the
field's annotation; argparse's default is None, so a flag not given leaves the field to the
environment or its dataclass default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from iwm_bus.bus.rundir import default_run_dir
from iwm_bus.bus.transport import Endpoints

VARIANTS = ("core", "invariant", "equivariant", "custom")
MODES = ("realtime", "lossless")
#: inference precisions (iwm_bus.model.precision): auto = bf16 on CUDA, fp32 on a CPU
PRECISIONS = ("auto", "fp32", "bf16", "int8")
_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")


def precision_error(precision: str, device: str) -> str | None:
    """Why inference precision ``precision`` cannot run on ``device`` (a torch device
    string: cpu, cuda:1, mps), or None. The one rule the worker's config (before start),
    iwm-eval and ``iwm_bus.model.set_precision`` all check."""
    kind = device.split(":")[0]
    if precision == "int8" and kind != "cpu":
        return f"int8 is a CPU precision; on {device} use bf16 or auto"
    if precision == "bf16" and kind not in ("cpu", "cuda"):
        return f"bf16 autocast runs on a CPU or CUDA; on {device} use fp32"
    return None
_UNSET: Any = object()

# ------------------------------------------------------------------ one validator


class ConfigError(ValueError):
    """A config field with a bad value: ``Class.field=value: why``. ``owner`` and ``name``
    say which field, so an entry point can name the flag that set it (:func:`flag_error`)."""

    def __init__(self, owner: str, name: str, value: Any, why: str) -> None:
        super().__init__(f"{owner}.{name}={value!r}: {why}")
        self.owner, self.name, self.value, self.why = owner, name, value, why

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes
        return type(self), (self.owner, self.name, self.value, self.why)


def fail(cfg: Any, name: str, why: str, value: Any = _UNSET) -> NoReturn:
    """Raise the :class:`ConfigError` of ``cfg.name`` (its value unless ``value`` is given)."""
    raise ConfigError(type(cfg).__name__, name, getattr(cfg, name) if value is _UNSET else value,
                      why)


_KIND_NAMES = {int: "an int", float: "a number", str: "a str", bool: "a bool"}


def check(cfg: Any, name: str, kind: type | tuple[type, ...] | None = None,
          low: float | None = None, high: float | None = None, *, choices: Iterable[Any] = (),
          optional: bool = False, open_low: bool = False, open_high: bool = False) -> None:
    """Validate ``cfg.name``: its type first (``float`` takes ints; a bool is never a
    number), then ``choices`` and the range ``low..high`` (bounds inclusive unless open).
    ``optional``: None passes."""
    value = getattr(cfg, name)
    if value is None and optional:
        return
    if kind is not None:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        accepted = tuple(k for ks in kinds for k in ((int, float) if ks is float else (ks,)))
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, accepted):
            names = " or ".join(_KIND_NAMES.get(k, f"a {k.__name__}") for k in kinds)
            fail(cfg, name, f"must be {names}{' or None' if optional else ''}, got "
                            f"{type(value).__name__}")
    choices = tuple(choices)
    if choices and value not in choices:
        fail(cfg, name, f"must be one of {choices}")
    # written so that NaN fails every range
    too_low = low is not None and not (value > low if open_low else value >= low)
    too_high = high is not None and not (value < high if open_high else value <= high)
    if too_low or too_high:
        fail(cfg, name, f"must be {_range_text(low, high, open_low, open_high)}")


def _range_text(low: float | None, high: float | None, open_low: bool, open_high: bool) -> str:
    def num(x: float) -> str:
        return f"{x:g}" if isinstance(x, float) else str(x)

    if low is not None and high is not None:
        if not (open_low or open_high):
            return f"in {num(low)}..{num(high)}"
        return f"in {'(' if open_low else '['}{num(low)}, {num(high)}{')' if open_high else ']'}"
    if low is not None:
        return f"{'>' if open_low else '>='} {num(low)}"
    return f"{'<' if open_high else '<='} {num(high)}"  # type: ignore[arg-type]


# ------------------------------------------------------------------ flags from metadata


def flag(name: str, help: str | None = None, *, group: str | None = None,
         **argparse_kwargs: Any) -> dict[str, Any]:
    """Field metadata that makes the field the flag ``name``: ``field(default=30.0,
    metadata=flag("--fps", "capture rate cap (0 = no cap)"))``. ``group``: the entry point's
    argparse group (else the part's, see :func:`flags_of`); other keywords (choices,
    metavar, nargs, const) go to ``add_argument``."""
    return {"flag": name, "help": help, "group": group, "argparse": argparse_kwargs}


@dataclass(frozen=True)
class Flag:
    """One flag of a config tree: the field at ``path`` (from the root) of ``owner``."""

    name: str
    path: tuple[str, ...]
    owner: type
    kind: type
    group: str | None
    help: str | None
    # further add_argument keywords (choices, metavar, nargs, const)
    argparse_kwargs: Mapping[str, Any]

    @property
    def dest(self) -> str:
        """Its attribute in the parsed namespace: ``--img-size`` -> ``img_size``."""
        return self.name.lstrip("-").replace("-", "_")


def flags_of(cls: type, *, _path: tuple[str, ...] = (), _group: str | None = None
             ) -> list[Flag]:
    """The flags of ``cls`` and of the dataclasses in its fields (a part), in field order.
    A part field's metadata ``{"group": key}`` puts its flags in that group."""
    hints = typing.get_type_hints(cls)
    out: list[Flag] = []
    for f in dataclasses.fields(cls):
        kind, group = _without_none(hints[f.name]), f.metadata.get("group") or _group
        if "flag" in f.metadata:
            out.append(Flag(f.metadata["flag"], (*_path, f.name), cls, kind, group,
                            f.metadata["help"], f.metadata["argparse"]))
        elif dataclasses.is_dataclass(kind):
            out.extend(flags_of(kind, _path=(*_path, f.name), _group=group))  # type: ignore[arg-type]
    return out


def _without_none(hint: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def add_flags(parser: Any, cls: type, groups: Mapping[str, Any] | None = None) -> list[Flag]:
    """Add the flags of ``cls`` (:func:`flags_of`) to ``parser``, each to ``groups[key]``
    when it has a group; returns them (for :func:`flag_values`)."""
    flags = flags_of(cls)
    for fl in flags:
        target = parser if fl.group is None or groups is None else groups[fl.group]
        kw: dict[str, Any] = {"help": fl.help, "dest": fl.dest, "default": None}
        if fl.kind is bool:
            kw["action"] = "store_true"
        elif fl.kind in (int, float, str, Path):
            kw["type"] = fl.kind
        else:
            raise TypeError(f"{fl.owner.__name__}.{fl.path[-1]}: a flag needs a bool, int, "
                            f"float, str or Path field, not {fl.kind}")
        target.add_argument(fl.name, **kw, **fl.argparse_kwargs)
    return flags


def flag_values(args: argparse.Namespace, flags: Iterable[Flag]) -> dict[str, Any]:
    """The flags given in ``args`` as nested field values, ``{"capture": {"fps": 10.0}}``
    (a flag not given is absent)."""
    out: dict[str, Any] = {}
    for fl in flags:
        value = getattr(args, fl.dest)
        if value is not None:
            node = out
            for key in fl.path[:-1]:
                node = node.setdefault(key, {})
            node[fl.path[-1]] = value
    return out


def flag_error(e: ConfigError, args: argparse.Namespace, flags: Iterable[Flag]) -> ValueError:
    """``e`` naming the flag that set the field, ``--frames: CaptureConfig.frames=0: ...``;
    ``e`` itself when no flag given set it (the environment, a default)."""
    for fl in flags:
        if (fl.owner.__name__, fl.path[-1]) == (e.owner, e.name) and \
                getattr(args, fl.dest) is not None:
            return ValueError(f"{fl.name}: {e}")
    return e


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config (tree) as plain JSON-able data, paths as strings, for manifests and
    recordings."""
    return _plain(dataclasses.asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


#: ``--mode``: ``SidecarConfig.mode`` of iwm-launch, which hands it to capture and worker,
#: and the worker's own in ``python -m workers.encoder``
MODE_FLAG = flag("--mode", "realtime: newest frame, skips counted; lossless: every frame",
                 group="source", choices=MODES)

# ------------------------------------------------------------------ the library's parts


@dataclass
class RingConfig:
    # number of slots; lossless pacing keeps at most slots - 1 frames in flight
    slots: int = field(default=8, metadata=flag("--ring-slots"))
    # largest frame the ring holds (pixels); bigger frames are refused before start
    # (iwm-launch --max-frame HxW sets both)
    max_height: int = 1080
    max_width: int = 1920
    # colour channels (3 = RGB)
    channels: int = 3

    def __post_init__(self) -> None:
        check(self, "slots", int, 2, 1024)
        check(self, "max_height", int, 1, 8192)
        check(self, "max_width", int, 1, 8192)
        check(self, "channels", int, choices=(1, 3, 4))


@dataclass
class BusConfig:
    # run directory for ipc sockets and the manifest (env IWM_RUN_DIR)
    run_dir: Path = field(default_factory=default_run_dir,
                          metadata=flag("--run-dir", "folder for sockets + manifest"))
    # host for tcp endpoints (env IWM_SERVICE_HOST); loopback unless configured
    tcp_host: str = "127.0.0.1"
    # base tcp port (env IWM_SERVICE_PORT); None = ipc sockets in run_dir
    tcp_port: int | None = None

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        check(self, "tcp_host", str)
        check(self, "tcp_port", int, 1, 65532, optional=True)

    def endpoints(self) -> Endpoints:
        if self.tcp_port is not None:
            return Endpoints.tcp(self.tcp_host, self.tcp_port)
        return Endpoints.ipc(self.run_dir)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **overrides: Any) -> BusConfig:
        kw: dict[str, Any] = {}
        if env.get("IWM_RUN_DIR"):
            kw["run_dir"] = Path(env["IWM_RUN_DIR"])
        if env.get("IWM_SERVICE_HOST"):
            kw["tcp_host"] = env["IWM_SERVICE_HOST"]
        if env.get("IWM_SERVICE_PORT"):
            kw["tcp_port"] = _env_int(env, "IWM_SERVICE_PORT")
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)


@dataclass
class WorkerConfig:
    # model variant (env IWM_MODEL_VARIANT); None = the checkpoint's (core when untrained).
    # Given explicitly, a checkpoint of another variant is refused.
    variant: str | None = field(default=None, metadata=flag("--variant", choices=VARIANTS))
    # checkpoint path (env IWM_MODEL_PATH); None = the shipped default model
    model_path: Path | None = field(default=None, metadata=flag(
        "--model", "checkpoint (default: the shipped model, trained on games)"))
    # ignore the shipped default and run random weights of variant/encoder (plumbing tests;
    # a warning is logged)
    untrained: bool = field(default=False, metadata=flag(
        "--untrained", "random weights of --variant/--encoder instead (plumbing tests)"))
    # torch device string (env IWM_DEVICE)
    device: str = field(default="cpu", metadata=flag("--device", "cpu | cuda | cuda:N"))
    # timm encoder override (e.g. vit_tiny_patch16_224 for CPU); None = the variant's default
    encoder: str | None = field(default=None, metadata=flag(
        "--encoder", "timm encoder, e.g. vit_tiny_patch16_224 for CPU"))
    # encoder input size override in pixels; None = the model's default (224)
    img_size: int | None = field(default=None, metadata=flag(
        "--img-size", "encoder input size (multiple of 16)"))
    # discrete action tokens of an untrained model (ALE has at most 18 actions); a checkpoint
    # brings its own
    num_actions: int = field(default=32, metadata=flag(
        "--num-actions", "discrete action tokens of an untrained model (default 32)"))
    # realtime: always the newest frame (skips counted); lossless: every frame in order.
    # iwm-launch sets it from its one --mode (launch_config.SidecarConfig.mode)
    mode: str = "realtime"
    # MRR candidates: the K most recent other latents
    mrr_bank: int = field(default=32, metadata=flag("--mrr-bank"))
    # publish patch latents (float16) on iwm.latent as well as z_cls
    publish_patches: bool = field(default=False, metadata=flag(
        "--patches", "publish patch latents"))
    # seconds between iwm.stats messages
    stats_interval_s: float = 1.0
    # inference precision (iwm_bus.model.precision): auto = bf16 autocast on CUDA, fp32 on a
    # CPU; int8 (CPU only) runs the linear layers on int8 weights, ~2x faster on a CPU
    precision: str = field(default="auto", metadata=flag(
        "--precision", "auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | int8 (CPU: int8 "
                       "linear layers, ~2x faster; held-out effect in docs/results.md)",
        choices=PRECISIONS))
    # torch.compile the model (CUDA)
    compile: bool = field(default=False, metadata=flag("--compile", "torch.compile (CUDA)"))
    # torch CPU threads; 0 = auto (all cores but one, which is left to the capture)
    threads: int = field(default=0, metadata=flag(
        "--threads", "torch CPU threads (default: all cores but one)"))
    # two streams in one worker (issue 11): model_path is then the equivariant (control)
    # stream's checkpoint and semantic_model_path the invariant (semantic) one's; None = the
    # shipped pair (iwm_bus/weights/{equivariant,invariant}.pt)
    dual: bool = field(default=False, metadata=flag(
        "--dual", "two streams in one worker: the shipped equivariant (control, on the plain "
                  "topics) + invariant (semantic, iwm.*.semantic) pair"))
    semantic_model_path: Path | None = field(default=None, metadata=flag(
        "--semantic-model", "with --dual: the semantic stream's checkpoint (--model is then "
                            "the equivariant stream's)"))
    # publish this (single-stream) worker's results as the named stream, on
    # ``iwm.*.<stream>`` (e.g. semantic), not on the plain topics: how a second worker on
    # another machine adds a stream beside the first (it then serves no RPC); None = plain
    stream: str | None = field(default=None, metadata=flag(
        "--stream", "with --worker-only: publish as the named stream (iwm.*.NAME, e.g. "
                    "semantic) beside another worker's", group="remote", metavar="NAME"))
    # capture streams one worker serves (issue 30): N games, one model, each tick's ready
    # frames of all streams encoded and predicted as one batch; every stream keeps its own
    # state and its results carry its index (``env``); iwm-launch starts N captures
    envs: int = field(default=1, metadata=flag(
        "--envs", "capture streams (games) one batched worker serves (default 1)",
        metavar="N"))
    # most frames (one per stream) encoded and predicted in one batch
    max_batch: int = field(default=64, metadata=flag(
        "--max-batch", "with --envs: most frames a batch (default 64)", metavar="B"))

    def __post_init__(self) -> None:
        check(self, "variant", str, choices=VARIANTS, optional=True)
        if self.model_path is not None:
            self.model_path = Path(self.model_path)
            if self.untrained:
                fail(self, "untrained", "contradicts model_path (a checkpoint is trained weights)")
        if self.semantic_model_path is not None:
            self.semantic_model_path = Path(self.semantic_model_path)
            if not self.dual:
                fail(self, "semantic_model_path", "is the second stream's checkpoint: set dual too")
            if self.untrained:
                fail(self, "untrained",
                     "contradicts semantic_model_path (a checkpoint is trained weights)")
        if self.stream is not None:
            if not isinstance(self.stream, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,31}",
                                                                    self.stream):
                fail(self, "stream", "must be a lower-case name such as semantic")
            if self.dual:
                fail(self, "stream", "names a single-stream worker's stream; a dual worker has two")
        if self.dual and self.variant is not None:
            fail(self, "variant",
                 "does not apply to a dual worker (its streams are equivariant and invariant)")
        check(self, "device", str)
        if not _DEVICE_RE.match(self.device):
            fail(self, "device", "must be cpu, cuda or cuda:N")
        check(self, "precision", str, choices=PRECISIONS)
        why = precision_error(self.precision, self.device)
        if why:
            fail(self, "precision", why)
        check(self, "encoder", str, optional=True)
        check(self, "img_size", int, 16, optional=True)
        if self.img_size is not None and self.img_size % 16:
            fail(self, "img_size", "must be a multiple of 16, >= 16")
        check(self, "num_actions", int, 0, 4096)
        check(self, "mode", str, choices=MODES)
        check(self, "mrr_bank", int, 1, 4096)
        check(self, "stats_interval_s", float, 0.05, 3600)
        check(self, "threads", int, 0, 256)
        check(self, "envs", int, 1, 1024)
        check(self, "max_batch", int, 1, 4096)
        if self.envs > 1 and self.stream is not None:
            fail(self, "stream", "names a single-stream worker's stream; with envs > 1 the "
                                 "streams are games, told apart by their env index")
        for name in ("untrained", "publish_patches", "compile", "dual"):
            check(self, name, bool)

    def checkpoint(self) -> Path | None:
        """The checkpoint the worker loads (a dual worker's equivariant stream): ``model_path``,
        else the shipped default (pair) unless ``untrained`` (None = random weights)."""
        if self.model_path is not None or self.untrained:
            return self.model_path
        from iwm_bus.default_model import default_checkpoint, dual_checkpoints

        return dual_checkpoints()[1] if self.dual else default_checkpoint()

    def semantic_checkpoint(self) -> Path | None:
        """A dual worker's semantic (invariant) stream checkpoint; None = random weights (or
        a single-stream worker)."""
        if not self.dual or self.untrained:
            return None
        if self.semantic_model_path is not None:
            return self.semantic_model_path
        from iwm_bus.default_model import dual_checkpoints

        return dual_checkpoints()[0]

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **overrides: Any) -> WorkerConfig:
        kw: dict[str, Any] = {}
        if env.get("IWM_MODEL_VARIANT"):
            kw["variant"] = env["IWM_MODEL_VARIANT"]
        if env.get("IWM_MODEL_PATH"):
            kw["model_path"] = Path(env["IWM_MODEL_PATH"])
        if env.get("IWM_DEVICE"):
            kw["device"] = env["IWM_DEVICE"]
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} must be an integer") from None
