"""The encoder worker's RPC endpoint: a ZeroMQ ROUTER that never crashes and never blocks.

A client (DEALER) sends ``wire.pack("iwm.rpc", {"kind": "rpc_request", "id": n, "method": m,
"params": {...}})``; the ROUTER sees ``[identity, topic, payload]``. Every request gets exactly
one reply ``[identity, topic, payload]`` with the request's id, ``ok`` and either a ``result``
map or an ``error`` string (see :mod:`iwm_bus.bus.rpc` for the method table). A request that
cannot be decoded is answered with ``ok=False`` and id ``-1`` when its id cannot be read;
every ``ok=False`` reply is counted in ``errors``. A request of another major wire version is
answered with the one line naming both versions; fields, and params of a method, that this
worker does not know are left out (counted in ``unknown``; the params listed in the result's
``ignored_params``), as the compatibility rule says (docs/wire.md). Replies are sent with
``NOBLOCK`` and
``ROUTER_MANDATORY``: a reply to a client that is gone, or whose queue is full, is dropped
and counted in ``replies_dropped`` instead of blocking the worker.

:class:`ModelService` holds the method bodies (health / encode / predict / rollout) on an
:class:`iwm_bus.model.IWM`; :class:`RPCServer` is the socket, the decoding and the replies.

    server = RPCServer(ctx, endpoints.rpc, ModelService(model, health_fn, mrr_fn, horizon_fn))
    server.handle_pending()        # after the poller says the socket is readable
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import torch
import zmq
from loguru import logger

from iwm_bus.bus import rpc, topics, transport, wire
from iwm_bus.errors import WireError, WireVersionError
from iwm_bus.logs import Throttle
from iwm_bus.model import IWM

#: most requests handled per ``handle_pending`` call, so frames are not starved
DEFAULT_BUDGET = 32


class RequestError(Exception):
    """A request that gets an error reply; ``req_id`` is -1 when the id could not be read."""

    def __init__(self, req_id: int, message: str) -> None:
        super().__init__(message)
        self.req_id = req_id


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


class ModelService:
    """The RPC methods on a model; each takes checked params and returns a result map.

    ``health_fn`` returns the worker's part of the health reply (frames, uptime_s, mode, ...);
    ``mrr_fn`` the running MRR of the stream (None before the first prediction);
    ``horizon_fn`` the measured running MRR per rollout horizon (NaN where not measured).
    """

    def __init__(self, model: IWM, health_fn: Callable[[], dict[str, Any]],
                 mrr_fn: Callable[[], float | None],
                 horizon_fn: Callable[[], np.ndarray],
                 others: dict[str, IWM] | None = None) -> None:
        self.model = model
        self.health_fn, self.mrr_fn, self.horizon_fn = health_fn, mrr_fn, horizon_fn
        self.others = others or {}  # a dual worker's second stream: {"semantic": model}
        cfg = model.config
        self.limits = {"embed_dim": model.embed_dim, "cond_dim": cfg.cond_dim,
                       "num_actions": cfg.num_actions, "num_patches": model.num_patches}

    def methods(self) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
        return {"health": self.health, "encode": self.encode, "encode_dual": self.encode_dual,
                "predict": self.predict, "rollout": self.rollout}

    def health(self, params: dict[str, Any]) -> dict[str, Any]:
        cfg = self.model.config
        return {"variant": cfg.variant, "encoder": cfg.encoder_name,
                "device": str(self.model.device), "precision": self.model.precision,
                **self.limits, **self.health_fn()}

    def encode(self, params: dict[str, Any]) -> dict[str, Any]:
        z_cls, patches = self.model.encode(params["frames"])  # (B, D), (B, N, D)
        out: dict[str, Any] = {"z_cls": _np(z_cls), "t_ns": time.time_ns(),
                               "mrr": self.mrr_fn()}
        if params["patches"]:
            out["patches"] = _np(patches)
        return out

    def encode_dual(self, params: dict[str, Any]) -> dict[str, Any]:
        """Both streams of a dual worker on the same frames, preprocessed once."""
        other = self.others.get("semantic")
        if other is None:
            raise ValueError("encode_dual needs a dual worker (iwm-launch --dual); this one "
                             "serves a single stream: use encode")
        x = self.model.preprocess(params["frames"])  # the dual pair takes one input
        out: dict[str, Any] = {"t_ns": time.time_ns()}
        for name, model in (("semantic", other), ("equivariant", self.model)):
            z_cls, patches = model.encode_input(x)
            out[f"z_cls_{name}"] = _np(z_cls)
            if params["patches"]:
                out[f"patches_{name}"] = _np(patches)
        return out

    def predict(self, params: dict[str, Any]) -> dict[str, Any]:
        pred = self.model.predict(params["z_cls"], params.get("patches"), params.get("cond"),
                                  params.get("action_id"))
        out = {"z_cls_pred": _np(pred.z_cls), "uncertainty": _np(pred.uncertainty)}
        if pred.patches is not None:
            out["patches_pred"] = _np(pred.patches)
        return out

    def rollout(self, params: dict[str, Any]) -> dict[str, Any]:
        roll = self.model.rollout(params["z_cls"], params.get("patches"),
                                  params.get("cond_seq"), params.get("action_seq"))
        steps = roll.z_cls_seq.shape[1]
        measured = np.asarray(self.horizon_fn(), dtype=np.float32)
        mrr_seq = np.full(steps, np.nan, dtype=np.float32)  # NaN: horizon not measured
        n = min(steps, measured.size)
        mrr_seq[:n] = measured[:n]
        out = {"z_cls_seq": _np(roll.z_cls_seq), "uncertainty_seq": _np(roll.uncertainty_seq),
               "mrr_seq": mrr_seq}
        if roll.patches_seq is not None:
            out["patches_last"] = _np(roll.patches_seq[:, -1])  # (B, N, D)
        return out


def _peek_id(body: list[bytes]) -> int:
    """Best effort: the int ``id`` of an undecodable request, else -1 (never raises)."""
    if len(body) != 2:
        return -1
    try:
        raw = msgpack.unpackb(body[1], raw=False, max_bin_len=wire.MAX_MESSAGE_BYTES,
                              max_str_len=1 << 20, max_array_len=65536, max_map_len=4096,
                              max_ext_len=0)
    except Exception:  # noqa: BLE001 - any bad bytes simply mean "id unknown"
        return -1
    req_id = raw.get("id") if isinstance(raw, dict) else None
    ok = isinstance(req_id, int) and not isinstance(req_id, bool) and -2**63 <= req_id < 2**63
    return req_id if ok else -1


class RPCServer:
    """The ROUTER socket: receive, decode, validate, run under inference mode, reply.

    ``connect=True`` (a remote worker): a DEALER connected to a gateway's DEALER instead
    (:mod:`workers.gateway`), which passes each request on as the same ``[identity, *body]``
    that the ROUTER would have received, and routes the reply back by that identity.
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, service: ModelService, *,
                 hwm: int = 1000, connect: bool = False,
                 secure: Callable[[zmq.Socket], None] | None = None) -> None:
        self.endpoint, self.service = endpoint, service
        self._methods = service.methods()
        self.sock = transport.new_socket(ctx, zmq.DEALER if connect else zmq.ROUTER, hwm,
                                         secure)
        if not connect:
            self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._inode: int | None = None
        try:
            if connect:
                self.sock.connect(endpoint)
            else:
                self._inode = transport.bind(self.sock, endpoint)
        except OSError:
            self.sock.close(linger=0)
            raise
        self.requests = 0
        self.errors = 0
        self.replies_dropped = 0
        self.unknown = wire.Unknowns()  # fields and params of newer clients, left out
        self._log = Throttle()

    def handle_pending(self, budget: int = DEFAULT_BUDGET) -> int:
        """Answer up to ``budget`` waiting requests without blocking; returns how many."""
        handled = 0
        while handled < budget:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self.handle(frames)
            handled += 1
        return handled

    def handle(self, frames: list[bytes]) -> None:
        """Answer one request ``[identity, *body]``."""
        self.requests += 1
        if len(frames) < 2:  # a DEALER peer can send anything: no identity, no request
            self.errors += 1
            self._log.warning("rpc-error", "rpc: dropped a message of {} frame(s) without a "
                              "request", len(frames))
            return
        identity, body = frames[0], frames[1:]
        try:
            req_id, method, params, ignored = self._decode(body)
            result = self._call(req_id, method, params)
        except RequestError as e:
            self.errors += 1
            self._log.warning("rpc-error", "rpc request {} failed: {}", e.req_id, e)
            self._reply(identity, {"id": e.req_id, "ok": False, "result": None,
                                   "error": str(e)})
            return
        if ignored:
            result = {**result, "ignored_params": ignored}
        self._reply(identity, {"id": req_id, "ok": True, "result": result, "error": None})

    def _decode(self, body: list[bytes]) -> tuple[int, str, dict[str, Any], list[str]]:
        """(id, method, checked params, the params this worker does not know)."""
        try:
            topic, msg = wire.unpack(body, unknown=self.unknown)
        except WireVersionError as e:
            raise RequestError(_peek_id(body), str(e)) from None
        except WireError as e:
            raise RequestError(_peek_id(body), f"malformed request: {e}") from None
        req_id = msg.get("id", -1)
        if topics.base_topic(topic) != topics.RPC or msg["kind"] != "rpc_request":
            raise RequestError(req_id, f"expected an rpc_request on {topics.RPC!r}, got a "
                               f"{msg['kind']} message on {topic!r}")
        method, params = msg["method"], msg["params"]
        ignored = sorted(set(params) - rpc.PARAMS.get(method, set(params)))
        if ignored:  # a newer client's optional params
            self.unknown.fields += 1
            self.unknown.last = f"{method} params {ignored}"
            params = {k: v for k, v in params.items() if k not in ignored}
        try:
            params = rpc.check_params(method, params, **self.service.limits)
        except (ValueError, TypeError) as e:
            raise RequestError(req_id, f"bad params for {method!r}: {e}") from None
        return req_id, method, params, ignored

    def _call(self, req_id: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
        try:
            with torch.inference_mode():
                return self._methods[method](params)
        except ValueError as e:  # the model's own checks (rpc.check_params should pre-empt)
            raise RequestError(req_id, f"{method}: {e}") from None
        except Exception as e:  # noqa: BLE001 - e.g. out of GPU memory: answer, log, go on
            logger.exception("rpc {} (id {}) failed", method, req_id)
            raise RequestError(req_id, f"{method} failed in the worker: "
                               f"{type(e).__name__}: {e}") from None

    def _reply(self, identity: bytes, reply: dict[str, Any]) -> None:
        try:
            frames = wire.pack(topics.RPC, {"kind": "rpc_reply", **reply})
        except WireError as e:  # e.g. a result over the message size limit
            self.errors += 1
            frames = wire.pack(topics.RPC, {"kind": "rpc_reply", "id": reply["id"], "ok": False,
                                            "result": None, "error": f"reply not sent: {e}"})
        try:
            self.sock.send_multipart([identity, *frames], flags=zmq.NOBLOCK)
        except zmq.Again:  # the client's queue is full
            self.replies_dropped += 1
        except zmq.ZMQError as e:  # EHOSTUNREACH: the client is gone (ROUTER_MANDATORY)
            self.replies_dropped += 1
            self._log.warning("rpc-drop", "rpc reply {} dropped: {}", reply["id"], e)

    def close(self) -> None:
        """Close the socket and remove the ipc file it bound."""
        self.sock.close(linger=0)
        transport.unbind_file(self.endpoint, self._inode)
        self._inode = None
