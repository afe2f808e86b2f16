"""``IWMClient``: the seed guide's client, over the worker's RPC socket instead of HTTP.

Sync and asyncio flavours with the same methods (the seed's names)::

    from agent_bridge import IWMClient, AsyncIWMClient
    iwm = IWMClient("/tmp/iwm-1000", timeout_s=5)         # run dir or tcp://HOST:PORT
    info = iwm.health()                                    # embed_dim, cond_dim, num_actions...
    res = iwm.encode_image(frame)                          # res.z_cls (D,), res.timestamp, res.mrr
    pred = iwm.predict_next(res.z_cls, aug_params=[0.5, 0.3, 0.0])   # pred.z_cls_pred (D,)
    roll = iwm.rollout(res.z_cls, aug_seq=[[0.5, 0.3], [0.4, 0.4], [0.3, 0.5]])
    roll.z_cls_seq, roll.mrr_seq, roll.uncertainty_seq     # (K, D), (K,), (K,)
    many = iwm.rollout_batch(res.z_cls, action_seqs=ids)   # ids (B, K): one call, (B, K, D)

    async with AsyncIWMClient(run_dir) as iwm:
        res = await iwm.encode_image(frame)

Arguments are checked with ``iwm_bus.bus.rpc.check_params`` against the sizes from a cached
``health()`` before anything is sent, so a wrong latent size or action length raises
``ValueError`` naming the argument. Every call has a timeout: a dead, missing or overloaded
worker gives ``ServiceTimeout`` within it, an error reply gives ``ServiceError``, and so, at
once, does a worker of another major wire version (docs/wire.md). Requests carry ids and a
reply to an older request is dropped (counted in ``stale_replies``), never returned for a
newer one; after a timeout the socket is recreated, so requests queued for a dead worker
are not delivered to its replacement. One request is in flight at a time per client (calls
from several threads or tasks queue on a lock); use several clients for parallel requests.
Result arrays are read-only views of the reply; copy them to edit in place.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from agent_bridge.bridge import Target, resolve_endpoints
from iwm_bus.bus import rpc, topics, wire
from iwm_bus.bus.transport import Endpoints
from iwm_bus.errors import ServiceError, ServiceTimeout, WireError, WireVersionError

__all__ = ["AsyncIWMClient", "BatchRolloutResult", "DualEncodeResult", "EncodeResult", "IWMClient",
           "PredictResult", "RolloutResult"]

# rpc parameter name -> the client argument that feeds it (for error messages)
_ARG_NAMES = {"cond_seq": "aug_seq", "cond": "aug_params", "action_id": "action"}
_ARG_RE = re.compile(r"\b(cond_seq|cond|action_id)\b")


@dataclass(frozen=True)
class EncodeResult:
    """``encode_image``: z_cls (D,) for one frame, (B, D) for a batch; patches when asked."""

    z_cls: np.ndarray
    patches: np.ndarray | None
    t_ns: int
    mrr: float | None

    @property
    def timestamp(self) -> float:
        """When the worker encoded the frame: ``t_ns`` in seconds, on the worker's clock."""
        return self.t_ns / 1e9


@dataclass(frozen=True)
class DualEncodeResult:
    """``encode_dual``: both streams of a dual worker for the same frame(s): ``semantic``
    (invariant, for the LLM) and ``equivariant`` (for control), each an EncodeResult."""

    semantic: EncodeResult
    equivariant: EncodeResult


@dataclass(frozen=True)
class PredictResult:
    """``predict_next``: (D,) / scalar for one latent, (B, D) / (B,) for a batch."""

    z_cls_pred: np.ndarray
    patches_pred: np.ndarray | None
    uncertainty: float | np.ndarray


@dataclass(frozen=True)
class RolloutResult:
    """``rollout`` of one sequence: z_cls_seq (K, D), uncertainty_seq (K,), mrr_seq (K,)."""

    z_cls_seq: np.ndarray
    mrr_seq: np.ndarray
    uncertainty_seq: np.ndarray
    patches_last: np.ndarray | None = None


@dataclass(frozen=True)
class BatchRolloutResult:
    """``rollout_batch``: z_cls_seq (B, K, D), uncertainty_seq (B, K), mrr_seq (K,)."""

    z_cls_seq: np.ndarray
    mrr_seq: np.ndarray
    uncertainty_seq: np.ndarray
    patches_last: np.ndarray | None = None


def _rename_args(text: str) -> str:
    return _ARG_RE.sub(lambda m: _ARG_NAMES[m.group(1)], text)


