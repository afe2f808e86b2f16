"""The run directory: one folder per running sidecar holding its sockets and its manifest.

An agent needs only this folder to find everything: ``sidecar.json`` names the shared-memory
ring and every endpoint. The folder is owner-only (0700); a sidecar holds ``lock`` (flock) for
its whole life, so a second sidecar on the same folder fails clearly instead of stealing it.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from iwm_bus.bus.transport import Endpoints
from iwm_bus.errors import RunDirBusyError

MANIFEST = "sidecar.json"
LOCK = "lock"


def default_run_dir() -> Path:
    """``$XDG_RUNTIME_DIR/iwm`` or ``/tmp/iwm-<uid>``: short enough for ipc socket paths."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    return Path(base) / "iwm" if base else Path(tempfile.gettempdir()) / f"iwm-{os.getuid()}"


class RunDir:
    """Create, lock, describe and clean one run directory."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).resolve()
        self._lock_fd: int | None = None

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def endpoints(self) -> Endpoints:
        return Endpoints.ipc(self.path)

    def acquire(self) -> RunDir:
        """Create the folder (0700) and take its lock; ``RunDirBusyError`` when held."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path, 0o700)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner = self.read_manifest(missing_ok=True) or {}
            raise RunDirBusyError(
                f"run dir {self.path} is in use by another sidecar (pid {owner.get('pid', '?')}); "
                "stop it or pass another --run-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        # a manifest left by a killed sidecar must not be read as this one's
        self.manifest_path.unlink(missing_ok=True)
        return self

    def write_manifest(self, info: dict[str, Any]) -> None:
        """Atomically write ``sidecar.json`` (owner-only)."""
        tmp = self.manifest_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), **info}, f, indent=2, default=str)
        os.replace(tmp, self.manifest_path)

    def read_manifest(self, missing_ok: bool = False) -> dict[str, Any] | None:
        try:
            return json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            if missing_ok:
                return None
            raise FileNotFoundError(f"no sidecar manifest in {self.path}; is iwm-launch "
                                    "running with this --run-dir?") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.manifest_path} is not valid JSON: {e}") from e

    def cleanup(self) -> None:
        """Remove socket files, manifest and lock; remove the folder when it is then empty."""
        envs = sorted(self.path.glob("capture.e*.sock"))  # --envs: the other captures'
        for f in [*self.endpoints().socket_files(), *envs, self.manifest_path,
                  self.manifest_path.with_suffix(".tmp"), self.path / LOCK]:
            f.unlink(missing_ok=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        try:
            self.path.rmdir()
        except OSError:
            pass  # not empty (user files) or already gone: leave it

    def __enter__(self) -> RunDir:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
