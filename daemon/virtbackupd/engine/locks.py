"""One backup per domain at a time, across processes (CLI and daemon)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from virtbackupd.errors import BackupBusyError


@contextlib.contextmanager
def domain_lock(runtime_dir: Path, uuid: str, name: str) -> Iterator[None]:
    """Hold ``<runtime_dir>/locks/<uuid>.lock`` (flock) for the block; the
    kernel releases it if the process dies, so no stale lock survives."""
    locks = runtime_dir / "locks"
    locks.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = locks / f"{uuid}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise BackupBusyError(
                f"another backup of {name} is running (process {holder}; lock {path})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
