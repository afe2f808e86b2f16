"""Configuration dataclasses, one per component, validated on construction.

Environment variables (the seed guide's ``IWM_*`` names) are read only at entry points, via
``BusConfig.from_env`` / ``WorkerConfig.from_env``, and the resulting objects are passed down.

    IWM_MODEL_VARIANT  core | invariant | equivariant       (WorkerConfig.variant)
    IWM_MODEL_PATH     checkpoint to load                     (WorkerConfig.model_path)
    IWM_DEVICE         cpu | cuda | cuda:N                    (WorkerConfig.device)
    IWM_RUN_DIR        run directory (ipc sockets, manifest)  (BusConfig.run_dir)
    IWM_SERVICE_HOST   host for tcp endpoints                 (BusConfig.tcp_host)
    IWM_SERVICE_PORT   base tcp port; set it to use tcp       (BusConfig.tcp_port)
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from iwm_bus.bus.rundir import default_run_dir
from iwm_bus.bus.transport import Endpoints

VARIANTS = ("core", "invariant", "equivariant", "custom")
MODES = ("realtime", "lossless")
_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")


def _fail(cls: str, name: str, value: Any, why: str) -> None:
    raise ValueError(f"{cls}.{name}={value!r}: {why}")


def _need(cls: str, name: str, value: Any, kind: type | tuple[type, ...]) -> None:
    """Type check before range checks, so ``"8"`` fails with a ValueError, not a TypeError."""
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        _fail(cls, name, value, f"must be {names}, got {type(value).__name__}")


@dataclass
class RingConfig:
    # number of slots; lossless pacing keeps at most slots - 1 frames in flight
    slots: int = 8
    # largest frame the ring holds (pixels); bigger frames are refused before start
    max_height: int = 1080
    max_width: int = 1920
    # colour channels (3 = RGB)
    channels: int = 3

    def __post_init__(self) -> None:
        for name in ("slots", "max_height", "max_width"):
            _need("RingConfig", name, getattr(self, name), int)
        if not 2 <= self.slots <= 1024:
            _fail("RingConfig", "slots", self.slots, "must be in 2..1024")
        for name in ("max_height", "max_width"):
            if not 1 <= getattr(self, name) <= 8192:
                _fail("RingConfig", name, getattr(self, name), "must be in 1..8192")
        if self.channels not in (1, 3, 4):
            _fail("RingConfig", "channels", self.channels, "must be 1, 3 or 4")


@dataclass
class BusConfig:
    # run directory for ipc sockets and the manifest (env IWM_RUN_DIR)
    run_dir: Path = field(default_factory=default_run_dir)
    # host for tcp endpoints (env IWM_SERVICE_HOST); loopback unless configured
    tcp_host: str = "127.0.0.1"
    # base tcp port (env IWM_SERVICE_PORT); None = ipc sockets in run_dir
    tcp_port: int | None = None

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        if self.tcp_port is not None:
            _need("BusConfig", "tcp_port", self.tcp_port, int)
        if self.tcp_port is not None and not 1 <= self.tcp_port <= 65532:
            _fail("BusConfig", "tcp_port", self.tcp_port, "must be in 1..65532")

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
    variant: str | None = None
    # checkpoint path (env IWM_MODEL_PATH); None = the shipped default model
    model_path: Path | None = None
    # ignore the shipped default and run random weights of variant/encoder (plumbing tests;
    # a warning is logged)
    untrained: bool = False
    # torch device string (env IWM_DEVICE)
    device: str = "cpu"
    # timm encoder override (e.g. vit_tiny_patch16_224 for CPU); None = the variant's default
    encoder: str | None = None
    # encoder input size override in pixels; None = the model's default (224)
    img_size: int | None = None
    # discrete action tokens of an untrained model (ALE has at most 18 actions); a checkpoint
    # brings its own
    num_actions: int = 32
    # realtime: always the newest frame (skips counted); lossless: every frame in order
    mode: str = "realtime"
    # MRR candidates: the K most recent other latents
    mrr_bank: int = 32
    # publish patch latents (float16) on iwm.latent as well as z_cls
    publish_patches: bool = False
    # seconds between iwm.stats messages
    stats_interval_s: float = 1.0
    # torch.compile the model (CUDA)
    compile: bool = False
    # torch CPU threads; 0 = auto (all cores but one, which is left to the capture)
    threads: int = 0
    # two streams in one worker (issue 11): model_path is then the equivariant (control)
    # stream's checkpoint and semantic_model_path the invariant (semantic) one's; None = the
    # shipped pair (iwm_bus/weights/{equivariant,invariant}.pt)
    dual: bool = False
    semantic_model_path: Path | None = None
    # publish this (single-stream) worker's results as the named stream, on
    # ``iwm.*.<stream>`` (e.g. semantic), not on the plain topics: how a second worker on
    # another machine adds a stream beside the first (it then serves no RPC); None = plain
    stream: str | None = None

    def __post_init__(self) -> None:
        if self.variant is not None and self.variant not in VARIANTS:
            _fail("WorkerConfig", "variant", self.variant, f"must be one of {VARIANTS}")
        if self.model_path is not None:
            self.model_path = Path(self.model_path)
            if self.untrained:
                _fail("WorkerConfig", "untrained", self.untrained,
                      "contradicts model_path (a checkpoint is trained weights)")
        if self.semantic_model_path is not None:
            self.semantic_model_path = Path(self.semantic_model_path)
            if not self.dual:
                _fail("WorkerConfig", "semantic_model_path", self.semantic_model_path,
                      "is the second stream's checkpoint: set dual too")
            if self.untrained:
                _fail("WorkerConfig", "untrained", self.untrained,
                      "contradicts semantic_model_path (a checkpoint is trained weights)")
        if self.stream is not None:
            if not isinstance(self.stream, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,31}",
                                                                    self.stream):
                _fail("WorkerConfig", "stream", self.stream,
                      "must be a lower-case name such as semantic")
            if self.dual:
                _fail("WorkerConfig", "stream", self.stream,
                      "names a single-stream worker's stream; a dual worker has two")
        if self.dual and self.variant is not None:
            _fail("WorkerConfig", "variant", self.variant,
                  "does not apply to a dual worker (its streams are equivariant and invariant)")
        _need("WorkerConfig", "device", self.device, str)
        _need("WorkerConfig", "mrr_bank", self.mrr_bank, int)
        _need("WorkerConfig", "stats_interval_s", self.stats_interval_s, (int, float))
        if self.img_size is not None:
            _need("WorkerConfig", "img_size", self.img_size, int)
        if not _DEVICE_RE.match(self.device):
            _fail("WorkerConfig", "device", self.device, "must be cpu, cuda or cuda:N")
        if self.mode not in MODES:
            _fail("WorkerConfig", "mode", self.mode, f"must be one of {MODES}")
        _need("WorkerConfig", "threads", self.threads, int)
        if not 0 <= self.threads <= 256:
            _fail("WorkerConfig", "threads", self.threads, "must be in 0..256 (0 = auto)")
        _need("WorkerConfig", "num_actions", self.num_actions, int)
        if not 0 <= self.num_actions <= 4096:
            _fail("WorkerConfig", "num_actions", self.num_actions, "must be in 0..4096")
        if not 1 <= self.mrr_bank <= 4096:
            _fail("WorkerConfig", "mrr_bank", self.mrr_bank, "must be in 1..4096")
        if self.img_size is not None and (self.img_size < 16 or self.img_size % 16):
            _fail("WorkerConfig", "img_size", self.img_size, "must be a multiple of 16, >= 16")
        if not 0.05 <= self.stats_interval_s <= 3600:
            _fail("WorkerConfig", "stats_interval_s", self.stats_interval_s,
                  "must be in 0.05..3600")

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


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain JSON-able data (paths as strings), for manifests and recordings."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
