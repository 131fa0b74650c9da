"""One daemon per config: ``<runtime_dir>/daemon.lock``, held (flock) for
the daemon's whole life.

A second `virtbackupd` on the same config (an operator running it by hand
while the service runs) would take the first one's running backups for
interrupted ones, schedule the same jobs and, on exit, delete the first
one's daemon.json. It must stop before it touches anything. The kernel
releases a flock when its process dies, however it dies, so a killed
daemon never blocks its own restart; the file itself is never removed (a
new file at the path would be a second, separate lock).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from virtbackupd.errors import DaemonRunningError

LOCK_FILE = "daemon.lock"


def hold_daemon_lock(runtime_dir: Path) -> int:
    """Take the daemon lock and write our pid into it; the open file
    descriptor, which the caller keeps open until it exits. Another
    process holding it: DaemonRunningError naming that process."""
    path = runtime_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise DaemonRunningError(path, int(pid) if pid.isdigit() else None) from None
        except BaseException:
            os.close(fd)
            raise
        # Someone replaced the file between our open and our lock: the lock
        # we hold is on a file nobody else will find; take the one at the path.
        try:
            same = path.lstat().st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
