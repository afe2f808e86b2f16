"""Rate-limited logging, written once: a flood of bad input must not become a flood of log
lines, and the first occurrences must still be seen.

    if worth_logging(self.bad):          # counted events: the first 10, then every 1000th
        logger.warning("... (#{})", self.bad)
    log = Throttle()                     # keyed warnings: one line per key every 5 s,
    log.warning("rpc-error", "...")      # with how many were suppressed
"""

from __future__ import annotations

import math
import time
from typing import Any

from loguru import logger

__all__ = ["Throttle", "worth_logging"]


def worth_logging(count: int) -> bool:
    """Whether the ``count``-th occurrence of a counted event gets a log line."""
    return count <= 10 or count % 1000 == 0


class Throttle:
    """At most one warning per key every ``every_s`` seconds; the next one says how many
    were suppressed in between."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -math.inf) < self.every_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        more = self._suppressed.pop(key, 0)
        suffix = f" ({more} similar suppressed)" if more else ""
        logger.opt(depth=1).warning(message + suffix, *args)
