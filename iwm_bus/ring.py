"""``iwm_bus.ring``, the public name in DESIGN's table: the FrameRing lives in
:mod:`iwm_bus.bus.ring`."""

from iwm_bus.bus.ring import *  # noqa: F403
from iwm_bus.bus.ring import __all__  # noqa: F401
