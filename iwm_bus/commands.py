"""The console scripts. Each checks that the extra it needs is installed, then imports its
command and runs it; in a client-only install (a bare ``pip install iwm-bus``) that check
prints one line naming the extra and exits 2, before any import that would fail::

    $ iwm-launch
    iwm-launch needs torch, torchvision, timm, ... (not installed): pip install 'iwm-bus[sidecar]'

The commands are named by module path and imported only here, when run: this module sits in
``iwm_bus`` (the bottom layer) and must not import the launcher or the trainer above it.
"""

from __future__ import annotations

import importlib
import sys

from iwm_bus.extras import MissingExtraError, require

__all__ = ["COMMANDS", "iwm_eval", "iwm_launch", "iwm_session", "iwm_train", "run"]

#: console script -> (module with ``main``, the extra it needs)
COMMANDS: dict[str, tuple[str, str]] = {
    "iwm-launch": ("launch", "sidecar"),
    "iwm-session": ("iwm_bus.session.cli", "sidecar"),
    "iwm-train": ("train.cli", "train"),
    "iwm-eval": ("train.eval_cli", "train"),
}


def run(command: str, argv: list[str] | None = None) -> int:
    """Run console script ``command``; 2 with one line on stderr if its extra is missing."""
    module, extra = COMMANDS[command]
    try:
        require(extra, command)
        main = importlib.import_module(module).main
    except MissingExtraError as e:  # also one raised by a package the command imports
        print(e, file=sys.stderr)
        return 2
    return main(argv)


def iwm_launch() -> int:
    return run("iwm-launch")


def iwm_session() -> int:
    return run("iwm-session")


def iwm_train() -> int:
    return run("iwm-train")


def iwm_eval() -> int:
    return run("iwm-eval")
