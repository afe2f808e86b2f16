"""Topic names on the bus, in one place, and which message kind each one carries.

A ZeroMQ SUB socket matches topics by prefix, so ``iwm.latent`` also receives
``iwm.latent.<suffix>`` (used for per-variant streams, e.g. ``iwm.latent.invariant``).
"""

from __future__ import annotations

FRAME = "iwm.frame"  # capture -> worker/recorder: a new frame is in the ring (no pixels)
ACTION = "agent.action"  # agent (or replay) -> worker/capture/recorder: the action taken
# agent -> viewer/recorder: the arbiter's decision for a frame (slow down / wait / escalate)
# and, when the agent planned, each candidate's predicted cost; beside agent.action on the
# agent's socket (prefix matching: a subscriber of agent.action does not receive it)
DECISION = "agent.decision"
LATENT = "iwm.latent"  # worker -> agent: z_cls (+ patches) of a frame
SURPRISE = "iwm.surprise"  # worker -> agent: prediction error of a frame
MRR = "iwm.mrr"  # worker -> agent: reciprocal rank of a frame's latent, and its running mean
STATS = "iwm.stats"  # any process -> anyone: counters and rates, about once a second
# worker -> capture: "I am here, and have seen this many notices" (a lossless capture starts
# on it and re-sends a notice to a worker that has seen none), with each stats tick
READY = "iwm.ready"
RPC = "iwm.rpc"  # client <-> worker ROUTER socket: requests and replies

#: message kind carried by each topic (see ``iwm_bus.bus.wire``)
TOPIC_KINDS: dict[str, tuple[str, ...]] = {
    FRAME: ("frame",),
    ACTION: ("action",),
    DECISION: ("decision",),
    LATENT: ("latent",),
    SURPRISE: ("surprise",),
    MRR: ("mrr",),
    STATS: ("stats",),
    READY: ("ready",),
    RPC: ("rpc_request", "rpc_reply"),
}

#: what the worker publishes for agents (and READY for the capture)
WORKER_TOPICS = (LATENT, SURPRISE, MRR, STATS)


def base_topic(topic: str) -> str:
    """The known topic that ``topic`` is, or extends with a ``.suffix``.

    Raises ``KeyError`` naming the topic when it is not one of ours.
    """
    if topic in TOPIC_KINDS:
        return topic
    for known in TOPIC_KINDS:
        if topic.startswith(known + "."):
            return known
    raise KeyError(f"unknown topic {topic!r}; known topics: {', '.join(TOPIC_KINDS)}")
