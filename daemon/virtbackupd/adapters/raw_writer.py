"""Writes a new sparse raw image in our own process: the copy engine's
target when a restore asks for raw (in place of a writing qemu-nbd).

Every byte goes where the disk has it; 64 KiB blocks of zeroes are not
written, so they stay holes of the sparse file (which read as zeroes).
Durability is the caller's: the restore fsyncs the file before the rename
that publishes it.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

from virtbackupd.adapters.image_files import ZERO_BLOCK, FileSink, all_zero, pwrite_all
from virtbackupd.adapters.nbd.protocol import BlockSize
from virtbackupd.errors import ImageWriteError

_BLOCK = len(ZERO_BLOCK)
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)


class RawWriter:
    """A new sparse raw image at `path` of `size` bytes."""

    def __init__(self, path: Path, size: int, direct: bool = True) -> None:
        self.path = path
        self.size = size
        self.block_size = BlockSize(minimum=4096, preferred=_BLOCK, maximum=64 << 20)
        self.max_request = self.block_size.maximum
        self._sink = FileSink(path, size, direct)

    @property
    def name(self) -> str:
        return str(self.path)

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        view = memoryview(data)
        self._check(offset, len(view))
        writes: list[tuple[int, memoryview]] = []
        zeroes: list[tuple[int, int]] = []
        for start, end, zero in _runs(offset, view):
            if zero:
                zeroes.append((offset + start, end - start))
            else:
                writes.append((offset + start, view[start:end]))
        # Zeroes are holes; only where this writer wrote before is there
        # anything to punch out. A copy writes each range once: one look for
        # data in the whole range (not one per zero run: on a fragmented
        # disk's many-extent file each look cost ~15 us).
        if zeroes and self._has_data(offset, len(view)):
            for at, length in zeroes:
                if self._has_data(at, length):
                    await self.write_zeroes(at, length)
        await self._sink.put(writes)

    def _has_data(self, offset: int, length: int) -> bool:
        try:
            return os.lseek(self._sink.fd, offset, os.SEEK_DATA) < offset + length
        except OSError:  # ENXIO: no data from there on
            return False

    async def write_zeroes(self, offset: int, length: int, no_hole: bool = False) -> None:
        """Punch a hole (the file is new: only what this writer wrote can be
        there); where the file system cannot, write zeroes."""
        self._check(offset, length)
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        fd = self._sink.fd
        if _libc.fallocate(fd, mode, ctypes.c_int64(offset), ctypes.c_int64(length)) == 0:
            return
        try:
            for pos in range(offset, offset + length, _BLOCK):
                pwrite_all(fd, ZERO_BLOCK[: min(_BLOCK, offset + length - pos)], pos)
        except OSError as exc:
            raise ImageWriteError(self.path, f"cannot write: {exc.strerror}") from exc

    async def flush(self) -> None:
        """Nothing to finish: the caller fsyncs."""

    async def close(self) -> None:
        self._sink.close()

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ImageWriteError(
                self.path, f"write of {length} bytes at {offset} is outside the disk ({self.size})"
            )


@asynccontextmanager
async def new_raw_image(path: Path, size: int, direct: bool = True) -> AsyncIterator[RawWriter]:
    """A RawWriter for a new image, closed on leaving (`direct`: see
    adapters.image_files.FileSink)."""
    writer = RawWriter(path, size, direct)
    try:
        yield writer
    finally:
        await writer.close()


def _runs(offset: int, view: memoryview) -> Iterator[tuple[int, int, bool]]:
    """(start, end, all zero) of each run of `view` (to be written at
    `offset`) that is all zero or not, cut on the image's 64 KiB grid so
    that holes are whole."""
    start, zero = 0, None  # the run being gathered: where, and of what
    pos = 0
    while pos < len(view):
        n = min(len(view) - pos, _BLOCK - (offset + pos) % _BLOCK)
        is_zero = all_zero(view[pos : pos + n])
        if is_zero is not zero:
            if zero is not None and start != pos:
                yield start, pos, zero
            start, zero = pos, is_zero
        pos += n
    if zero is not None and start != pos:
        yield start, pos, zero
