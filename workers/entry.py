"""Process entry shim: run a ``run_*`` function and make its return value the exit code."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
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
