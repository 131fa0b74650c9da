"""Writing image files from our own process: the part the qcow2 and raw
writers share (adapters.qcow2_writer, adapters.raw_writer).

Data goes to disk with direct I/O (O_DIRECT) where the file system takes
it: measured on this machine kind (docs/performance.md), writing through
the page cache cost five to ten times the system CPU time, and a backup
or restore that fills the host's memory with its pages pushes the guests'
cached data out. Writes that direct I/O cannot take (not aligned to
4 KiB in the file, in memory or in length: metadata, a disk's last
piece) and whole files on a file system without it go through the page
cache, and so do writes of 512 KiB or less (each would wait for the
disk); there, every 64 MiB the last window is sent to disk and the one
before dropped from the cache. Writes go one at a time (concurrent
writes to one file contend for its inode lock, and the waiters spin);
small ones on the event loop's thread, where they cost less than the
hand-over to a worker thread. Durability is the caller's: an fsync
before the rename that publishes the file.

Restores write through the page cache (`direct=False`): reading the
chain with direct I/O from the same disk, their direct writes were the
slower way (docs/performance.md, 2026-12-06: a 4 GiB raw restore 5.8-6.0 s
direct, 4.3 s through the cache, at the same CPU time).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
from collections.abc import Sequence
from pathlib import Path

import structlog

from virtbackupd.core.extents import is_zero
from virtbackupd.errors import ImageWriteError

log = structlog.get_logger("virtbackupd.images")

ZERO_BLOCK = bytes(64 * 1024)
_INLINE_WRITE = 512 * 1024
_WRITEBACK_WINDOW = 64 << 20
_SYNC_FILE_RANGE_WRITE = 2
_libc = ctypes.CDLL(None, use_errno=True)
DIRECT_ALIGN = 4096


def all_zero(piece: memoryview) -> bool:
    """Whether `piece` (at most 64 KiB) is all zero bytes (core.extents.is_zero)."""
    return is_zero(piece)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def direct_io(path: Path) -> bool:
    """Whether the file system of `path` (an existing file) takes O_DIRECT."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC))
    except OSError:
        return False
    return True


def _address(view: memoryview) -> int | None:
    if view.readonly:
        return None
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def aligned_for_direct_io(offset: int, piece: memoryview) -> bool:
    """Whether O_DIRECT takes this transfer: file offset, length and memory
    address all multiples of 4 KiB (the most any device here asks)."""
    address = _address(piece)
    return (
        address is not None
        and not (offset | len(piece) | address) % DIRECT_ALIGN
        and len(piece) > 0
    )


class FileSink:
    """A new file at `path` (created with `size` bytes of zeroes, mode
    0600, replacing any) that takes (offset, bytes) writes as described
    above (`direct`: False writes everything through the page cache, still
    in windows sent to disk and dropped as they fill). `fd` is the file
    through the page cache (metadata, reads); data that can goes past it."""

    def __init__(self, path: Path, size: int, direct: bool = True) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ImageWriteError(path, f"cannot create the image: {exc.strerror}") from exc
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            os.close(self.fd)
            raise ImageWriteError(path, f"cannot size the image: {exc.strerror}") from exc
        self._direct = -1
        if direct and direct_io(path):
            self._direct = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        elif direct:
            log.warning(
                "no direct I/O on this file system: writing through the page cache", path=str(path)
            )
        self._writing = asyncio.Lock()
        self._window = [0, 0, 0]  # lowest offset, highest end, bytes written
        self._previous = (0, 0)  # the window whose writeback began last
        self._settling: asyncio.Future[None] | None = None  # that write-back's start

    async def put(self, writes: Sequence[tuple[int, memoryview]]) -> None:
        async with self._writing:
            for offset, piece in writes:
                try:
                    await self._put(offset, piece)
                except OSError as exc:
                    raise ImageWriteError(self.path, f"cannot write: {exc.strerror}") from exc
            if self._window[2] >= _WRITEBACK_WINDOW:
                lo, hi, _ = self._window
                done, self._previous = self._previous, (lo, hi - lo)
                self._window = [0, 0, 0]
                # In the background: writes go on meanwhile (a fragmented
                # raw restore's write-backs took ~1 s in all, each holding
                # up every write); one at a time.
                if self._settling is not None:
                    await self._settling
                self._settling = asyncio.ensure_future(
                    asyncio.to_thread(_write_back, self.fd, (lo, hi - lo), done)
                )

    async def _put(self, offset: int, piece: memoryview) -> None:
        # Small writes (fragmented disks) through the page cache: one at a
        # time with direct I/O, each would wait for the disk (measured: a
        # fragmented backup 1.5x slower).
        if (
            self._direct >= 0
            and len(piece) > _INLINE_WRITE
            and aligned_for_direct_io(offset, piece)
        ):
            try:
                await asyncio.to_thread(pwrite_all, self._direct, piece, offset)
            except OSError as exc:
                # EINVAL: the device wants more alignment than 4 KiB. The
                # page cache takes it; later writes too.
                if exc.errno != errno.EINVAL:
                    raise
                log.warning("direct I/O refused; writing through the page cache", error=str(exc))
                os.close(self._direct)
                self._direct = -1
            else:
                return
        if len(piece) <= _INLINE_WRITE:
            pwrite_all(self.fd, piece, offset)
        else:
            await asyncio.to_thread(pwrite_all, self.fd, piece, offset)
        self._note(offset, len(piece))

    def _note(self, offset: int, length: int) -> None:
        w = self._window
        if w[2] == 0:
            w[0], w[1] = offset, offset + length
        else:
            w[0], w[1] = min(w[0], offset), max(w[1], offset + length)
        w[2] += length

    def close(self) -> None:
        """Close the file; if a write-back is still starting in its thread
        (a copy that failed or was cancelled), when that thread is done."""
        settling, self._settling = self._settling, None
        fds = (self.fd, self._direct)
        self.fd = self._direct = -1
        if settling is not None and not settling.done():
            settling.add_done_callback(lambda _: _close(fds))
        else:
            _close(fds)


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        if fd >= 0:
            os.close(fd)


def _write_back(fd: int, window: tuple[int, int], done: tuple[int, int]) -> None:
    """Start writing `window` (offset, length) to disk (sync_file_range(2)
    with SYNC_FILE_RANGE_WRITE: no wait), and drop `done`, whose writeback
    began one window earlier, from the page cache (pages not yet written
    stay). A head start and a courtesy only: failures here are ignored,
    the caller's fsync makes the file durable."""
    _libc.sync_file_range(
        fd, ctypes.c_int64(window[0]), ctypes.c_int64(window[1]), _SYNC_FILE_RANGE_WRITE
    )
    if done[1]:
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, done[0], done[1], os.POSIX_FADV_DONTNEED)
