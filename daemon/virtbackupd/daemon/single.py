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

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path

from virtbackupd.errors import DaemonLockFileError, DaemonRunningError

LOCK_FILE = "daemon.lock"


def hold_daemon_lock(runtime_dir: Path) -> int:
    """Take the daemon lock and write our pid into it; the open file
    descriptor, which the caller keeps open until it exits. Another
    process holding it: DaemonRunningError naming that process."""
    path = runtime_dir / LOCK_FILE
    while True:
        fd = _open_lock(path)
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


def _open_lock(path: Path) -> int:
    """Open (or create) the lock file: a regular file, never through a
    link. O_NONBLOCK: a FIFO there must not hold the open up."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    # A device is not even opened (an open may act on it); the fstat
    # below judges what was opened.
    with contextlib.suppress(FileNotFoundError):
        _judge(path, path.lstat().st_mode)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR):  # replaced since the lstat
            _judge(path, path.lstat().st_mode)
        raise DaemonLockFileError(path, f"cannot be opened ({exc.strerror})") from None
    try:
        _judge(path, os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    os.set_blocking(fd, True)
    return fd


def _judge(path: Path, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISLNK(mode):
        kind = "a symbolic link; it is not followed"
    elif stat.S_ISDIR(mode):
        kind = "a folder"
    elif stat.S_ISFIFO(mode):
        kind = "a FIFO"
    else:
        kind = "a socket or device"
    raise DaemonLockFileError(path, f"is {kind}, not a regular file")
