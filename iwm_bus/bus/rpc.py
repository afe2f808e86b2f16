"""The worker's RPC protocol (ROUTER socket ``Endpoints.rpc``), shared by server and client.

A client (DEALER) sends ``wire.pack("iwm.rpc", {"kind": "rpc_request", "id": n, "method": m,
"params": {...}})``; the worker answers ``{"kind": "rpc_reply", "id": n, "ok": bool,
"result": {...} | nil, "error": str | nil}`` with the same id. Ids let a client drop a late
reply to a request it already gave up on.

Methods (arrays are wire arrays; B = batch, D = latent size, K = steps, C <= cond_dim):

| method  | params | result |
|---|---|---|
| health  | {} | variant, encoder, device, precision (auto, fp32, bf16, int8), embed_dim, num_patches, cond_dim, num_actions, trained, model_path, checkpoint (a flat summary, ``iwm_bus.provenance``), frames, uptime_s, mode, version, wire (schema version), abstraction_index (nil: not measured); a dual worker adds streams {name: variant, abstraction_index, checkpoint} |
| encode  | frames u8 (B,H,W,3) or (H,W,3); patches: bool | z_cls f4 (B,D); patches f4 (B,N,D) when asked; t_ns; mrr (running, or nil) |
| encode_dual | as encode | a dual worker's (``--dual``) two streams of the same frames: z_cls_semantic, z_cls_equivariant (B,D); patches_semantic, patches_equivariant (B,N,D) when asked; t_ns; an error from a single-stream worker |
| predict | z_cls f4 (B,D); patches f4 (B,N,D)?; cond f4 (B,C)?; action_id i8 (B,)? | z_cls_pred (B,D); patches_pred (B,N,D) when patches given; uncertainty (B,) |
| rollout | z_cls f4 (B,D); patches?; cond_seq f4 (B,K,C)?; action_seq i8 (B,K)?; k int? | z_cls_seq (B,K,D); patches_last (B,N,D) when patches given; uncertainty_seq (B,K); mrr_seq (K,) |

``check_params`` validates and normalises params; the client calls it before sending (so a
bad argument fails before anything is sent) and the worker calls it on receipt. It also
refuses a request whose reply could not travel: ``reply_bytes`` is the size of the reply's
arrays, at most ``MAX_REPLY_ARRAY_BYTES`` (a rollout of 4096 candidates x 64 steps of a
192-wide latent would reply 193 MiB, three times the wire's 64 MiB message). ``health``
carries no arrays, and each checkpoint in it as a flat summary (``iwm_bus.provenance``).

Compatibility (docs/wire.md): a new method, or a new param of a method, is optional. The
worker answers a method it does not know with an error naming it, and reads a request
without the params it does not know, listing them in the result's ``ignored_params``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from iwm_bus.bus.wire import MAX_MESSAGE_BYTES

METHODS = ("health", "encode", "encode_dual", "predict", "rollout")
#: most bytes of arrays one reply may hold: the wire's message limit less room for the rest
#: of the reply (keys, scalars, each array's dtype and shape)
MAX_REPLY_ARRAY_BYTES = MAX_MESSAGE_BYTES - 64 * 1024
#: most candidates x steps one rollout call may ask for (keeps a request from exhausting memory)
MAX_ROLLOUT_STEPS_TOTAL = 1_000_000
MAX_BATCH = 4096


def _asarray(name: str, value: Any) -> np.ndarray:
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as e:  # ragged nested lists and the like
        raise ValueError(f"{name} is not an array: {e}") from None


def _batched(name: str, value: Any, kinds: str, what: str, dtype: type, ndim: int
             ) -> np.ndarray:
    """``value`` as a ``dtype`` array with a leading batch axis (added when missing)."""
    arr = _asarray(name, value)
    if arr.dtype.kind not in kinds:
        raise ValueError(f"{name} must be {what}, got dtype {arr.dtype}")
    arr = arr.astype(dtype, copy=False)
    if arr.ndim == ndim - 1:
        arr = arr[None]
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims (batched), got shape {arr.shape}")
    return arr


def _float(name: str, value: Any, ndim: int, width: int | None = None) -> np.ndarray:
    arr = _batched(name, value, "fiu", "numeric", np.float32, ndim)
    if width is not None and arr.shape[-1] != width:
        raise ValueError(f"{name} last dimension must be {width}, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or inf")
    if not 1 <= arr.shape[0] <= MAX_BATCH:
        raise ValueError(f"{name} batch must be 1..{MAX_BATCH}, got {arr.shape[0]}")
    return arr


def _ids(name: str, value: Any, ndim: int, num_actions: int) -> np.ndarray:
    arr = _batched(name, value, "iu", "integers", np.int64, ndim)
    if arr.size and (arr.min() < -1 or arr.max() >= num_actions):
        raise ValueError(f"{name} values must be -1 (none) or in 0..{num_actions - 1}")
    return arr


def check_params(method: str, params: Mapping[str, Any], *, embed_dim: int, cond_dim: int,
                 num_actions: int, num_patches: int | None = None) -> dict[str, Any]:
    """Validate ``params`` of ``method`` against the model's sizes; return normalised params.

    Raises ``ValueError`` naming the argument and the problem, also when the reply would
    hold more than ``MAX_REPLY_ARRAY_BYTES`` of arrays.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    unknown = set(params) - PARAMS[method]
    if unknown:
        raise ValueError(f"{method}: unknown params {sorted(unknown)}")
    out = _checked(method, params, embed_dim, cond_dim, num_actions, num_patches)
    nbytes = reply_bytes(method, out, embed_dim, num_patches)
    if nbytes > MAX_REPLY_ARRAY_BYTES:
        raise ValueError(f"{method}: the reply would hold {nbytes / 2**20:.0f} MiB of arrays, "
                         f"more than a message carries ({MAX_MESSAGE_BYTES >> 20} MiB); "
                         "split the batch")
    return out


