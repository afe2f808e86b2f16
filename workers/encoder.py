"""Encoder worker: ring frames -> latents, surprise and MRR on the bus, plus the RPC socket.

The worker subscribes to ``iwm.frame`` notices (capture), reads each frame a notice names
from the shared-memory FrameRing, encodes it, predicts it from the previous processed frame
and the action on its notice (the one way an action reaches the worker: the capture puts
the source's action, or the agent's latest ``agent.action``, on each notice), and publishes
``iwm.surprise``, ``iwm.mrr`` and ``iwm.latent`` once per processed seq, in seq order, and
``iwm.stats`` every ``stats_interval_s``. It serves health / encode / predict / rollout on a
ROUTER socket (:mod:`workers.rpc_server`). docs/worker.md describes the behaviour in full.

``launch.py`` starts it as a process with :func:`run_worker`; by hand (the capture must use
the same run dir and ring name)::

    python -m workers.encoder --run-dir /tmp/iwm-demo --ring iwm_demo --mode lossless
    IWM_MODEL_PATH=ckpt.pt IWM_DEVICE=cuda python -m workers.encoder --run-dir /tmp/iwm-demo \\
        --ring iwm_demo
    python -m workers.encoder --run-dir /tmp/iwm-demo --ring iwm_demo \\
        --encoder vit_tiny_patch16_224 --variant invariant          # untrained, CPU-sized
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
import zmq
from loguru import logger

from iwm_bus import __version__
from iwm_bus.bus import topics, wire
from iwm_bus.bus.link import Link
from iwm_bus.bus.link_frames import LinkFrameSubscriber
from iwm_bus.bus.ring import FrameRing, clock_ns, env_ring_names
from iwm_bus.bus.security import ClientKeys
from iwm_bus.bus.transport import Endpoints, Publisher, Subscriber
from iwm_bus.config import BusConfig, WorkerConfig
from iwm_bus.errors import CheckpointError, RingError
from iwm_bus.logs import Throttle
from iwm_bus.model import IWM, create_iwm_model, load_iwm, set_precision
from iwm_bus.provenance import checkpoint_summary
from workers.entry import StopFlag, stop_on_signals
from workers.frame_cursor import FrameCursor, NextFrame
from workers.model_stream import ModelStream, StreamResult, finite, shared_input, step_batch
from workers.ring_reader import InlineFrames, RingReader
from workers.rpc_server import DEFAULT_BUDGET as DEFAULT_RPC_BUDGET
from workers.rpc_server import ModelService, RPCServer
from workers.stream import (
    HORIZON,
    HORIZON_EVERY,
    Action,
    ActionBook,
    StreamStats,
    rgb,
)

#: torch seed of the worker process (untrained models are built with it too)
SEED = 0
#: pause after binding before the first iwm.stats, so subscriptions have propagated
SETTLE_S = 0.2
#: iwm.ready / iwm.stats interval until the first frame notice (a late capture hears soon)
READY_INTERVAL_S = 0.25
#: longest idle poll (ms); bounds the reaction to a stop request
POLL_MS = 50
#: most messages taken from one socket per loop turn
DRAIN_BUDGET = 1000


# ----------------------------------------------------------------------------- model


def load_model(cfg: WorkerConfig, path: Path | None = None, variant: str | None = None,
               seed: int = SEED) -> IWM:
    """The checkpoint at ``path`` (default: ``cfg.checkpoint()``), or an untrained (seeded)
    model with a warning, set to ``cfg.precision``.

    Raises FileNotFoundError / CheckpointError for a missing or bad checkpoint and
    ValueError for a bad encoder / size override.
    """
    path = path if path is not None else cfg.checkpoint()
    variant = variant if variant is not None else cfg.variant
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist; fix --model / "
                                    "IWM_MODEL_PATH, or leave it unset for the shipped model")
        model = load_iwm(path, cfg.device, compile=cfg.compile, variant=variant)
        mc = model.config
        if cfg.encoder not in (None, mc.encoder_name) or cfg.img_size not in (None, mc.img_size):
            logger.warning("checkpoint {} is {} / {} at {} px; the configured encoder and "
                           "size are ignored", path, mc.variant, mc.encoder_name, mc.img_size)
        return set_precision(model, cfg.precision)
    overrides: dict[str, Any] = {"num_actions": cfg.num_actions}
    if cfg.encoder:
        overrides["encoder_name"] = cfg.encoder
    if cfg.img_size:
        overrides["img_size"] = cfg.img_size
    variant = variant or "core"
    model = create_iwm_model(variant, device=cfg.device, seed=seed, compile=cfg.compile,
                             **overrides)
    logger.warning("untrained weights (--untrained, or no shipped model in this install): "
                   "latents, surprise and MRR come from an UNTRAINED {} model ({}, seed {}); "
                   "use them to test the plumbing only", variant,
                   model.config.encoder_name, seed)
    return set_precision(model, cfg.precision)


def load_models(cfg: WorkerConfig) -> list[tuple[str, IWM]]:
    """The worker's streams as (name, model), the one published on the plain topics first:
    ``[("core", model)]``, or with ``cfg.dual`` ``[("equivariant", ...), ("semantic", ...)]``.

    Raises as :func:`load_model`, and ValueError when a dual pair cannot share one
    preprocessed input (another input size or pixel normalisation).
    """
    if not cfg.dual:
        return [(cfg.stream or "core", load_model(cfg))]
    eq = load_model(cfg, cfg.checkpoint(), "equivariant" if cfg.untrained else None)
    sem = load_model(cfg, cfg.semantic_checkpoint(), "invariant" if cfg.untrained else None,
                     seed=SEED + 1)
    check_pair(eq, sem)
    return [("equivariant", eq), ("semantic", sem)]


def stream_horizons(cfg: WorkerConfig, n: int) -> list[int]:
    """The rollout horizons each of ``n`` streams measures: all of them (``HORIZON``) for the
    primary stream, whose model answers RPC ``rollout`` with them as its confidence; only the
    per-frame MRR (1) for the others and for a named stream's worker, which serves no RPC.
    Their rollout chains would cost a second predictor batch row on half the frames for
    numbers nothing reads (a dual worker on this CPU: 1.8 ms a frame at fp32, 2.2 at int8)."""
    primary = 1 if cfg.stream else HORIZON
    return [primary, *[1] * (n - 1)]


def check_pair(eq: IWM, sem: IWM) -> None:
    """A dual pair must take one input and one action (the worker preprocesses each frame
    once and gives both models the same action); ValueError naming the difference."""
    if not eq.same_input(sem):
        raise ValueError(
            f"the dual streams need one input: the equivariant model takes "
            f"{eq.config.img_size} px on {eq.device}, the semantic one "
            f"{sem.config.img_size} px on {sem.device} (or another pixel normalisation); "
            "train both at one size")
    for f in ("cond_dim", "num_actions"):
        a, b = getattr(eq.config, f), getattr(sem.config, f)
        if a != b:
            raise ValueError(f"the dual streams need one action format: the equivariant "
                             f"model has {f}={a}, the semantic one {f}={b}")
    if eq.config.variant == "invariant" or sem.config.variant == "equivariant":
        logger.warning("dual streams: the equivariant stream's model is {} and the semantic "
                       "stream's {}: swapped --model and --semantic-model?",
                       eq.config.variant, sem.config.variant)


# ----------------------------------------------------------------------------- worker


class EncoderWorker:
    """The worker's logic; binds its sockets on construction, runs in :meth:`serve`.

    ``model``: a prebuilt IWM (tests), else :func:`load_models` (``cfg``); ``models``: prebuilt
    ``(name, IWM)`` streams instead (the first on the plain topics). ``link``: a remote
    worker, which connects every socket to that gateway (``endpoints`` are then
    ``link.worker_endpoints()``), with CURVE when the link has keys, and takes each frame
    from its notice instead of the ring. ``ring_name``: several names (or ``cfg.envs`` > 1,
    :func:`iwm_bus.bus.ring.env_ring_names` of the one given) make it a multi-stream worker:
    one capture stream (game) a ring, told apart by the ``env`` on each notice; each keeps
    its own cursor, notices and model state, and their ready frames are processed as one
    batch (docs/worker.md, "Many games"). Not thread-safe:
    construct, serve and close from one thread; stop it from another with the ``stop``
    event given to :meth:`serve` (or :meth:`close` after serve returned).
    """

    def __init__(self, cfg: WorkerConfig, endpoints: Endpoints, ring_name: str | Sequence[str],
                 model: IWM | None = None, *, models: list[tuple[str, IWM]] | None = None,
                 restarts: int = 0, link: Link | None = None) -> None:
        self.cfg, self.endpoints, self.restarts, self.link = cfg, endpoints, restarts, link
        self._keys = ClientKeys.load(link.keys) if link is not None and link.keys else None
        if models is None:
            models = [("core", model)] if model is not None else load_models(cfg)
        rings = env_ring_names(ring_name, cfg.envs) if isinstance(ring_name, str) \
            else list(ring_name)
        if len(rings) > 1 and link is not None:
            raise ValueError("a remote worker serves one capture stream; run one a game")
        horizons = stream_horizons(cfg, len(models))
        # per capture stream (env), the model streams' state; env 0's are ``streams``
        self.env_streams = [[ModelStream(m.eval(), name, cfg.mrr_bank, h)
                             for (name, m), h in zip(models, horizons, strict=True)]
                            for _ in rings]
        self.streams = self.env_streams[0]
        self.model = self.streams[0].model  # the primary stream's: RPC, health, actions
        mc = self.model.config
        self._log = Throttle()
        self.actions = ActionBook(mc.cond_dim, mc.num_actions, self._log)
        self.stats = StreamStats()
        self._pinned: torch.Tensor | None = None  # the reader's buffer, pinned on CUDA
        self.reader: RingReader | InlineFrames = (
            InlineFrames() if link is not None
            else RingReader(rings[0], "worker", buffer=self._staging))
        # each further stream's frames are fresh copies (a batch holds one of each)
        readers = [self.reader, *(RingReader(name, f"worker env {i}")
                                  for i, name in enumerate(rings[1:], 1))]
        self.cursors = [FrameCursor(cfg.mode, restarts, r, self.stats,
                                    partial(self._restart_env, i))
                        for i, r in enumerate(readers)]
        self.bad_envs = 0  # notices naming a stream this worker does not serve
        self._turn = 0  # the stream a batch starts from (round robin when over max_batch)
        prov = self.model.provenance
        self._checkpoint_name = prov.get("name", Path(prov["path"]).name) if prov else None
        self._codec_seen: str | None = None  # a remote worker: the codec of its frames
        self._decode_tick = (0, 0)  # and its decoder's frames and time at the last tick
        self._stop = threading.Event()
        self._t_start = time.monotonic()
        self._next_stats = 0.0
        self._closed = False
        self._open_sockets()
        logger.info("encoder worker ready: {} on {}, mode {}, publishing on {}, rpc {}",
                    " + ".join(f"{st.name} stream ({st.variant} {st.model.config.encoder_name})"
                               for st in self.streams) if len(self.streams) > 1
                    else f"{mc.variant} {mc.encoder_name}", self.model.device, cfg.mode,
                    endpoints.worker, endpoints.rpc)

    def _open_sockets(self) -> None:
        eps = self.endpoints
        self._ctx = zmq.Context()
        self._pub: Publisher | None = None
        self._rpc: RPCServer | None = None
        self._frames_sub: Subscriber | None = None
        remote = self.link is not None
        secure = self._keys.secure if self._keys is not None else None
        try:
            self._pub = Publisher(eps.worker, ctx=self._ctx, connect=remote, secure=secure)
            primary = self.streams[0]
            service = ModelService(self.model, self._health, lambda: finite(primary.mrr.value),
                                   primary.horizon.values,
                                   {st.name: st.model for st in self.streams[1:]})
            if not self.cfg.stream:  # a named stream's worker leaves RPC to the primary one
                self._rpc = RPCServer(self._ctx, eps.rpc, service, connect=remote,
                                      secure=secure)
            # a remote worker's frames come with their pixels, maybe compressed: decoded
            # and checked on the way in (iwm_bus.bus.link_frames)
            sub = LinkFrameSubscriber if remote else Subscriber
            captures = [eps.capture] if remote else eps.env_captures(len(self.cursors))
            self._frames_sub = sub(captures, [topics.FRAME], ctx=self._ctx, secure=secure)
        except BaseException:
            self._close_sockets()
            raise
        self._poller = zmq.Poller()
        for part in (self._frames_sub, self._rpc):
            if part is not None:
                self._poller.register(part.sock, zmq.POLLIN)

    # -- main loop

    def serve(self, stop: threading.Event | StopFlag | None = None,
              max_frames: int | None = None) -> None:
        """Run until ``stop`` is set (or ``max_frames`` frames were processed)."""
        stop = stop if stop is not None else self._stop
        first = self.stats.frames
        if stop.wait(SETTLE_S):
            return
        self._publish_stats()
        while not (stop.is_set() or self._stop.is_set()):
            self._poll(0 if self._has_work() else self._idle_ms())
            done = self._step()
            self._maybe_stats()
            if done and max_frames is not None and self.stats.frames - first >= max_frames:
                break
        self._publish_stats()

    def _poll(self, timeout_ms: int) -> None:
        assert self._frames_sub
        events = dict(self._poller.poll(timeout_ms))
        if self._frames_sub.sock in events:
            self._frames_sub.drain(lambda _t, m: self._on_frame(m), DRAIN_BUDGET)
        if self._rpc is not None and self._rpc.sock in events:
            # frames first: while one waits, answer one request per turn (bounded latency)
            self._rpc.handle_pending(1 if self._has_work() else DEFAULT_RPC_BUDGET)

    def _idle_ms(self) -> int:
        now = time.monotonic()
        wait = self._next_stats - now
        for c in self.cursors:
            w = c.wait_s(now)
            if w is not None:
                wait = min(wait, w)
        return max(0, min(POLL_MS, int(wait * 1000)))

    def _has_work(self) -> bool:
        """A frame a notice named is still to be processed, in any stream."""
        return any(c.has_work() for c in self.cursors)

    # -- frame notices

    def _on_frame(self, msg: dict[str, Any]) -> None:
        """A frame notice, to its stream's cursor (``env``; absent: stream 0). A notice
        naming a stream this worker does not serve is counted (``bad_envs``) and ignored:
        it cannot touch another stream's cursor."""
        env = msg.get("env")
        env = 0 if env is None else env
        if not 0 <= env < len(self.cursors):
            self.bad_envs += 1
            self._log.warning("bad-env", "ignored a frame notice of env {} (#{}): this worker "
                              "serves envs 0..{}", env, self.bad_envs, len(self.cursors) - 1)
            return
        if self.cursors[env].notice(msg) and isinstance(self.reader, InlineFrames):
            self._link_codec(msg)

    def _link_codec(self, msg: dict[str, Any]) -> None:
        """A remote worker says once how its frames travel, and again when that changes
        (another gateway's codec)."""
        codec = (msg.get("codec") or "raw") if msg.get("pixels") is not None else None
        if codec is not None and codec != self._codec_seen:
            self._codec_seen = codec
            if msg.get("lossy"):
                logger.warning("remote worker: frames arrive as {}, LOSSY: latents and "
                               "surprise are of the decoded frames, not the captured ones",
                               codec)
            else:
                logger.info("remote worker: frames arrive as {} (lossless)", codec)

    def _restart_env(self, env: int) -> None:
        """Stream ``env``'s capture restarted: forget its frame-related state (only its)."""
        for st in self.env_streams[env]:
            st.clear()

    # -- frame processing

    def _step(self) -> bool:
        """Process the next frame of each stream with one ready, up to ``max_batch`` (one
        frame with one stream); True when one was published."""
        if len(self.cursors) == 1:
            got = self.cursors[0].next_frame() if self.cursors[0].has_work() else None
            if got is None:
                return False
            seq, pixels, t_capture, notice_action = got
            self._process(seq, self._frame(pixels), t_capture, notice_action)
            return True
        n = len(self.cursors)
        order = [(self._turn + i) % n for i in range(n)]
        batch: list[tuple[int, NextFrame]] = []
        for env in order:
            if len(batch) == self.cfg.max_batch:
                break
            if self.cursors[env].has_work():
                got = self.cursors[env].next_frame()
                if got is not None:
                    batch.append((env, got))
        if not batch:
            return False
        self._turn = (batch[-1][0] + 1) % n  # the streams left out go first next time
        self._process_batch(batch)
        return True

    def _process_batch(self, batch: list[tuple[int, NextFrame]]) -> None:
        """One frame of each of several streams: per frame size, one encoder call and one
        predictor call per model (:func:`workers.model_stream.step_batch`); then each
        frame's messages, carrying its stream's ``env``, in the batch's order."""
        frames = [rgb(px) for _, (_, px, _, _) in batch]
        actions = [self._action(a) for _, (_, _, _, a) in batch]
        results: list[list[StreamResult]] = [[] for _ in batch]
        for shape in dict.fromkeys(f.shape for f in frames):  # per size, in batch order
            idx = [i for i, f in enumerate(frames) if f.shape == shape]
            stacked = np.stack([frames[i] for i in idx])  # (B, H, W, 3)
            for m in range(len(self.streams)):
                got = step_batch([self.env_streams[batch[i][0]][m] for i in idx],
                                 [batch[i][1][0] for i in idx], stacked,
                                 [actions[i] for i in idx])
                for i, r in zip(idx, got, strict=True):
                    results[i].append(r)
        for (env, (seq, _, t_capture, _)), action, res in zip(batch, actions, results,
                                                              strict=True):
            self._publish(seq, t_capture, action, res, env)

    def _staging(self, nbytes: int) -> np.ndarray:
        """The reader's reusable frame buffer: pinned on CUDA (a true async H2D copy)."""
        if self.model.device.type == "cuda":
            self._pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            return self._pinned.numpy()
        return np.empty(nbytes, np.uint8)

    def _frame(self, pixels: np.ndarray) -> np.ndarray | torch.Tensor:
        """The frame as the models take it: (H, W, 3), a pinned tensor when read into the
        pinned buffer (a local worker on CUDA: :meth:`_staging`)."""
        if self._pinned is not None:
            return rgb(self._pinned[: pixels.size].view(pixels.shape))
        return rgb(pixels)

    def _action(self, notice_action: dict[str, Any] | None) -> Action:
        """The checked action on a frame's notice; none when there is none (or no notice,
        or a bad action: counted)."""
        action = None
        if notice_action is not None:
            action = self.actions.parse(notice_action.get("vector"),
                                        notice_action.get("action_id"), topics.FRAME)
        return action if action is not None else self.actions.none

    def _process(self, seq: int, frame: Any, t_capture: int,
                 notice_action: dict[str, Any] | None) -> None:
        action = self._action(notice_action)
        x = shared_input([st.model for st in self.streams], frame) if len(self.streams) > 1 \
            else None  # one preprocessing for all streams
        results = [st.step(seq, frame, x, action) for st in self.streams]
        self._publish(seq, t_capture, action, results)

    def _publish(self, seq: int, t_capture: int, action: Action,
                 results: list[StreamResult], env: int | None = None) -> None:
        """Each stream's three messages, the latent last: a subscriber holds the frame's
        surprise and MRR when its latent arrives (the bridge updates the state once per
        frame). The primary stream goes on the plain topics, the others on
        ``<topic>.<stream name>`` and before it, so that a bridge woken by the plain latent
        already holds the other streams' numbers of the same frame. ``env``: the capture
        stream of a multi-stream worker, on every message (absent with one stream)."""
        assert self._pub is not None
        t_pub = clock_ns()
        for i in reversed(range(len(self.streams))):
            st, r = self.streams[i], results[i]
            suffix = "" if i == 0 and not self.cfg.stream else "." + st.name
            base = {"seq": seq, "t_capture_ns": t_capture, "t_publish_ns": t_pub,
                    "variant": st.variant, **({"env": env} if env is not None else {})}
            patches = r.patches.astype(np.float16) if self.cfg.publish_patches else None
            self._pub.send(topics.SURPRISE + suffix,
                           {**base, "surprise": r.surprise, "surprise_z": r.surprise_z,
                            "pred_seq": r.pred_seq, "action": action.wire})
            self._pub.send(topics.MRR + suffix, {**base, "rr": r.rr, "mrr": r.mrr, "k": r.k})
            self._pub.send(topics.LATENT + suffix, {**base, "z_cls": r.z_cls, "patches": patches})
        self.stats.frame(t_pub - t_capture)

    # -- stats and health

    def _maybe_stats(self) -> None:
        if time.monotonic() >= self._next_stats:
            self._publish_stats()

    def stats_values(self) -> dict[str, Any]:
        """The counters as published in ``iwm.stats`` (the window part resets)."""
        assert self._frames_sub
        s, rpc = self.stats, self._rpc
        return {"ready": 1, **s.take_window(), "frames": s.frames, "notices": s.notices,
                "dropped_overwritten": s.dropped_overwritten, "torn": s.torn,
                "skipped": s.skipped,
                "decode_errors": self._frames_sub.decode_errors,
                **self._unknown_counts(),
                "notice_gaps": self._frames_sub.gaps, "actions": self.actions.received,
                "bad_actions": self.actions.bad, "action_ids_ignored": self.actions.ids_ignored,
                "rpc_requests": rpc.requests if rpc else 0, "rpc_errors": rpc.errors if rpc else 0,
                "rpc_replies_dropped": rpc.replies_dropped if rpc else 0,
                "stream_restarts": s.stream_restarts,
                "attach_failures": sum(c.reader.attach_failures for c in self.cursors),
                "restarts": self.restarts,
                "bad_notices": sum(c.reader.invalid for c in self.cursors) + self.bad_envs,
                **({"envs": len(self.cursors)} if len(self.cursors) > 1 else {}),
                **({"remote": 1, "frames_without_pixels": self.reader.missing,
                    **self._link_values()}
                   if isinstance(self.reader, InlineFrames) else {}),
                **self.streams[0].stats(), "mode": self.cfg.mode,
                "checkpoint": self._checkpoint_name,
                **({"streams": {st.name: st.stats() for st in self.streams}}
                   if len(self.streams) > 1 else {})}

    def _link_values(self) -> dict[str, Any]:
        """A remote worker's frames on the link: codec (of the last frame), ``lossy`` (1
        when it is a lossy codec), frames decoded, of them lossy, bad pixel parts dropped,
        and the mean decode time of the frames since the last tick (``decode_ms``)."""
        assert isinstance(self._frames_sub, LinkFrameSubscriber)
        dec = self._frames_sub.decoder
        frames0, ns0 = self._decode_tick
        self._decode_tick = (dec.frames, dec.decode_ns)
        n = dec.frames - frames0
        return {**dec.stats(),
                "decode_ms": round((dec.decode_ns - ns0) / n / 1e6, 3) if n else None}

    def _unknown_counts(self) -> dict[str, int]:
        """What newer peers sent that this worker passed over (docs/wire.md), and messages
        of another major version it refused: notices and actions, and RPC requests."""
        assert self._frames_sub
        parts = [self._frames_sub.unknown] + ([self._rpc.unknown] if self._rpc else [])
        return {"unknown_fields": sum(u.fields for u in parts),
                "unknown_kinds": sum(u.kinds for u in parts),
                "other_major": self._frames_sub.other_major}

    def _publish_stats(self) -> None:
        assert self._pub is not None
        t_ns = clock_ns()
        self._pub.send(topics.READY, {"t_ns": t_ns, "notices": self.stats.notices,
                                      "restarts": self.restarts, "stream": self.cfg.stream})
        self._pub.send(topics.STATS, {"t_ns": t_ns, "source": "worker",
                                      "values": self.stats_values()})
        interval = self.cfg.stats_interval_s
        if all(c.newest is None for c in self.cursors):
            interval = min(interval, READY_INTERVAL_S)
        self._next_stats = time.monotonic() + interval

    def _health(self) -> dict[str, Any]:
        # each checkpoint as a flat summary (name, step, recipe, eval numbers, config): the
        # whole provenance of a stream nests deeper than the wire carries
        prov = self.model.provenance  # path, training data, eval summary (None: random init)
        out = {"trained": prov is not None, "model_path": prov["path"] if prov else None,
               "checkpoint": checkpoint_summary(prov), "frames": self.stats.frames,
               "uptime_s": time.monotonic() - self._t_start, "mode": self.cfg.mode,
               "version": __version__, "wire": wire.version_text(), "ready": True,
               "abstraction_index": self.streams[0].abstraction_index}
        if len(self.streams) > 1:
            out["streams"] = {st.name: {"variant": st.variant,
                                        "abstraction_index": st.abstraction_index,
                                        "checkpoint": checkpoint_summary(st.model.provenance)}
                              for st in self.streams}
        if isinstance(self._frames_sub, LinkFrameSubscriber):  # a remote worker: its link
            dec = self._frames_sub.decoder
            out["link"] = {"codec": dec.codec, "lossy": bool(dec.lossy), "frames": dec.frames,
                           "lossy_frames": dec.lossy_frames, "bad_pixels": dec.bad}
        return out

    # -- lifetime

    def _close_sockets(self) -> None:
        for part in (self._frames_sub, self._rpc, self._pub):
            if part is not None:
                part.close()  # the publisher and RPC server remove the ipc files they bound
        self._ctx.term()

    def close(self) -> None:
        """Stop serving, close sockets (their ipc files go with them) and the ring."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        for c in self.cursors:
            c.reader.close()
        self._close_sockets()

    def __enter__(self) -> EncoderWorker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# ----------------------------------------------------------------------------- process


def _num_threads(device: str, requested: int = 0) -> int:
    if requested:
        return requested
    if device.startswith("cuda"):
        return 2  # the GPU does the work; keep the CPU for capture
    # leave a core for the capture (and the game): on a small machine, torch's OpenMP threads
    # competing with capture for every core made a ViT-Ti frame take ~2 s instead of ~30 ms
    return max(1, min(len(os.sched_getaffinity(0)) - 1, 8))


def run_worker(cfg: WorkerConfig, endpoints: Endpoints, ring_name: str | Sequence[str], *,
               restarts: int = 0, takeover: Any = None, link: Link | None = None) -> int:
    """Process entry (spawn-safe): serve until SIGTERM / SIGINT; returns the exit code.

    ``takeover`` (a shared integer, e.g. ``multiprocessing.Value("i", -1)``) makes this a
    warm **standby**: it loads and warms up the model, then waits, binding nothing, until
    the launcher stores the restart count there (the serving worker died) and serves from
    then on: a worker takes over in milliseconds instead of a process start, torch import
    and model load. ``link``: a remote worker of that gateway (:class:`EncoderWorker`).

    0 clean stop; 1 crashed (logged); 2 model or keys could not be loaded (nothing was
    bound); 3 a socket could not be bound.
    """
    stop = StopFlag()  # set by the signal handler without taking a lock
    with stop_on_signals(stop, "encoder worker"):
        return _run_worker(cfg, endpoints, ring_name, restarts, stop, takeover, link)


def _warm_up_all(models: list[tuple[str, IWM]], ring_name: str | Sequence[str],
                 cfg: WorkerConfig) -> None:
    first = ring_name if isinstance(ring_name, str) else ring_name[0]
    shape = _ring_frame_shape(env_ring_names(first, cfg.envs)[0]
                              if isinstance(ring_name, str) else first)
    for (name, model), horizon in zip(models, stream_horizons(cfg, len(models)), strict=True):
        _warm_up(model, name, shape or (model.config.img_size, model.config.img_size, 3),
                 cfg.mrr_bank, horizon)


def _ring_frame_shape(ring_name: str) -> tuple[int, ...] | None:
    """The shape of the capture's newest frame, or None (no ring yet, or a remote worker)."""
    try:
        ring = FrameRing.attach(ring_name)
    except RingError:
        return None
    try:
        frame = ring.read(ring.latest_seq)
        return None if frame is None else (*frame.shape[:2], 3)  # RGB, as the worker reads it
    finally:
        ring.close()


