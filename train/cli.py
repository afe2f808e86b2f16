"""``iwm-train``: train the world model (Phase 1 on images, Phase 3 on recorded sessions).

    # Phase 1: augmentation-conditioned JEPA on image folders and/or sessions' frames
    iwm-train --phase 1 --preset cpu-tiny --data_dirs data/default/train --out_dir runs/p1
    # Phase 3: action-conditioned, from the Phase 1 weights
    iwm-train --phase 3 --preset cpu-tiny --sessions data/default/train \\
        --init_from runs/p1/last.pt --out_dir runs/p3
    # continue a stopped run exactly where its last checkpoint left it
    iwm-train --phase 3 --preset cpu-tiny --sessions data/default/train --out_dir runs/p3 --resume auto
    # DDP: 2 processes on this machine (gloo on CPU, NCCL on GPUs); multi-node: torchrun's
    # rendezvous, e.g. --nnodes 2 --node_rank R --rdzv_endpoint HOST:29400 on each node
    torchrun --standalone --nproc_per_node 2 -m train --ddp --phase 1 --preset cpu-tiny ...

Order of precedence: preset < ``IWM_DATA_DIRS`` / ``IWM_BATCH_SIZE`` / ``IWM_EPOCHS`` /
``IWM_LR`` < flags < ``--set section.key=value`` (sections: train, model, objective, aug,
masks). Bad input (unknown preset or key, empty data folder, corrupt session, a checkpoint
of another model, a batch that does not divide over the DDP ranks) prints one line and exits
2 before any training starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from loguru import logger

__all__ = ["main"]

_FLAGS = {  # flag -> (section, key, type)
    "phase": ("train", "phase", int), "device": ("train", "device", str),
    "batch_size": ("train", "batch_size", int), "epochs": ("train", "epochs", int),
    "steps": ("train", "steps", int), "lr": ("train", "lr", float),
    "seed": ("train", "seed", int), "k_steps": ("train", "k_steps", int),
    "out_dir": ("train", "out_dir", str), "init_from": ("train", "init_from", str),
    "max_frames": ("train", "max_frames", int), "ckpt_every": ("train", "ckpt_every", int),
    "load_workers": ("train", "load_workers", int), "minutes": ("train", "minutes", float),
    "cf_states": ("train", "cf_states", int),
}
_ENV = {"IWM_BATCH_SIZE": ("batch_size", int), "IWM_EPOCHS": ("epochs", int),
        "IWM_LR": ("lr", float)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iwm-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="cpu-tiny | gpu-core | gpu-equivariant | gpu-invariant")
    p.add_argument("--phase", type=int, choices=(1, 3))
    p.add_argument("--data_dirs", nargs="+", help="Phase 1: image folders and/or sessions")
    p.add_argument("--sessions", nargs="+", help="Phase 3: session files or folders")
    for flag, (_, _, typ) in _FLAGS.items():
        if flag != "phase":
            p.add_argument(f"--{flag}", type=typ)
    p.add_argument("--ddp", action="store_true", help="run under torchrun (DDP)")
    p.add_argument("--resume", help="a training checkpoint, or 'auto' for OUT_DIR/last.pt")
    p.add_argument("--freeze_encoder", action="store_true", help="Phase 3: train the predictor only")
    p.add_argument("--no_progress", action="store_true", help="no tqdm bar")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config field (JSON value), e.g. objective.change_weight=2")
    return p


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def resolve_config(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    """The nested config dict from preset, env vars, flags and ``--set`` (ValueError if bad)."""
    from train.presets import preset

    d: dict[str, Any] = preset(args.preset) if args.preset else {}
    tr = d.setdefault("train", {})
    if env.get("IWM_DATA_DIRS"):
        tr["data_dirs"] = [p for p in env["IWM_DATA_DIRS"].replace(",", os.pathsep)
                           .split(os.pathsep) if p]
    for var, (key, typ) in _ENV.items():
        if env.get(var):
            try:
                tr[key] = typ(env[var])
            except ValueError as e:
                raise ValueError(f"{var}={env[var]!r} is not a valid {typ.__name__}") from e
    for flag, (section, key, _) in _FLAGS.items():
        if getattr(args, flag) is not None:
            d.setdefault(section, {})[key] = getattr(args, flag)
    if args.data_dirs:
        tr["data_dirs"] = args.data_dirs
    if args.sessions:
        tr["sessions"] = args.sessions
    tr["ddp"] = bool(args.ddp)
    tr["progress"] = not args.no_progress and tr.get("progress", True)
    if args.freeze_encoder:
        d.setdefault("objective", {})["freeze_encoder"] = True
    for item in args.set:
        name, sep, value = item.partition("=")
        section, dot, key = name.partition(".")
        if not sep or not dot:
            raise ValueError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        d.setdefault(section, {})[key] = _parse_value(value)
    return d


def _fail(msg: str) -> int:
    print(f"iwm-train: error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from iwm_bus.errors import CheckpointError
    from train.config import RunConfig
    from train.data import DataError
    from train.trainer import DistInfo, Trainer, setup_distributed

    try:
        run = RunConfig.from_dict(resolve_config(args, dict(os.environ)))
    except (ValueError, TypeError) as e:
        return _fail(str(e))
    info = DistInfo.from_env()
    if run.train.ddp and run.train.batch_size % info.world:
        return _fail(f"batch size {run.train.batch_size} does not divide over {info.world} "
                     "DDP ranks")
    info = setup_distributed(run.train)
    try:
        trainer = Trainer(run, info)
        if args.resume:
            path = Path(run.train.out_dir) / "last.pt" if args.resume == "auto" else args.resume
            if args.resume != "auto" or Path(path).exists():
                trainer.resume(path)
    except (DataError, CheckpointError, ValueError) as e:
        return _fail(str(e))
    logger.info("training phase {} for {} steps ({} samples, batch {} over {} rank(s)) -> {}",
                run.train.phase, trainer.total, trainer.num_samples, run.train.batch_size,
                info.world, run.train.out_dir)
    last = trainer.run()
    if info.rank == 0:
        logger.info("done at step {}: {}", trainer.step,
                    {k: round(v, 4) for k, v in last.items() if not k.startswith("t_")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
