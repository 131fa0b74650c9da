"""Writes a new qcow2 backup image in our own process: the copy engine's
target for backups (in place of a writing qemu-nbd, which was the slowest
part of a full backup: docs/performance.md, docs/data-path.md).

The image is written once, front to back (core.qcow2_layout): data
clusters are appended in the order they arrive, each L2 table gets its
cluster when the first write lands in the 512 MiB it maps, and `flush`
appends the L1 and refcount tables and then writes the header. Until then
the file has no valid header, so nothing can mistake a half-written image
for a backup (and it lives in the backup's .partial folder anyway).
Durability is the commit's: it fsyncs every image before the rename that
makes the backup count.

Guest clusters that are all zeroes are not stored: left unallocated in a
full image, marked "reads as zeroes" in an overlay so that they hide the
backing file.
"""

from __future__ import annotations

import asyncio
import os
from array import array
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from virtbackupd.adapters.image_files import FileSink, all_zero, pwrite_all
from virtbackupd.adapters.nbd.protocol import BlockSize
from virtbackupd.core import qcow2_layout as q
from virtbackupd.errors import ImageWriteError

_NO_ENTRIES = array("Q", bytes(q.CLUSTER))
_ZERO_ENTRIES = array("Q", [q.ZERO]) * q.L2_ENTRIES