def reply_bytes(method: str, params: Mapping[str, Any], embed_dim: int,
                num_patches: int | None) -> int:
    """Bytes of the arrays (float32) in the reply to ``params`` as ``check_params`` returns
    them; ``num_patches`` None (not known) counts encode's patches as none."""
    d, f4 = embed_dim, 4
    if method == "health":
        return 0
    if method in ("encode", "encode_dual"):
        b = params["frames"].shape[0]
        per_stream = b * d + (b * (num_patches or 0) * d if params["patches"] else 0)
        return f4 * per_stream * (2 if method == "encode_dual" else 1)
    b = params["z_cls"].shape[0]
    patches = params.get("patches")
    patch_values = 0 if patches is None else patches.shape[0] * patches.shape[1] * d
    if method == "predict":  # z_cls_pred (B, D), uncertainty (B,), patches_pred (B, N, D)
        return f4 * (b * d + b + patch_values)
    seq = params["cond_seq"] if "cond_seq" in params else params["action_seq"]
    k = seq.shape[1]  # z_cls_seq (B, K, D), uncertainty_seq (B, K), mrr_seq (K,), patches_last
    return f4 * (b * k * d + b * k + k + patch_values)


def _checked(method: str, params: Mapping[str, Any], embed_dim: int, cond_dim: int,
             num_actions: int, num_patches: int | None) -> dict[str, Any]:
    if method == "health":
        return {}
    if method in ("encode", "encode_dual"):
        return _check_encode(params)
    out: dict[str, Any] = {"z_cls": _float("z_cls", _required(method, params, "z_cls"), 2,
                                           embed_dim)}
    batch = out["z_cls"].shape[0]
    if params.get("patches") is not None:
        p = _float("patches", params["patches"], 3, embed_dim)
        if num_patches is not None and p.shape[1] != num_patches:
            raise ValueError(f"patches must have {num_patches} tokens, got shape {p.shape}")
        out["patches"] = _same_batch("patches", p, batch)
    if method == "predict":
        if params.get("cond") is not None:
            out["cond"] = _same_batch("cond", _cond("cond", params["cond"], 2, cond_dim), batch)
        if params.get("action_id") is not None:
            out["action_id"] = _same_batch("action_id", _ids(
                "action_id", params["action_id"], 1, num_actions), batch)
        return out
    return _check_rollout(params, out, batch, cond_dim, num_actions)


