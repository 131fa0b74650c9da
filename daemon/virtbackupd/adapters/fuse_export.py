"""qemu-storage-daemon exporting backup images read-only as plain files
(its FUSE export): a qcow2 chain becomes a file of the disk's raw bytes,
which loop devices can then show to the kernel. For a mount the daemon
runs detached (it outlives the command that started it: a mount stays
until `umount`); for a check it is our child and dies with us
(qemu_img.die_with_parent: a detached process would not). Either way it
is stopped by its pid."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping
from pathlib import Path

from virtbackupd.adapters.qemu_img import run_tool, spawn_helper
from virtbackupd.errors import ProcessError

QSD = "qemu-storage-daemon"


def export_file(state_dir: Path, disk: str) -> Path:
    return state_dir / f"{disk}.raw"


#: Our own (not detached) daemons, to be waited for when they stop.
_children: dict[int, asyncio.subprocess.Process] = {}


async def start(images: Mapping[str, Path], state_dir: Path, *, detached: bool = True) -> int:
    """Export each disk's image (its backing chain with it) read-only as
    `<state_dir>/<disk>.raw`; return the daemon's pid. Not `detached`: the
    daemon dies with us."""
    pidfile = state_dir / "qsd.pid"
    argv = [QSD, *(["--daemonize"] if detached else []), "--pidfile", str(pidfile)]
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
    what = f"{QSD} (exporting {', '.join(sorted(images))})"
    if not detached:
        return await _start_child(argv, pidfile, what)
    await run_tool(argv, what)
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError) as exc:
        raise ProcessError(QSD, f"no pid file {pidfile} after start: {exc}") from exc


async def _start_child(argv: list[str], pidfile: Path, what: str, timeout: float = 30) -> int:
    """The daemon in the foreground, ready once its pid file is written
    (it writes it after its exports are mounted)."""
    stderr_path = pidfile.with_name("qsd.stderr")
    proc = await spawn_helper(argv, stderr_path)
    _children[proc.pid] = proc
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pidfile.exists():
        if proc.returncode is not None or loop.time() > deadline:
            await stop(proc.pid)
            message = stderr_path.read_text(errors="replace").strip()[-2000:]
            raise ProcessError(what, message or f"not ready after {timeout}s")
        await asyncio.sleep(0.02)
    return proc.pid


async def stop(pid: int | None, timeout: float = 10.0) -> None:
    """Stop the daemon (SIGTERM: it ends its exports and unmounts them)."""
    child = _children.pop(pid, None) if pid is not None else None
    if child is not None:
        if child.returncode is None:
            child.terminate()
            try:
                await asyncio.wait_for(child.wait(), timeout)
            except TimeoutError:
                child.kill()
                await child.wait()
        return
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
