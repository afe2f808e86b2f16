"""Shared fixtures: a short temp run dir, free loopback ports, a zmq context, spawned processes.

Every fixture cleans up after itself: the run dir is removed, the context is destroyed with
linger 0, and spawned processes are joined (then terminated, then killed) with timeouts.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import pytest
import zmq

#: how long teardown waits for a spawned child before terminating it
JOIN_TIMEOUT_S = 5.0


#: the lowest port ``find_free_port`` hands out (above the well-known and most registered ones)
_FIRST_PORT = 20000


def find_free_port(count: int = 1, host: str = "127.0.0.1") -> int:
    """A port P on ``host`` such that P .. P+count-1 are all free right now.

    ``count=4`` gives a base port for ``Endpoints.tcp``. Ports come from below the kernel's
    ephemeral range: a port from inside it can be handed to some outgoing connection (the
    capture's own ZeroMQ connects) in the seconds between this check and the bind, which is
    what once made a sidecar fail with "Address already in use".
    """
    low, _ = _ephemeral_range()
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(_FIRST_PORT, max(_FIRST_PORT + 1, low - count))
        if all(_port_free(host, p) for p in range(base, base + count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports on {host} below {low} after 200 tries")


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux; IANA's elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 49152, 65535


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A fresh, short, owner-only (0700) directory under /tmp (short enough for ipc paths)."""
    path = Path(tempfile.mkdtemp(prefix="iwm", dir="/tmp"))
    os.chmod(path, 0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():  # a process still binding sockets raced the first pass
            time.sleep(0.2)
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def free_port() -> int:
    """A free 127.0.0.1 port whose next three ports are free too (a base for Endpoints.tcp)."""
    return find_free_port(4)


@pytest.fixture
def zmq_ctx() -> Iterator[zmq.Context]:
    """A private zmq context; every socket still open at teardown is closed with linger 0."""
    ctx = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


@pytest.fixture
def spawn(run_dir: Path) -> Iterator[Callable[..., BaseProcess]]:
    """``spawn(target, *args, **kwargs)`` starts a daemon process with the spawn context.

    The target must be importable (a module-level function). At teardown every process is
    joined with a timeout, then terminated, then killed, so none outlives the test. (It
    depends on ``run_dir`` so that the children are gone before the run dir is removed.)
    """
    ctx = mp.get_context("spawn")
    procs: list[BaseProcess] = []

    def start(target: Callable[..., Any], *args: Any, **kwargs: Any) -> BaseProcess:
        proc = ctx.Process(target=target, args=args, kwargs=kwargs, daemon=True)
        proc.start()
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            proc.join(JOIN_TIMEOUT_S)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


@pytest.fixture
def mp_ctx() -> mp.context.SpawnContext:
    """The spawn multiprocessing context (for Queues and Events shared with ``spawn``)."""
    return mp.get_context("spawn")
