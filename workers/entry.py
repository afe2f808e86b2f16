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


def setup_logging(level: str, process: str) -> None:
    """The one log format of every sidecar process: time, level, process, message.

    Below DEBUG an exception is logged as one ``[Type: message]`` suffix; at DEBUG with its
    full traceback. Variable values are never printed (loguru's ``diagnose``): they can
    hold frames, keys or paths.
    """
    level = level.upper()
    debug = logger.level(level).no <= logger.level("DEBUG").no

    def fmt(record: dict[str, Any]) -> str:
        line = "<green>{time:HH:mm:ss.SSS}</green> {level: <7} {extra[proc]: <9} {message}"
        exc = record["exception"]
        if exc is None:
            return line + "\n"
        if debug:
            return line + "\n{exception}\n"
        record["extra"]["exc"] = f" [{getattr(exc.type, '__name__', exc.type)}: {exc.value}]"
        return line + "{extra[exc]}\n"

    logger.remove()
    logger.configure(extra={"proc": process})
    logger.add(sys.stderr, level=level, format=fmt, backtrace=debug, diagnose=False)


def exit_with(target: Callable[..., int] | str, *args: Any, **kwargs: Any) -> NoReturn:
    """Spawn target for the launcher: ``sys.exit(target(*args, **kwargs))``, logging in the
    launcher's format at its level (``IWM_LOG_LEVEL``) under the process's name. ``target``
    may be named as ``"module:function"``, imported here, in the child: the launcher then
    never imports what its children need (torch, for the worker). The child stops (SIGTERM
    to itself, so it shuts down as on the launcher's own) when its parent is gone: a
    SIGKILLed launcher or gym wrapper leaves no worker running."""
    import importlib

    import multiprocess as mp

    level = os.environ.get(LOG_LEVEL_ENV)
    if level:
        setup_logging(level, mp.current_process().name.removeprefix("iwm-"))
    _terminate_when_orphaned()
    if isinstance(target, str):
        module, _, name = target.partition(":")
        target = getattr(importlib.import_module(module), name)
    sys.exit(target(*args, **kwargs))


#: how often a child checks that its parent is alive (seconds)
ORPHAN_CHECK_S = 0.5


def _terminate_when_orphaned() -> None:
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(ORPHAN_CHECK_S)
        logger.warning("parent process {} is gone; stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


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