class Qcow2Writer:
    """A new image at `path` of `size` bytes, an overlay of `backing` when
    given (stored as given: a relative name stays relative to the image).
    Writes must start on a cluster boundary and end on one or at the disk's
    end: `block_size.minimum` tells the copy engine so."""

    def __init__(
        self,
        path: Path,
        size: int,
        backing: str | None = None,
        backing_format: str = "qcow2",
        cached_tables: int = 64,
        direct: bool = True,
    ) -> None:
        self.path = path
        self.size = size
        self.backing = backing
        self.backing_format = backing_format
        self.block_size = BlockSize(minimum=q.CLUSTER, preferred=q.CLUSTER, maximum=64 << 20)
        self.max_request = self.block_size.maximum
        self.l1_size = q.l1_entries(size)
        self._l1 = [0] * self.l1_size  # host offset of each L2 table, 0: none yet
        self._tables: OrderedDict[int, array[int]] = OrderedDict()  # L1 index -> L2 entries
        self._cached = max(1, cached_tables)  # 64 tables: 4 MiB, mapping 32 GiB
        self._next = q.CLUSTER  # cluster 0 is the header's
        self._finished = False
        # The header cluster stays zero until the end: no valid image before.
        self._sink = FileSink(path, q.CLUSTER, direct)

    # --- what the copy engine sees --------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.path)

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        view = memoryview(data)
        self._check(offset, len(view))
        await self._sink.put(self._allocate(offset, view))

    async def write_zeroes(self, offset: int, length: int, no_hole: bool = False) -> None:
        """Make the range read as zeroes (`no_hole` makes no difference:
        nothing of a backup image is ever preallocated). In an image without
        backing file, clusters never written already do."""
        self._check(offset, length)
        first, end = offset // q.CLUSTER, q.clusters(offset + length)
        for index in range(first // q.L2_ENTRIES, -(-end // q.L2_ENTRIES)):
            if not self._l1[index] and self.backing is None:
                continue
            base = index * q.L2_ENTRIES
            a, b = max(first, base) - base, min(end, base + q.L2_ENTRIES) - base
            table = self._table(index)
            if table[a:b] == _NO_ENTRIES[: b - a] and self.backing is not None:
                table[a:b] = _ZERO_ENTRIES[: b - a]  # the common case, at once
                continue
            for slot in range(a, b):
                if table[slot] or self.backing is not None:
                    table[slot] = q.zeroed(table[slot])

    async def flush(self) -> None:
        """Finish the image: L2 tables, L1 table, refcounts, then the
        header. No write is taken after it."""
        if self._finished:
            return
        try:
            await asyncio.to_thread(self._finish)
        except OSError as exc:
            raise ImageWriteError(self.path, f"cannot finish the image: {exc.strerror}") from exc
        self._finished = True

    async def close(self) -> None:
        self._sink.close()

    # --- mapping --------------------------------------------------------------------
    def _check(self, offset: int, length: int) -> None:
        if self._finished:
            raise ImageWriteError(self.path, "write after the image was finished")
        end = offset + length
        if offset < 0 or length < 0 or end > self.size:
            raise ImageWriteError(
                self.path, f"write of {length} bytes at {offset} is outside the disk ({self.size})"
            )
        if offset % q.CLUSTER or (end % q.CLUSTER and end != self.size):
            raise ImageWriteError(
                self.path, f"write of {length} bytes at {offset} is not cluster-aligned"
            )

    def _allocate(self, offset: int, view: memoryview) -> list[tuple[int, memoryview]]:
        """Map the data's clusters; return the (host offset, bytes) writes.
        Zero clusters are not stored; clusters that follow each other both
        in the data and in the file become one write."""
        runs: list[list[int]] = []  # [host, start in view, length]
        pos = 0
        while pos < len(view):
            piece = view[pos : pos + q.CLUSTER]
            cluster = (offset + pos) // q.CLUSTER
            entry = self._entry(cluster)
            if all_zero(piece):
                if entry or self.backing is not None:
                    self._set(cluster, q.zeroed(entry))
            else:
                host = entry & q.OFFSET_MASK  # written before: again in place
                if not host:
                    host = self._next
                    self._next += q.CLUSTER
                self._set(cluster, q.data_entry(host))
                last = runs[-1] if runs else None
                if last and last[0] + last[2] == host and last[1] + last[2] == pos:
                    last[2] += len(piece)
                else:
                    runs.append([host, pos, len(piece)])
            pos += len(piece)
        return [(host, view[start : start + n]) for host, start, n in runs]

    def _entry(self, cluster: int) -> int:
        index, slot = divmod(cluster, q.L2_ENTRIES)
        if not self._l1[index]:
            return 0
        return self._table(index)[slot]

    def _set(self, cluster: int, entry: int) -> None:
        index, slot = divmod(cluster, q.L2_ENTRIES)
        self._table(index)[slot] = entry

    def _new_table(self, index: int) -> array[int]:
        self._l1[index] = self._next
        self._next += q.CLUSTER
        table = self._tables[index] = array("Q", bytes(q.CLUSTER))
        self._evict()
        return table

    def _table(self, index: int) -> array[int]:
        """L2 table `index`, given its cluster when it had none."""
        if not self._l1[index]:
            return self._new_table(index)
        table = self._tables.get(index)
        if table is None:
            raw = os.pread(self._sink.fd, q.CLUSTER, self._l1[index])
            table = array("Q", raw.ljust(q.CLUSTER, b"\x00"))
            if _LITTLE:
                table.byteswap()
            self._tables[index] = table
            self._evict()
        else:
            self._tables.move_to_end(index)
        return table

    def _evict(self) -> None:
        while len(self._tables) > self._cached:
            index, table = self._tables.popitem(last=False)
            pwrite_all(self._sink.fd, _big_endian(table), self._l1[index])

    # --- the end --------------------------------------------------------------------
    def _finish(self) -> None:
        for index, table in self._tables.items():
            pwrite_all(self._sink.fd, _big_endian(table), self._l1[index])
        self._tables.clear()
        tail = q.tail_layout(self._next // q.CLUSTER, self.l1_size)
        l1 = array("Q", [q.table_entry(h) if h else 0 for h in self._l1])
        pwrite_all(
            self._sink.fd,
            _big_endian(l1).ljust(tail.l1_clusters * q.CLUSTER, b"\x00"),
            tail.l1_offset,
        )
        for i in range(tail.refblocks):
            block = q.refcount_block(i, tail.end_cluster)
            pwrite_all(self._sink.fd, block, tail.refblocks_offset + i * q.CLUSTER)
        pwrite_all(self._sink.fd, q.reftable(tail), tail.reftable_offset)
        header = q.header(self.size, self.l1_size, tail, self.backing, self.backing_format)
        pwrite_all(self._sink.fd, header, 0)


@asynccontextmanager
async def new_image(
    path: Path,
    size: int,
    backing: str | None = None,
    backing_format: str = "qcow2",
    direct: bool = True,
) -> AsyncIterator[Qcow2Writer]:
    """A Qcow2Writer for a new image, closed (finished or not) on leaving
    (`direct`: see adapters.image_files.FileSink)."""
    writer = Qcow2Writer(path, size, backing, backing_format, direct=direct)
    try:
        yield writer
    finally:
        await writer.close()


_LITTLE = array("H", [1]).tobytes() == b"\x01\x00"


def _big_endian(entries: array[int]) -> bytes:
    if not _LITTLE:
        return entries.tobytes()
    swapped = array("Q", entries)
    swapped.byteswap()
    return swapped.tobytes()
