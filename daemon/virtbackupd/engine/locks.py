"""One backup per domain at a time, across processes (CLI and daemon)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

from virtbackupd.adapters import host_folders
from virtbackupd.errors import BackupBusyError


@contextlib.contextmanager
def domain_lock(runtime_dir: Path, uuid: str, name: str, what: str = "backup") -> Iterator[None]:
    """Hold ``<runtime_dir>/locks/<uuid>.lock`` (flock) for the block; the
    kernel releases it if the process dies, so no stale lock survives.
    Backups, restores and prunes of one domain exclude each other: a prune
    must not merge images a restore is reading."""
    locks = runtime_dir / "locks"
    host_folders.make_folder(locks)
    path = locks / f"{uuid}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = os.pread(fd, 128, 0).decode(errors="replace").split()
            pid = held[0] if held else "unknown"
            activity = held[1] if len(held) > 1 else "backup"
            raise BackupBusyError(
                f"another {activity} of {name} is running (process {pid}; lock {path})",
                domain=name,
                path=path,
            ) from None
        os.ftruncate(fd, 0)
        me = os.getpid()
        os.pwrite(fd, f"{me} {what} {_start_time(me) or '-'}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def backup_owner_alive(runtime_dir: Path, uuid: str) -> bool:
    """Whether the process of a backup of the domain recorded as running
    may still be alive: the domain's lock names it (a backup holds the lock
    from before its record is written until after it is ended) and that
    process still runs. A lock file naming another activity means a later
    job took the lock, so the backup's process is gone; a pid that runs
    again with another start time is another process (pid reuse). The
    file is read, never locked: taking the lock, even for an instant,
    could make a backup starting at that instant fail as busy."""
    path = runtime_dir / "locks" / f"{uuid}.lock"
    try:
        held = path.read_text(errors="replace").split()
    except FileNotFoundError:
        return False  # no job of this domain has run since the host started
    except OSError:
        return True  # cannot tell: never call a live backup dead
    if not held:
        return True  # a process has just taken the lock and is writing its name
    if len(held) > 1 and held[1] != "backup":
        return False
    try:
        pid = int(held[0])
    except ValueError:
        return True
    now = _start_time(pid)
    if now is None:
        return False  # no such process
    return len(held) < 3 or held[2] == "-" or held[2] == now


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot: field 22 of
    /proc/PID/stat, counted after the parenthesised command name, which
    may hold spaces); None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


@contextlib.asynccontextmanager
async def backup_slot(
    runtime_dir: Path, slots: int, on_wait: Callable[[], None] | None = None
) -> AsyncIterator[int]:
    """One of `slots` places for a running backup (max_concurrent_backups),
    shared by every process on the host; waits for a free one."""
    folder = runtime_dir / "slots"
    host_folders.make_folder(folder)
    waited = False
    while True:
        for i in range(slots):
            fd = os.open(folder / f"{i}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                yield i
            finally:
                os.close(fd)
            return
        if not waited and on_wait is not None:
            on_wait()
        waited = True
        await asyncio.sleep(0.5)


# --- cancel requests ---------------------------------------------------------------
# `virtbackup cancel` and the job may be different processes (CLI, daemon):
# the request is a file the running job looks for about twice a second.


def _cancel_file(runtime_dir: Path, uuid: str) -> Path:
    return runtime_dir / "cancel" / uuid


def request_cancel(runtime_dir: Path, uuid: str) -> None:
    folder = runtime_dir / "cancel"
    host_folders.make_folder(folder)
    _cancel_file(runtime_dir, uuid).write_text(f"{os.getpid()}\n")


def cancel_requested(runtime_dir: Path, uuid: str) -> bool:
    return _cancel_file(runtime_dir, uuid).exists()


def clear_cancel(runtime_dir: Path, uuid: str) -> None:
    _cancel_file(runtime_dir, uuid).unlink(missing_ok=True)


# --- freeze records --------------------------------------------------------------
# Written before the guest agent freezes a guest's file systems and removed
# after the thaw. One left behind means the process died in between (or the
# thaw failed): the next backup of the domain (daemon or CLI), holding its
# lock, thaws the guest first.


def _freeze_file(runtime_dir: Path, uuid: str) -> Path:
    return runtime_dir / "frozen" / uuid


def note_freeze(runtime_dir: Path, uuid: str) -> None:
    folder = runtime_dir / "frozen"
    host_folders.make_folder(folder)
    path = _freeze_file(runtime_dir, uuid)
    path.write_text(f"{os.getpid()}\n")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def freeze_left(runtime_dir: Path, uuid: str) -> bool:
    return _freeze_file(runtime_dir, uuid).exists()


def clear_freeze(runtime_dir: Path, uuid: str) -> None:
    _freeze_file(runtime_dir, uuid).unlink(missing_ok=True)
