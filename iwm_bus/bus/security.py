"""CURVE security for the bus over tcp: key pairs, the allowed workers, the bind policy.

A remote worker (``iwm-launch --worker-only --connect HOST``) talks to the game machine's
gateway over tcp. With a key folder both ends use ZeroMQ CURVE (encryption plus
authentication, RFC 26 / pyzmq ``zmq.auth``): the gateway is the CURVE server, each worker a
client, and the gateway accepts only clients whose public key is in ``authorized/``.

    iwm-launch --make-keys keys/          # once, on the game machine
    keys/server.key  server.key_secret    # the gateway's pair (the secret never leaves)
    keys/worker.key  worker.key_secret    # a worker's pair: copy worker.key_secret and
                                          # server.key to the GPU machine's keys/ folder
    keys/authorized/worker.key            # public keys the gateway accepts (add more here)

Binding tcp on anything but loopback without CURVE is refused (:func:`check_bind`) unless
the caller says ``insecure``: frames of someone's screen should not cross a network in clear.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from loguru import logger
from zmq.auth.thread import ThreadAuthenticator

from iwm_bus.logs import worth_logging

__all__ = ["ClientKeys", "Gatekeeper", "ServerKeys", "check_bind", "is_loopback", "make_keys"]

SERVER, WORKER, AUTHORIZED = "server", "worker", "authorized"


def make_keys(folder: Path) -> list[Path]:
    """Create the gateway's and one worker's key pairs in ``folder`` (see the module doc);
    the files written. Refuses (FileExistsError) to overwrite keys already there."""
    folder = Path(folder)
    taken = [folder / f"{n}.key{s}" for n in (SERVER, WORKER) for s in ("", "_secret")
             if (folder / f"{n}.key{s}").exists()]
    if taken:
        raise FileExistsError(f"{taken[0]} exists: keys are not overwritten; use an empty "
                              "folder (or remove the old keys)")
    (folder / AUTHORIZED).mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    written: list[Path] = []
    for name in (SERVER, WORKER):
        public, secret = zmq.auth.create_certificates(folder, name)
        os.chmod(secret, 0o600)
        written += [Path(public), Path(secret)]
    shutil.copy(folder / f"{WORKER}.key", folder / AUTHORIZED / f"{WORKER}.key")
    written.append(folder / AUTHORIZED / f"{WORKER}.key")
    return written


def _load(path: Path, what: str, secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} key {path} does not exist (make keys with "
                                "iwm-launch --make-keys DIR)")
    try:
        public, sec = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is not a ZeroMQ CURVE certificate: {e}") from None
    if secret and sec is None:
        raise ValueError(f"{path} holds no secret key (the file ending in .key_secret does)")
    return public, sec


@dataclass(frozen=True)
class ServerKeys:
    """The gateway's key pair and the folder of public keys it accepts."""

    public: bytes
    secret: bytes
    authorized: Path

    @classmethod
    def load(cls, folder: Path) -> ServerKeys:
        """From ``folder/server.key_secret`` and ``folder/authorized/``; raises
        FileNotFoundError / ValueError naming the file."""
        folder = Path(folder)
        public, secret = _load(folder / f"{SERVER}.key_secret", "gateway secret", True)
        authorized = folder / AUTHORIZED
        if not authorized.is_dir() or not any(authorized.glob("*.key")):
            raise FileNotFoundError(f"{authorized} holds no worker public key (*.key): no "
                                    "worker could connect")
        assert secret is not None
        return cls(public, secret, authorized)

    def allowed(self) -> set[bytes]:
        """The accepted public keys (z85), read from the folder now: a key added while the
        gateway runs is accepted from the next connection on."""
        keys: set[bytes] = set()
        for path in sorted(self.authorized.glob("*.key")):
            try:
                keys.add(zmq.auth.load_certificate(path)[0])
            except (ValueError, OSError) as e:
                logger.warning("gateway: ignored {}: not a CURVE public key ({})", path, e)
        return keys

    def secure(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server (before it binds)."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True


@dataclass(frozen=True)
class ClientKeys:
    """A worker's key pair and the gateway's public key."""

    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def load(cls, folder: Path) -> ClientKeys:
        """From ``folder/worker.key_secret`` and ``folder/server.key``."""
        folder = Path(folder)
        public, secret = _load(folder / f"{WORKER}.key_secret", "worker secret", True)
        server, _ = _load(folder / f"{SERVER}.key", "gateway public", False)
        assert secret is not None
        return cls(public, secret, server)

    def secure(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE client of the gateway (before it connects)."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server


class Gatekeeper:
    """ZAP authentication for a context's CURVE server sockets: accepts the public keys in
    ``keys.authorized``, logs (rate-limited) and counts every refused peer."""

    def __init__(self, ctx: zmq.Context, keys: ServerKeys) -> None:
        self.keys = keys
        self.refused = 0
        self._auth = ThreadAuthenticator(ctx)
        self._auth.start()
        self._auth.configure_curve_callback("*", credentials_provider=self)

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials-provider hook (auth thread): is ``key`` (z85) allowed?"""
        if key in self.keys.allowed():
            return True
        self.refused += 1
        if worth_logging(self.refused):
            logger.warning("gateway: refused a peer with an unknown CURVE key {} (#{}); add "
                           "its public key to {} to allow it", key.decode(errors="replace"),
                           self.refused, self.keys.authorized)
        return False

    def stop(self) -> None:
        self._auth.stop()


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the socket on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # an interface name, a host name, "*"


def check_bind(host: str, secure: bool, insecure: bool) -> None:
    """ValueError when ``host`` is reachable from other machines and the link has no CURVE,
    unless ``insecure`` says that is intended."""
    if secure or insecure or is_loopback(host):
        return
    raise ValueError(f"binding {host} without CURVE would send frames in clear to the "
                     "network: give --keys DIR (iwm-launch --make-keys DIR), or --insecure "
                     "on a network you trust")
