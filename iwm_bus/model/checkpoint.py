"""IWM checkpoints: config + weights + format version in a ``torch.save`` zip.

Only tensors and plain containers go in, and they are read back with ``weights_only=True``,
so loading never unpickles code. The public names are re-exported by ``iwm_bus.model``.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from iwm_bus.errors import CheckpointError
from iwm_bus.model.config import IWMConfig
from iwm_bus.model.iwm import IWM

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "load_checkpoint", "load_iwm", "read_header",
           "save_checkpoint"]

CHECKPOINT_FORMAT = "iwm-bus/checkpoint"
CHECKPOINT_VERSION = 2  # 2: masked-token predictor, normed latents


def _check_plain(obj: Any, where: str) -> None:
    """Raise TypeError unless obj is made of tensors and plain containers/scalars."""
    if obj is None or isinstance(obj, bool | int | float | str | Tensor):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str | int):
                raise TypeError(f"{where}: key {k!r} is not a str or int")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(obj).__name__}; checkpoints hold only tensors, "
                    "numbers, strings and lists/dicts of them")


def save_checkpoint(model: IWM, path: str | os.PathLike, **extra: Any) -> None:
    """Write config + weights (+ target encoder if built) + ``extra`` to ``path`` atomically.

    ``extra`` (step, optimizer state, ...) must be plain tensors/numbers/strings/containers,
    so that :func:`load_checkpoint` can read it back with ``weights_only=True``.
    """
    if model.precision == "int8":
        raise ValueError("an int8 model cannot be saved: its weights were quantised for "
                         "inference; save the float model it was made from")
    _check_plain(extra, "extra")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
               "config": model.config.to_dict(), "state_dict": state, "extra": extra,
               "torch_version": str(torch.__version__)}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: checkpoint file not found") from e
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused: the file holds pickled Python objects, not only tensors and "
            "plain containers (weights_only=True); it may be malicious or from another tool. "
            "Re-save it with iwm_bus.model.save_checkpoint from a trusted copy.") from e
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({e}); "
                              "re-copy or re-save it") from e
    except Exception as e:  # noqa: BLE001 - torch's legacy reader fails in many ways on
        # files that are not checkpoints at all (IndexError on a text file, ...)
        raise CheckpointError(f"{path}: not a torch checkpoint ({type(e).__name__}: {e}); "
                              "give a file written by save_checkpoint or iwm-train") from e


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a checkpoint's payload (CPU tensors) without building a model.

    Returns ``{"format", "version", "config", "state_dict", "extra", ...}``; raises
    :class:`CheckpointError` naming the file and the problem.
    """
    path = Path(path)
    payload = _torch_load(path)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an iwm-bus checkpoint (no format "
                              f"{CHECKPOINT_FORMAT!r}); write one with save_checkpoint")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {payload.get('version')!r}, "
                              f"this code reads version {CHECKPOINT_VERSION}")
    for key, kind in [("config", dict), ("state_dict", dict), ("extra", dict)]:
        if not isinstance(payload.get(key), kind):
            raise CheckpointError(f"{path}: checkpoint field {key!r} is missing or not a {kind.__name__}")
    return payload


def read_header(path: str | os.PathLike, variant: str | None = None
                ) -> tuple[IWMConfig, dict[str, Any]]:
    """A checkpoint's validated config and its ``extra["info"]`` (``{}`` when absent),
    without building a model; ``variant`` if given must match. Raises
    :class:`CheckpointError` naming the file and the problem."""
    path = Path(path)
    payload = load_checkpoint(path)
    return _config_of(path, payload, variant), _info_of(payload)


def _config_of(path: Path, payload: dict[str, Any], variant: str | None) -> IWMConfig:
    try:
        cfg = IWMConfig.from_dict(payload["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid config in checkpoint: {e}") from e
    if variant is not None and cfg.variant != variant:
        raise CheckpointError(f"{path}: checkpoint is variant {cfg.variant!r}, "
                              f"expected {variant!r}")
    return cfg


def _info_of(payload: dict[str, Any]) -> dict[str, Any]:
    info = payload["extra"].get("info")
    return info if isinstance(info, dict) else {}


def _split_target(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    main = {k: v for k, v in state.items() if not k.startswith("target_encoder.")}
    target = {k[len("target_encoder."):]: v for k, v in state.items()
              if k.startswith("target_encoder.")}
    return main, target


def _mismatch(model: nn.Module, state: Mapping[str, Tensor]) -> Iterator[str]:
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing:
        yield f"missing weights {missing[:5]}{' ...' if len(missing) > 5 else ''}"
    if unexpected:
        yield f"unexpected weights {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
    for k in sorted(own.keys() & state.keys()):
        if own[k].shape != state[k].shape:
            yield f"{k} has shape {tuple(state[k].shape)}, config gives {tuple(own[k].shape)}"


def load_iwm(path: str | os.PathLike, device: str | torch.device = "cpu", *,
             variant: str | None = None, with_target: bool = False,
             target_as_encoder: bool = False, compile: bool = False, amp: bool = True,
             cuda_graphs: bool = True) -> IWM:
    """Load a checkpoint into an IWM in eval mode on ``device``; never unpickles code.

    ``variant``: if given, the checkpoint's variant must match. ``with_target``: also load
    (or, if the file has none, initialise from the encoder) the EMA target encoder.
    ``target_as_encoder``: a training checkpoint's EMA target weights become the encoder
    (the space its predictor was trained to predict in; what ``train.export`` ships).
    Any problem raises :class:`CheckpointError` naming the file and what is wrong.
    """
    path = Path(path)
    payload = load_checkpoint(path)
    cfg = _config_of(path, payload, variant)
    main, target = _split_target(payload["state_dict"])
    model = IWM(cfg, compile=compile, amp=amp, cuda_graphs=cuda_graphs)
    problems = list(_mismatch(model, main))
    if with_target and target:
        problems += [f"target_encoder: {m}" for m in _mismatch(model.encoder, target)]
    if problems:
        raise CheckpointError(f"{path}: weights do not match the checkpoint's config: "
                              + "; ".join(problems))
    model.load_state_dict(main, strict=True)
    if target_as_encoder:
        if not target:
            raise CheckpointError(f"{path}: no EMA target encoder in the checkpoint")
        problems = list(_mismatch(model.encoder, target))
        if problems:
            raise CheckpointError(f"{path}: target encoder weights do not match: "
                                  + "; ".join(problems))
        model.encoder.load_state_dict(target, strict=True)
    # where the weights came from, for health replies: path + the checkpoint's "info" extra
    # (training data, eval summary, action vocabulary), when it has one
    model.provenance = {"path": str(path), **_info_of(payload)}
    if with_target:  # a copy of the loaded encoder, then the saved target if there is one
        model.init_target_encoder().load_state_dict(target or model.encoder.state_dict())
    return model.to(device).eval()
