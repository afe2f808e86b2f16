"""iwm-bus: a vision world-model sidecar for game-playing agents.

The parts an agent needs (ring, wire, topics, transport, config, metrics) import without
torch; the model lives in ``iwm_bus.model`` and pulls torch in only when imported.
"""

from iwm_bus.errors import IWMError, RingError, WireError

__version__ = "0.1.0"

__all__ = ["IWMError", "RingError", "WireError", "__version__"]