def _warm_up(model: IWM, name: str, shape: tuple[int, ...], mrr_bank: int,
             horizon: int = HORIZON) -> None:
    """Run the worker's own per-frame step on frames of the capture's size until rollout
    chains have started and been advanced, so that a standby's first frame costs what later ones do. On
    CUDA each input shape (the frame's size; the prediction with and without chains) is a CUDA
    graph captured on first use; a standby warmed up with one encode at the model's input
    size and one single prediction was measured at 3.5 s from SIGKILL to surprise on an
    H200, against 0.4 s on CPU, where there are no graphs."""
    stream = ModelStream(model, name, mrr_bank, horizon)  # a throwaway: the serving one
    # starts clean; horizon 1 (no rollout chains) warms the single prediction alone
    cond = np.zeros(model.config.cond_dim, np.float32)
    action = Action(cond, 0 if model.config.num_actions else -1)
    rng = np.random.default_rng(0)
    for seq in range(HORIZON_EVERY + HORIZON + 1):
        stream.step(seq, rng.integers(0, 256, shape, dtype=np.uint8), None, action)


def _run_worker(cfg: WorkerConfig, endpoints: Endpoints, ring_name: str | Sequence[str],
                restarts: int,
                stop: StopFlag, takeover: Any = None, link: Link | None = None) -> int:
    try:
        try:
            if link is not None and link.keys is not None:
                ClientKeys.load(link.keys)
        except (FileNotFoundError, ValueError) as e:
            logger.error("encoder worker cannot load its CURVE keys: {}", e)
            return 2
        try:
            models = load_models(cfg)
        except (FileNotFoundError, CheckpointError, ValueError) as e:
            logger.error("encoder worker cannot load its model: {}", e)
            return 2
        torch.manual_seed(SEED)
        torch.set_num_threads(_num_threads(cfg.device, cfg.threads))
        if takeover is not None:
            _warm_up_all(models, ring_name, cfg)
            logger.debug("standby worker ready")
            while takeover.value < 0:  # a dead launcher stops it (workers.entry.exit_with)
                if stop.wait(0.02):
                    return 0
            restarts = takeover.value
            logger.configure(extra={"proc": "worker"})  # its log lines are the worker's now
            logger.info("standby worker taking over (restart #{})", restarts)
        try:
            worker = EncoderWorker(cfg, endpoints, ring_name, models=models, restarts=restarts,
                                   link=link)
        except OSError as e:
            logger.error("encoder worker cannot bind its sockets: {}", e)
            return 3
        with worker:
            worker.serve(stop)
        logger.info("encoder worker stopped after {} frames", worker.stats.frames)
        return 0
    except Exception:
        logger.exception("encoder worker crashed")
        return 1


