"""Exceptions shared by every part of iwm-bus.

Each message says what went wrong and, where there is one, what to do next.
"""

from __future__ import annotations


class IWMError(Exception):
    """Base class for every iwm-bus error."""


class WireError(IWMError, ValueError):
    """A message on the bus is malformed (bad bytes, wrong types, missing fields, too big)."""


class UnknownMessage(WireError):
    """A well-formed message of a kind, or on a topic, this side does not know (a newer
    writer's): readers pass it over and count it (docs/wire.md), it is not malformed."""


class WireVersionError(WireError):
    """A message from a peer of another major schema version, which this side refuses."""


class RingError(IWMError):
    """A shared-memory FrameRing cannot be created, attached or used."""


class StaleRingError(RingError, FileExistsError):
    """A segment with the ring's name already exists (a crashed creator left it behind)."""


class StaleDataError(IWMError, TimeoutError):
    """The latest state is older than the caller allows (or there is none yet)."""


class ServiceError(IWMError):
    """The world-model worker answered an RPC with an error."""


class ServiceTimeout(IWMError, TimeoutError):
    """The world-model worker did not answer an RPC in time (dead, missing or overloaded)."""


class CheckpointError(IWMError, ValueError):
    """A checkpoint file cannot be loaded safely (pickle payload, truncated, config mismatch)."""


class SessionError(IWMError, ValueError):
    """A session (recording) file is missing, corrupted, truncated or not an iwm-bus session."""


class RunDirBusyError(IWMError, RuntimeError):
    """Another sidecar already holds the run directory."""
