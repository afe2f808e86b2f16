"""What a game agent imports to use the iwm-bus vision sidecar (never imports torch).

- :class:`BeingState` - the seed's vision fields (latent, surprise, MRR, ...).
- :class:`VisionBridge` / :class:`AsyncVisionBridge` - keep a BeingState current from the bus,
  hooks on surprise / MRR / latents, ``publish_action`` on ``agent.action``.
- :class:`IWMClient` / :class:`AsyncIWMClient` - the worker's RPC: ``health``,
  ``encode_image``, ``predict_next``, ``rollout``, ``rollout_batch``.
- :mod:`agent_bridge.arbiter` - ActionArbiter hooks (slow down, escalate, temporal coherence).
- :mod:`agent_bridge.planner` - CEM planning over action sequences with batched rollouts.

See ``docs/agent.md`` ("Use from an agent") for runnable examples.
"""

from agent_bridge.arbiter import ArbiterConfig, ArbiterDecision, ArbiterHooks
from agent_bridge.async_bridge import AsyncVisionBridge
from agent_bridge.bridge import VisionBridge, resolve_endpoints
from agent_bridge.client import (
    AsyncIWMClient,
    BatchRolloutResult,
    DualEncodeResult,
    EncodeResult,
    IWMClient,
    PredictResult,
    RolloutResult,
)
from agent_bridge.planner import ActionSpace, CEMPlanner, Plan, PlannerConfig, RandomShootingPlanner
from agent_bridge.state import BeingState
from agent_bridge.tracker import BridgeStats
from iwm_bus.errors import IWMError, ServiceError, ServiceTimeout, StaleDataError

__all__ = [
    "ActionSpace",
    "ArbiterConfig",
    "ArbiterDecision",
    "ArbiterHooks",
    "AsyncIWMClient",
    "AsyncVisionBridge",
    "BatchRolloutResult",
    "BeingState",
    "BridgeStats",
    "CEMPlanner",
    "DualEncodeResult",
    "EncodeResult",
    "IWMClient",
    "IWMError",
    "Plan",
    "PlannerConfig",
    "PredictResult",
    "RandomShootingPlanner",
    "RolloutResult",
    "ServiceError",
    "ServiceTimeout",
    "StaleDataError",
    "VisionBridge",
    "resolve_endpoints",
]