def _check_encode(params: Mapping[str, Any]) -> dict[str, Any]:
    frames = _asarray("frames", _required("encode", params, "frames"))
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 RGB, got dtype {frames.dtype}")
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (H,W,3) or (B,H,W,3), got shape {frames.shape}")
    if not 1 <= frames.shape[0] <= 256 or min(frames.shape[1:3]) < 1:
        raise ValueError(f"frames batch must be 1..256 non-empty images, got {frames.shape}")
    return {"frames": frames, "patches": bool(params.get("patches", False))}


def _check_rollout(params: Mapping[str, Any], out: dict[str, Any], batch: int,
                   cond_dim: int, num_actions: int) -> dict[str, Any]:
    steps = None
    if params.get("cond_seq") is not None:
        out["cond_seq"] = _same_batch("cond_seq", _cond("cond_seq", params["cond_seq"], 3,
                                                        cond_dim), batch)
        steps = out["cond_seq"].shape[1]
    if params.get("action_seq") is not None:
        ids = _same_batch("action_seq", _ids("action_seq", params["action_seq"], 2,
                                             num_actions), batch)
        if steps is not None and ids.shape[1] != steps:
            raise ValueError(f"action_seq has {ids.shape[1]} steps but cond_seq has {steps}")
        out["action_seq"], steps = ids, ids.shape[1]
    k = params.get("k")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool)):
        raise ValueError(f"rollout k (steps) must be an int, got {k!r}")
    if steps is None:
        if k is None:
            raise ValueError("rollout needs cond_seq, action_seq or an int k (steps)")
        steps = k
    elif k is not None and k != steps:
        raise ValueError(f"rollout k={k} disagrees with the {steps} steps of cond_seq/action_seq")
    if not 1 <= steps <= 64:
        raise ValueError(f"rollout steps must be 1..64, got {steps}")
    if batch * steps > MAX_ROLLOUT_STEPS_TOTAL:
        raise ValueError(f"rollout of {batch} x {steps} exceeds {MAX_ROLLOUT_STEPS_TOTAL}")
    if "cond_seq" not in out and "action_seq" not in out:  # allocate only once k is checked
        out["cond_seq"] = np.zeros((batch, steps, cond_dim), np.float32)
    return out


def _cond(name: str, value: Any, ndim: int, cond_dim: int) -> np.ndarray:
    """A continuous action/augmentation vector, zero-padded to ``cond_dim`` (seed: 3 of 16)."""
    arr = _float(name, value, ndim)
    if arr.shape[-1] > cond_dim:
        raise ValueError(f"{name} has length {arr.shape[-1]}; the model takes at most "
                         f"{cond_dim}")
    if arr.shape[-1] < cond_dim:
        pad = [(0, 0)] * (arr.ndim - 1) + [(0, cond_dim - arr.shape[-1])]
        arr = np.pad(arr, pad)
    return arr


def _same_batch(name: str, arr: np.ndarray, batch: int) -> np.ndarray:
    if arr.shape[0] != batch:
        raise ValueError(f"{name} batch is {arr.shape[0]} but z_cls batch is {batch}")
    return arr


def _required(method: str, params: Mapping[str, Any], name: str) -> Any:
    if params.get(name) is None:
        raise ValueError(f"{method} needs the parameter {name!r}")
    return params[name]


#: the params of each method
PARAMS = {
    "health": set(),
    "encode": {"frames", "patches"},
    "encode_dual": {"frames", "patches"},
    "predict": {"z_cls", "patches", "cond", "action_id"},
    "rollout": {"z_cls", "patches", "cond_seq", "action_seq", "k"},
}