def main(argv: list[str] | None = None) -> int:
    """Command line for running a worker by hand (see the module docstring): iwm-launch's
    worker and bus flags (the same field metadata, ``iwm_bus.config.add_flags``) and its
    --mode, plus the ring's name."""
    from iwm_bus.config import MODE_FLAG, ConfigError, add_flags, flag_error, flag_values

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ring", required=True, help="shared-memory ring name the capture uses")
    ap.add_argument(MODE_FLAG["flag"], help=MODE_FLAG["help"], **MODE_FLAG["argparse"])
    bus_flags, worker_flags = add_flags(ap, BusConfig), add_flags(ap, WorkerConfig)
    ap.add_argument("--publish-patches", dest="patches", action="store_true", default=None,
                    help=argparse.SUPPRESS)  # this command's former name of --patches
    args = ap.parse_args(argv)
    try:
        bus = BusConfig.from_env(**flag_values(args, bus_flags))
        cfg = WorkerConfig.from_env(mode=args.mode, **flag_values(args, worker_flags))
    except ConfigError as e:
        ap.error(str(flag_error(e, args, [*bus_flags, *worker_flags])))
    except ValueError as e:
        ap.error(str(e))
    return run_worker(cfg, bus.endpoints(), args.ring)

if __name__ == "__main__":
    sys.exit(main())
