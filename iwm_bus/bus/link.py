"""The tcp link between a game machine and remote workers: three ports from a base port.

The game machine's gateway (``workers/gateway.py``) binds all three; a remote worker
(``iwm-launch --worker-only --connect HOST:PORT``) connects to them:

    PORT      frames   gateway PUB  -> worker SUB   iwm.frame with its pixels as a part of
                                                     their own (iwm_bus.bus.link_frames)
    PORT + 1  results  worker PUB   -> gateway XSUB  iwm.latent / surprise / mrr / stats,
                                                     re-published on the local worker endpoint
    PORT + 2  rpc      gateway DEALER <-> worker DEALER   requests of local RPC clients

Only the gateway binds, so a worker needs one address, several workers can share one
gateway (their results merge; RPC requests are shared among them), and with CURVE keys
only the gateway holds a server secret.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from iwm_bus.bus.link_frames import LinkCodec
from iwm_bus.bus.transport import Endpoints

__all__ = ["DEFAULT_PORT", "Link"]

DEFAULT_PORT = 5570


@dataclass(frozen=True)
class Link:
    # the gateway's address: where it binds (game machine) or where a worker connects
    host: str = "127.0.0.1"
    # base port: frames, results and rpc use port, port + 1 and port + 2
    port: int = DEFAULT_PORT
    # CURVE key folder (iwm_bus.bus.security); None = no encryption or authentication
    keys: Path | None = None
    # allow a non-loopback bind without keys (a network you trust)
    insecure: bool = False
    # how the gateway sends the frames (raw, zstd, jpeg: LinkCodec); a worker decodes what
    # each frame's header says, whatever its own link says
    codec: LinkCodec = field(default_factory=LinkCodec)

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host or any(c in self.host
                                                                   for c in "/ \t\n"):
            raise ValueError(f"Link.host={self.host!r}: must be a host name or address")
        if isinstance(self.port, bool) or not isinstance(self.port, int) \
                or not 1 <= self.port <= 65533:
            raise ValueError(f"Link.port={self.port!r}: must be an int in 1..65533 (three "
                             "ports from it are used)")
        if self.keys is not None:
            object.__setattr__(self, "keys", Path(self.keys))
        if not isinstance(self.codec, LinkCodec):
            raise ValueError(f"Link.codec={self.codec!r}: must be a LinkCodec "
                             "(LinkCodec.parse('zstd'))")

    @classmethod
    def parse(cls, spec: str, keys: Path | None = None, insecure: bool = False,
              codec: LinkCodec | None = None) -> Link:
        """``PORT``, ``HOST``, ``HOST:PORT`` or ``tcp://HOST:PORT`` (IPv6 in brackets)."""
        text = spec.removeprefix("tcp://").strip()
        host, port = "127.0.0.1", DEFAULT_PORT
        if text.isdigit():
            port = int(text)
        elif text.startswith("["):  # [::1]:5570
            host, _, rest = text[1:].partition("]")
            if rest:
                if not rest.startswith(":") or not rest[1:].isdigit():
                    raise ValueError(f"address {spec!r} must look like [IPV6]:PORT")
                port = int(rest[1:])
            host = f"[{host}]"
        elif ":" in text:
            host, _, p = text.rpartition(":")
            if not p.isdigit():
                raise ValueError(f"address {spec!r} must look like HOST:PORT")
            port = int(p)
        else:
            host = text
        return cls(host, port, keys, insecure, codec or LinkCodec())

    def _url(self, offset: int) -> str:
        return f"tcp://{self.host}:{self.port + offset}"

    @property
    def frames(self) -> str:
        return self._url(0)

    @property
    def results(self) -> str:
        return self._url(1)

    @property
    def rpc(self) -> str:
        return self._url(2)

    def worker_endpoints(self) -> Endpoints:
        """What a remote worker connects to, in the local worker's terms: frame notices and
        actions both come from the gateway's frames port."""
        return Endpoints(capture=self.frames, worker=self.results, rpc=self.rpc,
                         agent=self.frames)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}{' (CURVE)' if self.keys else ''}"
