"""Which optional part of the install (an *extra*) each heavy dependency comes from, and one
clear line where a part is missing.

A bare ``pip install iwm-bus`` is the agent's client: ``agent_bridge``, the wire, the bus
client side and the metrics, on numpy, pyzmq, msgpack and loguru. The sidecar (capture,
worker, launcher, recorder, the model), training and the games come with their extras; a
package that needs one checks for it when imported and raises :class:`MissingExtraError`
naming the extra to install, and the console scripts (:mod:`iwm_bus.commands`) print that
line and exit 2 instead of a traceback::

    require("sidecar", "iwm_bus.model", "torch", "timm")
    # MissingExtraError: iwm_bus.model needs torch, timm (not installed):
    #   pip install 'iwm-bus[sidecar]'

The module names below are the import names of the extras' distributions in ``setup.cfg``
(``tests/test_extras.py`` keeps the two in step).
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRAS", "MissingExtraError", "missing", "require"]

_SIDECAR = ("torch", "torchvision", "timm", "PIL", "multiprocess", "mcap", "mcap_protobuf",
            "foxglove_schemas_protobuf", "google.protobuf", "zstandard", "tqdm", "gymnasium",
            "ale_py")

#: extra -> the modules it installs that the code imports (what :func:`require` checks)
EXTRAS: dict[str, tuple[str, ...]] = {
    # capture, worker, launcher, recorder, sessions, the shipped model; Atari for the demo
    "sidecar": _SIDECAR,
    # iwm-train / iwm-eval: the sidecar's packages, TensorBoard logs and the eval's plots
    "train": (*_SIDECAR, "tensorboard", "matplotlib"),
    "games": ("gymnasium", "ale_py", "vizdoom"),
    "screen": ("mss",),
    "video": ("av",),
    "viewer": ("rerun",),
}


class MissingExtraError(ImportError):
    """A part of iwm-bus that needs an extra that is not installed; the message says which."""


def missing(modules: tuple[str, ...] | list[str]) -> list[str]:
    """The names in ``modules`` that cannot be imported here (found without importing them)."""
    out = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package missing ("google" of google.protobuf)
            found = False
        if not found:
            out.append(name)
    return out


def require(extra: str, what: str, *modules: str) -> None:
    """Raise :class:`MissingExtraError` unless ``modules`` (default: all of ``extra``'s) import.

    ``what`` names the part that needs them, for the message.
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {sorted(EXTRAS)}")
    absent = missing(modules or EXTRAS[extra])
    if absent:
        raise MissingExtraError(f"{what} needs {', '.join(absent)} (not installed): "
                                f"pip install 'iwm-bus[{extra}]'")
