"""qemu-storage-daemon exporting backup images read-only as plain files
(its FUSE export): a qcow2 chain becomes a file of the disk's raw bytes,
which loop devices can then show to the kernel. The daemon runs detached
(it outlives the command that started it: a mount stays until `umount`)
and is stopped by its pid."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping
from pathlib import Path

from virtbackupd.adapters.qemu_img import run_tool
from virtbackupd.errors import ProcessError

QSD = "qemu-storage-daemon"


def export_file(state_dir: Path, disk: str) -> Path:
    return state_dir / f"{disk}.raw"


async def start(images: Mapping[str, Path], state_dir: Path) -> int:
    """Export each disk's image (its backing chain with it) read-only as
    `<state_dir>/<disk>.raw`; return the daemon's pid."""
    pidfile = state_dir / "qsd.pid"
    argv = [QSD, "--daemonize", "--pidfile", str(pidfile)]
    for n, (disk, image) in enumerate(sorted(images.items())):
        target = export_file(state_dir, disk)
        target.touch(mode=0o600)
        argv += [
            "--blockdev",
            f"driver=qcow2,node-name=d{n},read-only=on,"
            f"file.driver=file,file.filename={_escape(str(image))}",
            "--export",
            f"type=fuse,id=e{n},node-name=d{n},mountpoint={_escape(str(target))},writable=off",
        ]
    await run_tool(argv, f"{QSD} (exporting {', '.join(sorted(images))})")
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError) as exc:
        raise ProcessError(QSD, f"no pid file {pidfile} after start: {exc}") from exc


async def stop(pid: int | None, timeout: float = 10.0) -> None:
    """Stop the daemon (SIGTERM: it ends its exports and unmounts them)."""
    if pid is None or not alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while alive(pid):
        if loop.time() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        await asyncio.sleep(0.05)


def alive(pid: int) -> bool:
    """Is `pid` a running qemu-storage-daemon (not a recycled pid)?"""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return comm.startswith("qemu-storage") and state != "Z"


def _escape(value: str) -> str:
    """QEMU's option syntax: a comma inside a value is written twice."""
    return value.replace(",", ",,")
