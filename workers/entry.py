"""Process lifecycle helpers shared by the workers: the spawn entry shim and signal stops."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, NoReturn

from loguru import logger

#: the launcher passes its --log-level to its children through this variable
LOG_LEVEL_ENV = "IWM_LOG_LEVEL"


def exit_with(target: Callable[..., int], *args: Any, **kwargs: Any) -> NoReturn:
    """Spawn target for the launcher: ``sys.exit(target(*args, **kwargs))``."""
    level = os.environ.get(LOG_LEVEL_ENV)
    if level:
        logger.remove()
        logger.add(sys.stderr, level=level.upper())
    sys.exit(target(*args, **kwargs))


class StopFlag:
    """Set by SIGTERM/SIGINT. The handler only stores the signal number (no locks, no
    logging: it may interrupt code that holds the logger's lock)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    # the part of threading.Event's interface that loops use, without its lock
    def is_set(self) -> bool:
        return self.signum is not None

    def set(self) -> None:
        self.signum = 0

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.signum is None and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.01))
        return self.signum is not None


@contextmanager
def stop_on_signals(stop: StopFlag, who: str) -> Iterator[None]:
    """While inside, SIGTERM/SIGINT set ``stop``; the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        logger.warning("{}: not in the main thread; SIGTERM/SIGINT will not stop it", who)
        yield
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        stop.signum = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
