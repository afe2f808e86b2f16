"""``BeingState``: what the agent knows about the world from the vision sidecar.

The field names are the seed guide's (``vision_core_latent``, ``vision_prediction_surprise``,
``vision_mrr`` ...), so code written against the seed keeps working. A ``VisionBridge`` keeps
one BeingState current from the bus and hands out copies (``read_latest``); code that calls
the RPC client itself can fill one by hand, as in the seed::

    state = BeingState()
    state.update_latent(result.z_cls, t_capture_ns=result.t_ns)

Units. Latents are float32 ``(D,)`` arrays (read-only when they came off the bus; copy before
editing in place). ``vision_prediction_surprise`` is :func:`iwm_bus.metrics.surprise` (RMS
difference of layer-normalised latents, in ``[0, 2]``, ~1.41 = unrelated). ``vision_mrr`` is the
worker's running mean reciprocal rank in ``(0, 1]``. A metric that is not known yet (no frame,
first frame, or right after a gap) is ``None``, not 0: ``None`` means "no evidence".

Clocks. ``t_capture_ns`` / ``t_publish_ns`` are stamped by the sidecar with the bus clock
(``iwm_bus.bus.ring.clock_ns``, the wall clock); ``vision_core_timestamp`` is the capture time in
seconds on it (comparable with ``time.time()``). Receive times ``t_*received_ns`` are this
process's ``time.monotonic_ns()``, so ages (``age_ms``: how long ago the data arrived) never
jump with the wall clock; ``latency_ms`` compares the capture stamp with the bus clock at
receipt (meaningful on one machine, or with synchronised clocks).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from iwm_bus.bus.ring import clock_ns

__all__ = ["BeingState"]


def _now_ns() -> int:
    return time.monotonic_ns()


@dataclass
class BeingState:
    """The agent's vision state; the seed's fields plus sequence numbers and receive times."""

    # z_cls (D,) of the newest frame the worker encoded (plain topic iwm.latent)
    vision_core_latent: np.ndarray | None = None
    # z_cls (D,) of the frame before it (the one the current surprise was predicted from)
    vision_core_latent_prev: np.ndarray | None = None
    # capture time of vision_core_latent, seconds on the wall clock (comparable with time.time())
    vision_core_timestamp: float | None = None
    # surprise of the newest frame that had a prediction (None: none yet / after a gap)
    vision_prediction_surprise: float | None = None
    # the same frame's surprise standardised against the stream's recent errors, per patch
    # (iwm_bus.metrics.SurpriseZ; None while the worker warms up, or from an older worker)
    vision_surprise_z: float | None = None
    # running mean reciprocal rank of the worker's predictions (None: none yet)
    vision_mrr: float | None = None
    # latent of the invariant (semantic, for the LLM) stream, Phase 2 (a dual worker's
    # iwm.latent.semantic)
    vision_semantic: np.ndarray | None = None
    # latent of the equivariant (control) stream, Phase 2 (a dual worker's plain iwm.latent)
    vision_equivariant: np.ndarray | None = None
    # the semantic stream's surprise, standardised surprise and running MRR, and the frame
    # seq they are of (iwm.surprise.semantic / iwm.mrr.semantic; None without a dual worker)
    vision_semantic_surprise: float | None = None
    vision_semantic_surprise_z: float | None = None
    vision_semantic_mrr: float | None = None
    semantic_seq: int | None = None
    # patch latents (N, D) of the newest frame, when the worker publishes them
    vision_patches: np.ndarray | None = None
    # reciprocal rank of the newest frame alone (None: no prediction for it)
    vision_rr: float | None = None
    # frame seq of vision_core_latent; of the newest surprise; of the newest MRR message
    frame_seq: int | None = None
    surprise_seq: int | None = None
    mrr_seq: int | None = None
    # number of bank candidates the MRR was ranked against (K)
    mrr_k: int | None = None
    # model variant that produced vision_core_latent
    variant: str | None = None
    # capture / publish time of the newest latent (bus clock ns, see Clocks)
    t_capture_ns: int | None = None
    t_publish_ns: int | None = None
    # when this process received the newest latent / surprise / mrr (monotonic ns)
    t_received_ns: int | None = None
    # bus clock (wall) when the newest latent was received, for latency_ms
    t_received_bus_ns: int | None = None
    t_surprise_received_ns: int | None = None
    t_mrr_received_ns: int | None = None
    # latents received since the state was created
    updates: int = 0
    # free-form extras an agent wants to carry along (not touched by the bridge)
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ updates

    def update_latent(self, z_cls: Any, *, seq: int | None = None,
                      t_capture_ns: int | None = None, t_publish_ns: int | None = None,
                      patches: Any = None, variant: str | None = None,
                      t_received_ns: int | None = None,
                      t_received_bus_ns: int | None = None) -> None:
        """Shift the current latent to ``_prev`` and store a new one (the seed's perception hook)."""
        z = np.asarray(z_cls, dtype=np.float32)
        if z.ndim == 2 and z.shape[0] == 1:
            z = z[0]
        if z.ndim != 1 or z.size == 0:
            raise ValueError(f"z_cls must be a (D,) latent, got shape {z.shape}")
        self.vision_core_latent_prev = self.vision_core_latent
        self.vision_core_latent = z
        self.vision_patches = None if patches is None else np.asarray(patches)
        self.frame_seq = seq
        self.t_capture_ns = t_capture_ns
        self.t_publish_ns = t_publish_ns
        self.vision_core_timestamp = None if t_capture_ns is None else t_capture_ns / 1e9
        self.variant = variant if variant is not None else self.variant
        self.t_received_ns = _now_ns() if t_received_ns is None else t_received_ns
        self.t_received_bus_ns = clock_ns() if t_received_bus_ns is None else t_received_bus_ns
        self.updates += 1

    # ------------------------------------------------------------------ ages

    def age_ms(self, now_ns: int | None = None) -> float | None:
        """Milliseconds since the newest latent was received (None: no latent yet)."""
        if self.t_received_ns is None:
            return None
        return ((_now_ns() if now_ns is None else now_ns) - self.t_received_ns) / 1e6

    def latency_ms(self) -> float | None:
        """Capture-to-receive latency of the newest latent in ms (bus clock)."""
        if self.t_capture_ns is None or self.t_received_bus_ns is None:
            return None
        return (self.t_received_bus_ns - self.t_capture_ns) / 1e6

    @property
    def has_latent(self) -> bool:
        return self.vision_core_latent is not None

    def is_fresh(self, max_age_ms: float, now_ns: int | None = None) -> bool:
        """True when a latent exists and was received at most ``max_age_ms`` ago."""
        age = self.age_ms(now_ns)
        return age is not None and age <= max_age_ms

    # ------------------------------------------------------------------ copies

    def copy(self) -> BeingState:
        """A snapshot: new containers, latents shared (they are never modified in place)."""
        out = copy.copy(self)
        out.extra = dict(self.extra)
        return out

    def snapshot(self) -> BeingState:
        """A deep, writable copy (latents copied too)."""
        out = self.copy()
        for f in fields(self):
            value = getattr(out, f.name)
            if isinstance(value, np.ndarray):
                setattr(out, f.name, value.copy())
        out.extra = copy.deepcopy(self.extra)
        return out

    def summary(self) -> dict[str, Any]:
        """Plain-data view (no arrays) for logs."""
        z = self.vision_core_latent
        return {"frame_seq": self.frame_seq, "dim": None if z is None else int(z.shape[0]),
                "surprise": self.vision_prediction_surprise,
                "surprise_z": self.vision_surprise_z, "mrr": self.vision_mrr,
                "rr": self.vision_rr, "age_ms": self.age_ms(), "variant": self.variant,
                "updates": self.updates}

    def __repr__(self) -> str:
        s = self.summary()
        age = "n/a" if s["age_ms"] is None else f"{s['age_ms']:.0f} ms"
        return (f"BeingState(frame_seq={s['frame_seq']}, D={s['dim']}, "
                f"surprise={_fmt(s['surprise'])}, mrr={_fmt(s['mrr'])}, age={age})")


def _fmt(x: float | None) -> str:
    return "None" if x is None else f"{x:.3f}"
