"""``iwm_bus.wire``, the public name in DESIGN's table: the wire schema lives in
:mod:`iwm_bus.bus.wire`."""

from iwm_bus.bus.wire import *  # noqa: F403
from iwm_bus.bus.wire import __all__  # noqa: F401
