"""The private folder of each qemu-nbd export (``nbd-XXXX`` in the runtime
dir, or in a backup's job folder there): its socket, qemu-nbd's stderr,
and ``owner.json``, which says which process made the folder and which
qemu-nbd serves from it.

A process killed with SIGKILL runs no clean-up: its folders stay, and a
qemu-nbd that outlived it would keep its image locked. qemu-nbd gets
SIGKILL from the kernel when its parent dies (qemu_img.die_with_parent),
so none should outlive it; the record is what lets the next command of
any kind prove that and clean up (:func:`sweep`): a folder whose owner
is dead (the recorded pid no longer runs with the recorded start time)
has its helper stopped (only a process whose command line names the
folder's socket, and only while /proc still shows the same process: its
pid and start time) and is removed. Folders of live processes are never
touched. The helper's own pid and start time are recorded too, for an
operator who looks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virtbackupd.adapters import host_folders, procfs
from virtbackupd.adapters.procfs import Holder, ProcessId

QEMU_NBD = "qemu-nbd"
PREFIX = "nbd-"
OWNER_FILE = "owner.json"
SOCKET = "nbd.sock"
# Where the folders are, below a runtime dir: its own exports, and those
# of backup jobs (runtime_dir/jobs/<backup id>/).
PATTERNS = (f"{PREFIX}*", f"jobs/*/{PREFIX}*")
# A folder is written with its owner record in one go; one without a
# record is a folder of an older version, or of a process killed in that
# instant: left to its maker for this long, then swept like any other.
UNRECORDED_GRACE_S = 60.0
# How long a stopped helper may take to go (its image lock goes with it).
GONE_WAIT_S = 10.0


@dataclass(frozen=True)
class FolderRecord:
    """What owner.json holds."""

    owner: ProcessId
    helper: ProcessId | None
    socket: str

    def as_json(self) -> dict[str, Any]:
        return {
            "owner": self.owner.as_json(),
            "helper": None if self.helper is None else self.helper.as_json(),
            "socket": self.socket,
        }

    @classmethod
    def from_json(cls, data: Any) -> FolderRecord:
        """Raises ValueError for anything but what as_json writes."""
        if not isinstance(data, dict) or not isinstance(data.get("socket"), str):
            raise ValueError("not an owner record")  # noqa: TRY004 - one error for a bad file
        helper = data.get("helper")
        return cls(_process(data.get("owner")), None if helper is None else _process(helper),
                   data["socket"])  # fmt: skip


def _process(data: Any) -> ProcessId:
    if not isinstance(data, dict):
        raise ValueError("not a process record")  # noqa: TRY004 - as above
    pid, start, boot = data.get("pid"), data.get("start"), data.get("boot")
    if not (isinstance(pid, int) and pid > 0 and isinstance(start, int) and start >= 0):
        raise ValueError(f"bad pid or start time: {pid!r} {start!r}")
    if not isinstance(boot, str):
        raise ValueError(f"bad boot id: {boot!r}")  # noqa: TRY004 - as above
    return ProcessId(pid, start, boot)


def _write(folder: Path, record: FolderRecord) -> None:
    tmp = folder / f".{OWNER_FILE}.tmp"
    tmp.write_text(json.dumps(record.as_json()))
    tmp.replace(folder / OWNER_FILE)  # never a torn record


def read_record(folder: Path) -> FolderRecord | None:
    try:
        return FolderRecord.from_json(json.loads((folder / OWNER_FILE).read_text()))
    except (OSError, ValueError):  # json.JSONDecodeError is a ValueError
        return None


def new_folder(runtime_dir: Path) -> Path:
    """A new private folder, recorded as this process's before it holds
    anything (a sweep then knows whose it is at every instant)."""
    host_folders.make_passable(runtime_dir)
    folder = Path(tempfile.mkdtemp(prefix=PREFIX, dir=runtime_dir))
    _write(folder, FolderRecord(procfs.me(), None, str(folder / SOCKET)))
    return folder


def claim(folder: Path) -> None:
    """Record this process as the owner of `folder` (another kind of
    private folder: engine.guest_view's checks)."""
    _write(folder, FolderRecord(procfs.me(), None, ""))


def owner_gone(folder: Path, now: float) -> bool:
    """Is the process that claimed `folder` gone (for a folder without a
    record: is it older than the grace)?"""
    return _owner_dead(folder, read_record(folder), now)


def record_helper(folder: Path, pid: int) -> None:
    """Note the qemu-nbd serving from `folder` (just started by us)."""
    record = read_record(folder)
    helper = procfs.identify(pid)
    if record is not None and helper is not None:
        _write(folder, FolderRecord(record.owner, helper, record.socket))


def remove_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class Swept:
    folder: Path
    stopped: tuple[Holder, ...]  # helpers of the dead owner that were still running
    removed: bool  # False: a helper would not go (the folder stays for the next sweep)


@dataclass(frozen=True)
class _Seen:
    ident: ProcessId
    holder: Holder


def _helpers_naming(socket: str, table: list[_Seen]) -> list[_Seen]:
    """The qemu-nbd processes serving `socket` (an operator's client of
    it, say nbdinfo, is not ours to stop)."""
    return [s for s in table if socket in s.holder.argv and Path(s.holder.argv[0]).name == QEMU_NBD]


def _table(runtime_dir: Path) -> list[_Seen]:
    """Every process whose command line names something in `runtime_dir`."""
    root = str(runtime_dir)
    out = []
    for entry in procfs.PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        ident = procfs.identify(pid)
        argv = procfs.cmdline(pid)
        if ident is not None and any(root in a for a in argv):
            out.append(_Seen(ident, Holder(pid, tuple(argv))))
    return out


async def _stop(seen: _Seen, socket: str) -> bool:
    """SIGKILL the helper if /proc still proves it is the process seen
    (same start time, a command line naming `socket`): the pid may have
    been handed on meanwhile. True once it is gone."""
    now = procfs.identify(seen.ident.pid)
    if now is None or now != seen.ident or socket not in procfs.cmdline(seen.ident.pid):
        return True  # gone (another process may have its pid now)
    with contextlib.suppress(ProcessLookupError):
        os.kill(seen.ident.pid, signal.SIGKILL)
    deadline = time.monotonic() + GONE_WAIT_S
    while procfs.running(seen.ident):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def _owner_dead(folder: Path, record: FolderRecord | None, now: float) -> bool:
    if record is not None:
        return not procfs.running(record.owner)
    try:
        age = now - folder.stat().st_mtime
    except OSError:
        return False  # gone meanwhile
    return age > UNRECORDED_GRACE_S


async def sweep(runtime_dir: Path, now: Callable[[], float] = time.time) -> list[Swept]:
    """Remove the export folders of dead processes below `runtime_dir`,
    after stopping whatever qemu-nbd still serves from them."""
    folders = [f for p in PATTERNS for f in sorted(runtime_dir.glob(p)) if f.is_dir()]
    if not folders:
        return []
    table: list[_Seen] | None = None
    swept = []
    for folder in folders:
        record = read_record(folder)
        if not _owner_dead(folder, record, now()):
            continue
        if table is None:
            table = _table(runtime_dir)
        # The folder's own socket, never a path read from the record: a
        # record names nothing outside its folder.
        socket = str(folder / SOCKET)
        found = _helpers_naming(socket, table)
        gone = [await _stop(s, socket) for s in found]
        if all(gone):
            remove_folder(folder)
        swept.append(Swept(folder, tuple(s.holder for s in found), all(gone)))
    return swept
