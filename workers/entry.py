"""Process entry shim: run a ``run_*`` function and make its return value the exit code."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn


def exit_with(target: Callable[..., int], *args: Any, **kwargs: Any) -> NoReturn:
    """Spawn target for the launcher: ``sys.exit(target(*args, **kwargs))``."""
    sys.exit(target(*args, **kwargs))
