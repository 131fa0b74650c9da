"""qemu-nbd exports on Unix sockets, owned by async context managers.

An export is "ready" only once an NBD handshake succeeded within a deadline;
the process is always stopped on exit (also on cancellation), and its stderr
is kept for the error message.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from virtbackupd.adapters import nbd_folders, procfs
from virtbackupd.adapters.nbd.client import UnixAddress, connect
from virtbackupd.adapters.qemu_img import spawn_helper
from virtbackupd.errors import NbdError, ProcessError

QEMU_NBD = "qemu-nbd"


@dataclass(frozen=True)
class Export:
    socket: Path
    name: str

    @property
    def address(self) -> UnixAddress:
        return UnixAddress(str(self.socket))

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.name}?socket={self.socket}"


@dataclass(frozen=True)
class ExportOptions:
    """How qemu-nbd opens and serves an image, beyond what `serve` is
    asked for (a read-only source with bitmaps, or a writable target)."""

    name: str = "disk"  # the export name
    fmt: str = "qcow2"
    connections: int = 4  # -e: clients at once
    cache: str | None = None  # --cache=MODE (none: O_DIRECT)
    aio: str | None = None  # --aio=MODE
    extra: Sequence[str] = ()  # further qemu-nbd flags
    size: int | None = None  # serve only the first `size` bytes
    ready_timeout: float = 30.0  # seconds until an NBD handshake must succeed


def _argv(
    image: Path, socket: Path, readonly: bool, bitmaps: Sequence[str], opts: ExportOptions
) -> list[str]:
    # -t: serve until stopped (not just the first client); -e: connections.
    argv = [QEMU_NBD, "-t", "-k", str(socket), "-x", opts.name, "-e", str(opts.connections)]
    if readonly:
        argv.append("-r")
    for b in bitmaps:
        argv += ["-B", b]
    if opts.cache:
        argv.append(f"--cache={opts.cache}")
    if opts.aio:
        argv.append(f"--aio={opts.aio}")
    if opts.size is not None:
        # Only the first `size` bytes (a block device larger than the disk).
        path = str(image).replace(",", ",,")
        return [
            *argv,
            *opts.extra,
            "--image-opts",
            f"driver={opts.fmt},size={opts.size},file.filename={path}",
        ]
    return [*argv, "-f", opts.fmt, *opts.extra, str(image)]


@contextlib.asynccontextmanager
async def serve(
    image: Path,
    *,
    runtime_dir: Path,
    readonly: bool = True,
    bitmaps: Sequence[str] = (),
    options: ExportOptions = ExportOptions(),
) -> AsyncIterator[Export]:
    """Export `image` with qemu-nbd on a socket in a private directory under
    `runtime_dir`: a read-only source (with `bitmaps` as
    qemu:dirty-bitmap:NAME contexts) or a writable target. The folder
    records us and the qemu-nbd (adapters.nbd_folders), so that if we are
    killed the next command removes both."""
    private = nbd_folders.new_folder(runtime_dir)
    socket = private / nbd_folders.SOCKET
    stderr_path = private / "stderr"
    argv = _argv(image, socket, readonly, bitmaps, options)
    try:
        proc = await spawn_helper(argv, stderr_path)
    except BaseException:
        nbd_folders.remove_folder(private)
        raise
    nbd_folders.record_helper(private, proc.pid)
    export = Export(socket, options.name)
    ready = False
    try:
        await _wait_ready(proc, export, options.ready_timeout, stderr_path)
        ready = True
        yield export
    finally:
        await _stop(proc, ready)
        message = _tail(stderr_path)
        nbd_folders.remove_folder(private)
    if proc.returncode not in (0, -15):
        raise ProcessError(
            f"qemu-nbd {image}",
            f"exited with {proc.returncode}: {message}",
        )


def _tail(path: Path) -> str:
    """qemu-nbd's last words, with whoever holds an image it could not lock."""
    try:
        text = path.read_text(errors="replace").strip()[-2000:]
    except OSError:
        text = ""
    return procfs.name_lock_holders(text) if text else "(no message)"


async def _wait_ready(
    proc: asyncio.subprocess.Process, export: Export, timeout: float, stderr: Path
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Exception | None = None
    while loop.time() < deadline:
        if proc.returncode is not None:
            raise ProcessError(f"qemu-nbd {export.socket}", f"exited early: {_tail(stderr)}")
        if export.socket.exists():
            try:
                client = await connect(export.address, export.name, timeout=5)
            except NbdError as exc:
                last = exc
            else:
                await client.close()
                return
        await asyncio.sleep(0.02)
    raise ProcessError(
        f"qemu-nbd {export.socket}",
        f"not ready after {timeout}s ({last or 'no socket'}): {_tail(stderr)}",
    )


async def _stop(proc: asyncio.subprocess.Process, ready: bool) -> None:
    if proc.returncode is not None:
        return
    if not ready:
        # Still starting: qemu-nbd would lose a SIGTERM (see die_with_parent),
        # and it has served nothing that needs a clean close.
        proc.kill()
        await asyncio.shield(proc.wait())
        return
    proc.terminate()
    try:
        await asyncio.shield(asyncio.wait_for(proc.wait(), 10))
    except TimeoutError:
        proc.kill()
        await proc.wait()
    except asyncio.CancelledError:
        # Never leave the process behind, even when our caller is cancelled.
        proc.kill()
        await asyncio.shield(proc.wait())
        raise