def _batched(name: str, value: Any, ndim: int, batch: int) -> np.ndarray:
    """``value`` with ndim dims; one unbatched item (ndim - 1 dims) is repeated ``batch`` times."""
    arr = np.asarray(value)
    if arr.ndim == ndim - 1:
        arr = np.broadcast_to(arr[None], (batch, *arr.shape))
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim - 1} dims (or {ndim} batched), got shape "
                         f"{arr.shape}")
    return arr


class _Core:
    """Everything except the socket: request building, validation, reply parsing, counters."""

    def __init__(self, target: Target, timeout_s: float) -> None:
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) \
                or not 0 < timeout_s <= 3600:
            raise ValueError(f"timeout_s must be in (0, 3600] seconds, got {timeout_s!r}")
        self.endpoints: Endpoints = resolve_endpoints(target)
        self.endpoint = self.endpoints.rpc
        self.timeout_s = float(timeout_s)
        self.info: dict[str, Any] | None = None
        self._ids = itertools.count(1)
        self.calls: Counter[str] = Counter()
        self.timeouts = 0
        self.stale_replies = 0
        self.bad_replies = 0

    def timeout(self, timeout_s: float | None) -> float:
        t = self.timeout_s if timeout_s is None else timeout_s
        if not t > 0:
            raise ValueError(f"timeout_s must be > 0, got {t!r}")
        return float(t)

    def check(self, fn: str, method: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """Validate with the worker's own rules; ValueError names the client argument."""
        assert self.info is not None
        try:
            return rpc.check_params(
                method, params, embed_dim=int(self.info["embed_dim"]),
                cond_dim=int(self.info["cond_dim"]), num_actions=int(self.info["num_actions"]),
                num_patches=self.info.get("num_patches"))
        except ValueError as e:
            raise ValueError(f"IWMClient.{fn}: {_rename_args(str(e))}") from None

    def request(self, method: str, params: Mapping[str, Any]) -> tuple[int, list[bytes]]:
        rid = next(self._ids)
        self.calls[method] += 1
        frames = wire.pack(topics.RPC, {"kind": "rpc_request", "id": rid, "method": method,
                                        "params": dict(params)})
        return rid, frames

    def parse(self, frames: list[bytes], rid: int, method: str) -> dict[str, Any] | None:
        """The result of reply ``rid``; None for a stale or garbled reply (counted)."""
        try:
            _, msg = wire.unpack(frames)
        except WireVersionError as e:  # waiting would only end in a timeout
            raise ServiceError(f"{method}: the worker at {self.endpoint}: {e}") from None
        except WireError:
            self.bad_replies += 1
            return None
        if msg["kind"] != "rpc_reply":
            self.bad_replies += 1
            return None
        if msg["id"] != rid:
            self.stale_replies += 1
            return None
        if not msg["ok"]:
            raise ServiceError(f"{method} failed on the worker at {self.endpoint}: "
                               f"{msg.get('error') or 'no error message'}")
        return msg.get("result") or {}

    def no_reply(self, method: str, timeout_s: float, connected: bool) -> ServiceTimeout:
        self.timeouts += 1
        hint = ""
        if self.endpoint.startswith("ipc://"):
            path = self.endpoint[len("ipc://"):]
            if not os.path.exists(path):
                hint = f"; no socket file {path}: is the sidecar running with this run dir?"
        if not connected:
            return ServiceTimeout(f"{method}: no worker accepted a connection at "
                                  f"{self.endpoint} within {timeout_s:g} s{hint or ''} "
                                  "(start it with iwm-launch)")
        return ServiceTimeout(f"{method}: no reply from the worker at {self.endpoint} within "
                              f"{timeout_s:g} s (dead, stalled or overloaded; raise timeout_s "
                              f"for big requests){hint}")

    # -------------------------------------------------------------- params and results

    def encode_params(self, frame: Any, patches: bool) -> tuple[dict[str, Any], bool]:
        arr = np.asarray(frame)
        return self.check("encode_image", "encode", {"frames": arr, "patches": bool(patches)}), \
            arr.ndim == 3

    def encode_result(self, res: dict[str, Any], single: bool) -> EncodeResult:
        z, p = np.asarray(res["z_cls"]), res.get("patches")
        if single:
            z, p = z[0], (None if p is None else np.asarray(p)[0])
        mrr = res.get("mrr")
        return EncodeResult(z, p, int(res.get("t_ns") or 0), None if mrr is None else float(mrr))

    def encode_dual_result(self, res: dict[str, Any], single: bool) -> DualEncodeResult:
        def one(name: str) -> EncodeResult:
            return self.encode_result({"z_cls": res[f"z_cls_{name}"],
                                       "patches": res.get(f"patches_{name}"),
                                       "t_ns": res.get("t_ns")}, single)
        return DualEncodeResult(one("semantic"), one("equivariant"))

    def predict_params(self, z_cls: Any, aug_params: Any, action: Any,
                       patches: Any) -> tuple[dict[str, Any], bool]:
        z = np.asarray(z_cls)
        single = z.ndim == 1
        batch = 1 if single else (z.shape[0] if z.ndim == 2 else 1)
        params: dict[str, Any] = {"z_cls": z, "patches": patches}
        if aug_params is not None:
            params["cond"] = _batched("aug_params", aug_params, 2, batch)
        if action is not None:
            params["action_id"] = _batched("action", action, 1, batch)
        return self.check("predict_next", "predict", params), single

    def predict_result(self, res: dict[str, Any], single: bool) -> PredictResult:
        z, p, u = np.asarray(res["z_cls_pred"]), res.get("patches_pred"), res["uncertainty"]
        u = np.asarray(u)
        if single:
            return PredictResult(z[0], None if p is None else np.asarray(p)[0], float(u[0]))
        return PredictResult(z, p, u)

    def rollout_params(self, fn: str, z_cls: Any, aug_seq: Any, action_seq: Any, patches: Any,
                       k: int | None, batch: int | None) -> dict[str, Any]:
        """Params for one sequence (batch None) or ``batch`` candidate sequences."""
        b = 1 if batch is None else batch
        dims = 0 if batch is None else 1  # extra leading dim of the sequences
        z = _batched("z_cls", z_cls, 2, b)
        params: dict[str, Any] = {"z_cls": z}
        if patches is not None:
            params["patches"] = _batched("patches", patches, 3, b)
        if aug_seq is not None:
            arr = np.asarray(aug_seq, dtype=np.float32)
            if arr.ndim != 2 + dims:
                raise ValueError(f"IWMClient.{fn}: {'aug_seqs' if dims else 'aug_seq'} must be "
                                 f"{'(B, K, C)' if dims else '(K, C)'}, got shape {arr.shape}")
            params["cond_seq"] = arr if dims else arr[None]
        if action_seq is not None:
            ids = np.asarray(action_seq)
            if ids.ndim != 1 + dims:
                raise ValueError(f"IWMClient.{fn}: {'action_seqs' if dims else 'action_seq'} "
                                 f"must be {'(B, K)' if dims else '(K,)'}, got shape {ids.shape}")
            params["action_seq"] = ids if dims else ids[None]
        if k is not None:
            params["k"] = k
        return self.check(fn, "rollout", params)

    @staticmethod
    def rollout_result(res: dict[str, Any], single: bool) -> RolloutResult | BatchRolloutResult:
        z, u = np.asarray(res["z_cls_seq"]), np.asarray(res["uncertainty_seq"])
        m = np.asarray(res["mrr_seq"]) if res.get("mrr_seq") is not None else \
            np.full(z.shape[1], np.nan, np.float32)
        p = res.get("patches_last")
        if single:
            return RolloutResult(z[0], m, u[0], None if p is None else np.asarray(p)[0])
        return BatchRolloutResult(z, m, u, p)


class IWMClient:
    """Blocking RPC client for the encoder worker (see the module docstring)."""

    def __init__(self, target: Target, timeout_s: float = 5.0, *,
                 ctx: zmq.Context | None = None) -> None:
        self._core = _Core(target, timeout_s)
        self._ctx = ctx or zmq.Context.instance()
        self._lock = threading.Lock()
        self._sock: zmq.Socket | None = None

    # -------------------------------------------------------------- plumbing

    @property
    def endpoint(self) -> str:
        return self._core.endpoint

    @property
    def stale_replies(self) -> int:
        return self._core.stale_replies

    @property
    def timeouts(self) -> int:
        return self._core.timeouts

    @property
    def calls(self) -> Counter[str]:
        return self._core.calls

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            self._sock = _dealer(self._ctx, self.endpoint)
        return self._sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def call(self, method: str, params: Mapping[str, Any], timeout_s: float | None = None
             ) -> dict[str, Any]:
        """Send one already-validated request and wait for its reply (bounded)."""
        t = self._core.timeout(timeout_s)
        with self._lock:
            deadline = time.monotonic() + t
            rid, frames = self._core.request(method, params)
            sock = self._socket()
            if not sock.poll(int(t * 1000), zmq.POLLOUT):
                self._reset()
                raise self._core.no_reply(method, t, connected=False)
            sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=len(frames[-1]) < 65536)
            while (left := deadline - time.monotonic()) > 0:
                if sock.poll(max(1, int(left * 1000)), zmq.POLLIN):
                    res = self._core.parse(sock.recv_multipart(zmq.NOBLOCK), rid, method)
                    if res is not None:
                        return res
            self._reset()  # drop the queued request and any late reply with the socket
            raise self._core.no_reply(method, t, connected=True)

    def close(self) -> None:
        with self._lock:
            self._reset()

    def __enter__(self) -> IWMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"IWMClient({self.endpoint!r}, calls={dict(self.calls)})"

    def _ensure_info(self) -> None:
        if self._core.info is None:
            self.health()

    # -------------------------------------------------------------- the seed's API

    def health(self, timeout_s: float | None = None) -> dict[str, Any]:
        """The worker's description (variant, embed_dim, cond_dim, num_actions, ...); cached."""
        info = self.call("health", {}, timeout_s)
        self._core.info = info
        return info

    @property
    def info(self) -> dict[str, Any]:
        """The cached health() reply (fetched on first use)."""
        self._ensure_info()
        assert self._core.info is not None
        return self._core.info

    def encode_image(self, frame: Any, patches: bool = False,
                     timeout_s: float | None = None) -> EncodeResult:
        """Encode an RGB uint8 frame (H, W, 3) -> z_cls (D,), or a batch (B, H, W, 3) -> (B, D)."""
        self._ensure_info()
        params, single = self._core.encode_params(frame, patches)
        return self._core.encode_result(self.call("encode", params, timeout_s), single)

    def encode_dual(self, frame: Any, patches: bool = False,
                    timeout_s: float | None = None) -> DualEncodeResult:
        """Both streams of a dual worker (``iwm-launch --dual``) for the same frame(s), one
        preprocessing; ``ServiceError`` from a single-stream worker."""
        self._ensure_info()
        params, single = self._core.encode_params(frame, patches)
        return self._core.encode_dual_result(self.call("encode_dual", params, timeout_s),
                                             single)

    def predict_next(self, z_cls: Any, aug_params: Any = None, action: int | Any = None,
                     patches: Any = None, timeout_s: float | None = None) -> PredictResult:
        """Next latent from z_cls (D,) or (B, D) with a continuous ``aug_params`` vector
        (zero-padded to cond_dim) and/or a discrete ``action`` id."""
        self._ensure_info()
        params, single = self._core.predict_params(z_cls, aug_params, action, patches)
        return self._core.predict_result(self.call("predict", params, timeout_s), single)

    def rollout(self, z_cls: Any, aug_seq: Any = None, action_seq: Any = None,
                patches: Any = None, k: int | None = None,
                timeout_s: float | None = None) -> RolloutResult:
        """K steps from z_cls (D,) along ``aug_seq`` (K, C) and/or ``action_seq`` (K,)
        (or ``k`` steps of no action)."""
        self._ensure_info()
        params = self._core.rollout_params("rollout", z_cls, aug_seq, action_seq, patches, k,
                                           None)
        out = self._core.rollout_result(self.call("rollout", params, timeout_s), True)
        assert isinstance(out, RolloutResult)
        return out

    def rollout_batch(self, z_cls: Any, aug_seqs: Any = None, action_seqs: Any = None,
                      patches: Any = None, timeout_s: float | None = None) -> BatchRolloutResult:
        """B candidate sequences in one call: ``aug_seqs`` (B, K, C) and/or ``action_seqs``
        (B, K) from one start z_cls (D,) (or one per candidate, (B, D))."""
        self._ensure_info()
        batch = _candidates(aug_seqs, action_seqs)
        params = self._core.rollout_params("rollout_batch", z_cls, aug_seqs, action_seqs,
                                           patches, None, batch)
        out = self._core.rollout_result(self.call("rollout", params, timeout_s), False)
        assert isinstance(out, BatchRolloutResult)
        return out


def _dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    """The client's DEALER socket (sync or asyncio, after ``ctx``), connected."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a worker that is not there
    sock.setsockopt(zmq.RECONNECT_IVL, 20)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
    sock.connect(endpoint)
    return sock


def _candidates(aug_seqs: Any, action_seqs: Any) -> int:
    if aug_seqs is None and action_seqs is None:
        raise ValueError("IWMClient.rollout_batch needs aug_seqs (B, K, C) and/or "
                         "action_seqs (B, K)")
    shape = np.shape(aug_seqs if aug_seqs is not None else action_seqs)
    if len(shape) < 2:
        raise ValueError(f"IWMClient.rollout_batch: candidate sequences must be batched, got "
                         f"shape {shape}")
    return int(shape[0])


class AsyncIWMClient:
    """asyncio RPC client (``await iwm.encode_image(frame)``); same methods as ``IWMClient``."""

    def __init__(self, target: Target, timeout_s: float = 5.0, *,
                 ctx: zmq.asyncio.Context | None = None) -> None:
        self._core = _Core(target, timeout_s)
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._lock: asyncio.Lock | None = None
        self._sock: zmq.asyncio.Socket | None = None

    endpoint = IWMClient.endpoint
    stale_replies = IWMClient.stale_replies
    timeouts = IWMClient.timeouts
    calls = IWMClient.calls

    def _socket(self) -> zmq.asyncio.Socket:
        if self._sock is None:
            self._sock = _dealer(self._ctx, self.endpoint)
        return self._sock

    _reset = IWMClient._reset

    async def call(self, method: str, params: Mapping[str, Any],
                   timeout_s: float | None = None) -> dict[str, Any]:
        """Send one already-validated request and await its reply (bounded)."""
        t = self._core.timeout(timeout_s)
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            deadline = time.monotonic() + t
            rid, frames = self._core.request(method, params)
            sock = self._socket()
            if not await sock.poll(int(t * 1000), zmq.POLLOUT):
                self._reset()
                raise self._core.no_reply(method, t, connected=False)
            await sock.send_multipart(frames, flags=zmq.NOBLOCK)
            while (left := deadline - time.monotonic()) > 0:
                if await sock.poll(max(1, int(left * 1000)), zmq.POLLIN):
                    res = self._core.parse(await sock.recv_multipart(), rid, method)
                    if res is not None:
                        return res
            self._reset()
            raise self._core.no_reply(method, t, connected=True)

    async def close(self) -> None:
        self._reset()

    async def __aenter__(self) -> AsyncIWMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncIWMClient({self.endpoint!r}, calls={dict(self.calls)})"

    async def _ensure_info(self) -> None:
        if self._core.info is None:
            await self.health()

    async def health(self, timeout_s: float | None = None) -> dict[str, Any]:
        """The worker's description (variant, embed_dim, cond_dim, num_actions, ...); cached."""
        info = await self.call("health", {}, timeout_s)
        self._core.info = info
        return info

    @property
    def info(self) -> dict[str, Any] | None:
        """The cached health() reply (None until a call fetched it)."""
        return self._core.info

    async def encode_image(self, frame: Any, patches: bool = False,
                           timeout_s: float | None = None) -> EncodeResult:
        await self._ensure_info()
        params, single = self._core.encode_params(frame, patches)
        return self._core.encode_result(await self.call("encode", params, timeout_s), single)

    async def encode_dual(self, frame: Any, patches: bool = False,
                          timeout_s: float | None = None) -> DualEncodeResult:
        await self._ensure_info()
        params, single = self._core.encode_params(frame, patches)
        return self._core.encode_dual_result(
            await self.call("encode_dual", params, timeout_s), single)

    async def predict_next(self, z_cls: Any, aug_params: Any = None, action: int | Any = None,
                           patches: Any = None, timeout_s: float | None = None
                           ) -> PredictResult:
        await self._ensure_info()
        params, single = self._core.predict_params(z_cls, aug_params, action, patches)
        return self._core.predict_result(await self.call("predict", params, timeout_s), single)

    async def rollout(self, z_cls: Any, aug_seq: Any = None, action_seq: Any = None,
                      patches: Any = None, k: int | None = None,
                      timeout_s: float | None = None) -> RolloutResult:
        await self._ensure_info()
        params = self._core.rollout_params("rollout", z_cls, aug_seq, action_seq, patches, k,
                                           None)
        out = self._core.rollout_result(await self.call("rollout", params, timeout_s), True)
        assert isinstance(out, RolloutResult)
        return out

    async def rollout_batch(self, z_cls: Any, aug_seqs: Any = None, action_seqs: Any = None,
                            patches: Any = None, timeout_s: float | None = None
                            ) -> BatchRolloutResult:
        await self._ensure_info()
        batch = _candidates(aug_seqs, action_seqs)
        params = self._core.rollout_params("rollout_batch", z_cls, aug_seqs, action_seqs,
                                           patches, None, batch)
        out = self._core.rollout_result(await self.call("rollout", params, timeout_s), False)
        assert isinstance(out, BatchRolloutResult)
        return out
