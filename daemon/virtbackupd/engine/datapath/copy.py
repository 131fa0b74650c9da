"""The copy engine: moves the data of one disk from a source NBD export to
a target NBD export.

What is copied comes from block status: base:allocation for a full copy,
intersected with a qemu:dirty-bitmap context for an incremental. Holes are
never read. DATA pieces are read into a fixed pool of buffers (memory does
not grow with the disk), hashed (XXH3-128) and written, and
ZERO ranges become WRITE_ZEROES on an overlay or are skipped on a fresh
image. A bounded number of requests is in flight; the target is flushed at
the end; cancelling the copy leaves no task behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import mmap
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from virtbackupd.adapters.nbd.client import Address, NbdClient, connect
from virtbackupd.adapters.nbd.protocol import (
    CONTEXT_BASE_ALLOCATION,
    BlockSize,
    Extent,
    dirty_bitmap_context,
)
from virtbackupd.core import extents
from virtbackupd.core.extents import Frontier, Kind, Range, Read, ReadJoiner
from virtbackupd.errors import NbdProtocolError, first_cause

MiB = 1024 * 1024


class ZeroMode(StrEnum):
    SKIP = "skip"  # fresh target that already reads as zeroes
    WRITE_ZEROES = "write-zeroes"  # overlay: zeroes must hide the backing file
    WRITE_ZEROES_NO_HOLE = "write-zeroes-no-hole"  # ... and stay allocated


class _Endpoint(Protocol):
    """What a copy needs to know of either end."""

    @property
    def name(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def max_request(self) -> int: ...

    @property
    def block_size(self) -> BlockSize: ...


class Target(_Endpoint, Protocol):
    """Where a copy writes: an NBD export (NbdClient) or an image written
    in our own process (adapters.qcow2_writer)."""

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None: ...

    async def write_zeroes(self, offset: int, length: int, no_hole: bool = False) -> None: ...

    async def flush(self) -> None: ...


class Source(_Endpoint, Protocol):
    """Where a copy reads from: an NBD connection (adapters.nbd.client), or
    a qcow2 chain read in our own process (adapters.qcow2_reader)."""

    @property
    def contexts(self) -> Collection[str]: ...

    async def block_status(self, offset: int, length: int) -> Mapping[str, Sequence[Extent]]: ...

    async def read_into(self, offset: int, buf: memoryview) -> None: ...


class CopyWatch(Protocol):
    """Sees what a copy produces, as it goes: every DATA piece it read
    (before it is written) and every ZERO range. Raising stops the copy.
    A restore checks the backup's recorded piece hashes this way."""

    def data(self, offset: int, data: memoryview) -> None: ...

    def zero(self, offset: int, length: int) -> None: ...


@dataclass(frozen=True)
class CopyOptions:
    # Largest READ/WRITE, and the digest's grid (recorded with each disk of a
    # backup, so backups of other grids stay readable). 2 MiB: with 4 MiB
    # requests the page-cache writes of a backup cost twice the system CPU
    # time on this machine kind (docs/performance.md).
    request_size: int = 2 * MiB
    in_flight: int = 16  # concurrent requests; also the number of buffers
    status_window: int = 2048 * MiB  # bytes asked per BLOCK_STATUS
    zero_mode: ZeroMode = ZeroMode.SKIP
    bandwidth: int | None = None  # bytes of data read per second
    # One limit shared by several copies (a domain's disks): what an idle
    # disk does not use, the others may. Wins over `bandwidth`.
    shared_limit: RateLimit | None = None
    progress_interval: float = 0.5
    watch: CopyWatch | None = None
    # Data pieces separated by zero ranges this short (and within one
    # request size) are read in one request; the zeroes between them come
    # along but are neither written nor checked as data. A fragmented disk
    # then copies in a tenth of the requests: each costs the client far
    # more than reading a few zero bytes does (they cost the server no I/O).
    join_gap: int = 256 * 1024
    # False: no digest of what was copied (CopyResult.digest and .pieces
    # empty). Restores: their watch checks the chain's recorded pieces, and
    # hashing every piece a second time cost a fragmented restore ~0.2 s.
    digest: bool = True


@dataclass
class CopyProgress:
    size: int
    position: int = 0  # how far block status has walked
    bytes_read: int = 0
    bytes_written: int = 0
    bytes_zeroed: int = 0
    bytes_found: int = 0  # data the walk has found so far (to be read)

    @property
    def total_estimate(self) -> int:
        """Bytes this copy will read: exact once the walk reached the end;
        before that, what was found extrapolated over the rest of the disk."""
        if self.position >= self.size or self.position <= 0:
            return self.bytes_found
        rest = (self.size - self.position) * self.bytes_found // self.position
        return self.bytes_found + rest


@dataclass(frozen=True)
class CopyResult:
    size: int
    bytes_read: int
    bytes_written: int
    bytes_zeroed: int  # zero ranges written as WRITE_ZEROES
    duration: float
    digest: str  # see core.extents.digest_of
    grid: int
    ranges: tuple[Range, ...] = field(repr=False)  # what was copied, merged
    pieces: bytes = field(repr=False, default=b"")  # the digest's records (.pieces file)


ProgressCallback = Callable[[CopyProgress], None]


class RateLimit:
    """Token bucket over bytes read, with a burst of a quarter second (at
    least one request); sleeping, never busy-waiting."""

    def __init__(self, rate: int, request: int) -> None:
        self.rate = rate
        self.capacity = max(float(request), rate / 4)
        self.allowance = self.capacity
        self.last = time.monotonic()

    async def take(self, n: int) -> None:
        while True:
            now = time.monotonic()
            self.allowance = min(self.capacity, self.allowance + (now - self.last) * self.rate)
            self.last = now
            if self.allowance >= min(n, self.capacity):
                self.allowance -= n
                return
            await asyncio.sleep((min(n, self.capacity) - self.allowance) / self.rate)


async def copy_disk(
    sources: Sequence[Source],
    targets: Sequence[Target],
    *,
    dirty_context: str | None = None,
    options: CopyOptions | None = None,
    progress: ProgressCallback | None = None,
) -> CopyResult:
    """Copy one disk. Every source connection must have base:allocation
    (and `dirty_context`, for an incremental) negotiated. Several source or
    target connections are used round-robin (the caller opens them only
    when the server advertises multi-conn)."""
    opts = options or CopyOptions()
    src, dst = sources[0], targets[0]
    if src.size != dst.size:
        raise ValueError(f"source is {src.size} bytes but target is {dst.size} bytes")
    if CONTEXT_BASE_ALLOCATION not in src.contexts:
        raise ValueError(f"{src.name}: base:allocation was not negotiated")
    if dirty_context is not None and dirty_context not in src.contexts:
        raise ValueError(f"{src.name}: {dirty_context} was not negotiated")
    grid = min(opts.request_size, src.max_request, dst.max_request)
    alignment = max(src.block_size.minimum, dst.block_size.minimum)
    if grid % alignment:
        raise ValueError(f"request size {grid} is not a multiple of the block size {alignment}")
    job = _Copy(sources, targets, dirty_context, opts, progress, grid, alignment)
    return await job.run()


class _Copy:
    # PLR0913: private: built once by the three public entry points
    def __init__(  # noqa: PLR0913 (see above)
        self,
        sources: Sequence[Source],
        targets: Sequence[Target],
        dirty_context: str | None,
        opts: CopyOptions,
        progress: ProgressCallback | None,
        grid: int,
        alignment: int,
    ) -> None:
        self.sources = sources
        self.targets = targets
        self.dirty_context = dirty_context
        self.opts = opts
        self.on_progress = progress
        self.grid = grid
        self.alignment = alignment
        self.size = sources[0].size
        self.state = CopyProgress(self.size)
        # Data to read (extents.Read) or a zero range to write as zeroes.
        self.queue: asyncio.Queue[Read | Range | None] = asyncio.Queue(maxsize=opts.in_flight * 4)
        self.records: list[tuple[int, bytes]] = []
        self.ranges: list[Range] = []
        self.limit = opts.shared_limit or (
            RateLimit(opts.bandwidth, grid) if opts.bandwidth else None
        )
        self.last_report = 0.0

    async def run(self) -> CopyResult:
        started = time.monotonic()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._walk())
                for i in range(self.opts.in_flight):
                    tg.create_task(self._worker(i))
        except BaseExceptionGroup as group:
            raise first_cause(group) from group
        await asyncio.gather(*(t.flush() for t in self.targets))
        self._report(force=True)
        merged = extents.merge(self.ranges)
        pieces, digest = b"", ""
        if self.opts.digest:
            for r in merged:
                if r.kind is Kind.ZERO:
                    record = extents.piece_record(r.offset, r.length, r.kind)
                    self.records.append((r.offset, record))
            pieces = extents.pieces_of(self.records)
            digest = hashlib.sha256(pieces).hexdigest()
        return CopyResult(
            size=self.size,
            bytes_read=self.state.bytes_read,
            bytes_written=self.state.bytes_written,
            bytes_zeroed=self.state.bytes_zeroed,
            duration=time.monotonic() - started,
            digest=digest,
            grid=self.grid,
            ranges=tuple(merged),
            pieces=pieces,
        )

    async def _walk(self) -> None:
        """Producer: block status, window by window, into queued pieces."""
        src = self.sources[0]
        frontier = Frontier(self.size, self.grid, self.alignment)
        pos = 0
        while pos < self.size:
            length = min(self.opts.status_window, self.size - pos)
            length -= length % self.alignment if pos + length < self.size else 0
            status = await src.block_status(pos, length)
            dirty = status[self.dirty_context] if self.dirty_context else None
            found, end = extents.ranges_from_status(status[CONTEXT_BASE_ALLOCATION], dirty)
            if end <= pos:
                raise NbdProtocolError(f"{src.name}: block status at {pos} made no progress")
            pos = end
            await self._enqueue(frontier.feed(found, pos), walked=pos)
        await self._enqueue(frontier.finish(), walked=self.size)
        # On failure the task group cancels the workers instead.
        for _ in range(self.opts.in_flight):
            await self.queue.put(None)

    async def _enqueue(self, ranges: Sequence[Range], walked: int) -> None:
        # The window's data counts as found, and the window as walked,
        # before its pieces queue up (which waits for the copy): the total
        # estimate then never mixes a walked window with unseen data.
        self.state.bytes_found += sum(r.length for r in ranges if r.kind is Kind.DATA)
        self.state.position = walked
        watch = self.opts.watch
        joined = ReadJoiner(self.grid, self.opts.join_gap)
        for r in ranges:
            self.ranges.append(r)
            if watch is not None and r.kind is Kind.ZERO:
                watch.zero(r.offset, r.length)
            if r.kind is Kind.DATA:
                for off, n in extents.data_pieces(r, self.grid):
                    for request in joined.add(off, n):
                        await self.queue.put(request)
                continue
            for request in joined.after(r):
                await self.queue.put(request)
            if self.opts.zero_mode is not ZeroMode.SKIP:
                # WRITE_ZEROES carries no payload: large requests are fine,
                # but stay well inside a 32-bit length.
                for off, n in extents.zero_pieces(r, 1024 * MiB):
                    await self.queue.put(Range(off, n, Kind.ZERO))
        for request in joined.flush():
            await self.queue.put(request)

    async def _worker(self, index: int) -> None:
        src = self.sources[index % len(self.sources)]
        dst = self.targets[index % len(self.targets)]
        # Page-aligned (anonymous mmap): image writers can hand it to the
        # disk with direct I/O (adapters.image_files).
        buf = memoryview(mmap.mmap(-1, self.grid))
        no_hole = self.opts.zero_mode is ZeroMode.WRITE_ZEROES_NO_HOLE
        while (item := await self.queue.get()) is not None:
            if isinstance(item, Range):
                await dst.write_zeroes(item.offset, item.length, no_hole=no_hole)
                self.state.bytes_zeroed += item.length
            else:
                data = sum(n for _, n in item.pieces)
                if self.limit is not None:
                    await self.limit.take(data)
                view = buf[: item.length]
                await src.read_into(item.offset, view)
                self.state.bytes_read += data
                for off, n in item.pieces:
                    await self._write(dst, off, view[off - item.offset : off - item.offset + n])
            self._report()

    async def _write(self, dst: Target, off: int, piece: memoryview) -> None:
        if self.opts.watch is not None:
            self.opts.watch.data(off, piece)
        record = None
        if self.opts.digest:
            hashed = extents.content_hash(piece)
            record = extents.piece_record(off, len(piece), Kind.DATA, hashed)
        await dst.write(off, piece)
        self.state.bytes_written += len(piece)
        if record is not None:  # recorded once written
            self.records.append((off, record))

    def _report(self, force: bool = False) -> None:
        if self.on_progress is None:
            return
        now = time.monotonic()
        if force or now - self.last_report >= self.opts.progress_interval:
            self.last_report = now
            self.on_progress(self.state)


async def _open(
    address: Address, export: str, contexts: Sequence[str], connections: int
) -> list[NbdClient]:
    first = await connect(address, export, meta_contexts=contexts)
    clients = [first]
    try:
        if first.can_multi_conn:
            for _ in range(connections - 1):
                clients.append(await connect(address, export, meta_contexts=contexts))
    except BaseException:
        await asyncio.gather(*(c.close() for c in clients))
        raise
    return clients


@contextlib.asynccontextmanager
async def nbd_sources(
    address: Address, export: str, connections: int = 1, dirty_bitmap: str | None = None
) -> AsyncIterator[list[NbdClient]]:
    """Connections to a source export with base:allocation (and the
    bitmap's context, for an incremental), up to `connections` where the
    server advertises multi-conn; closed after."""
    contexts = [CONTEXT_BASE_ALLOCATION]
    if dirty_bitmap:
        contexts.append(dirty_bitmap_context(dirty_bitmap))
    sources = await _open(address, export, contexts, connections)
    try:
        yield sources
    finally:
        await asyncio.gather(*(c.close() for c in sources))


# PLR0913: the source and target, then keyword-only options with defaults
async def copy_to_export(  # noqa: PLR0913 (see above)
    sources: Sequence[Source],
    target: Address,
    target_export: str,
    *,
    dirty_context: str | None = None,
    connections: int = 1,
    options: CopyOptions | None = None,
    progress: ProgressCallback | None = None,
) -> CopyResult:
    """Copy from `sources` into a target export, its connections opened and
    closed here."""
    targets = await _open(target, target_export, (), connections)
    try:
        return await copy_disk(
            sources, targets, dirty_context=dirty_context, options=options, progress=progress
        )
    finally:
        await asyncio.gather(*(c.close() for c in targets))


# PLR0913: the source and target, then keyword-only options with defaults
async def copy_export(  # noqa: PLR0913 (see above)
    source: Address,
    source_export: str,
    target: Address,
    target_export: str,
    *,
    dirty_bitmap: str | None = None,
    connections: int = 1,
    options: CopyOptions | None = None,
    progress: ProgressCallback | None = None,
) -> CopyResult:
    """Open the connections (up to `connections` per side where the server
    advertises multi-conn), copy, and close them whatever happens."""
    async with nbd_sources(source, source_export, connections, dirty_bitmap) as sources:
        return await copy_to_export(
            sources,
            target,
            target_export,
            dirty_context=dirty_bitmap_context(dirty_bitmap) if dirty_bitmap else None,
            connections=connections,
            options=options,
            progress=progress,
        )


# PLR0913: the source and target, then keyword-only options with defaults
async def copy_into(  # noqa: PLR0913 (see above)
    source: Address,
    source_export: str,
    target: Target,
    *,
    dirty_bitmap: str | None = None,
    connections: int = 1,
    options: CopyOptions | None = None,
    progress: ProgressCallback | None = None,
) -> CopyResult:
    """Like copy_export, into a target of our own process (it stays open)."""
    async with nbd_sources(source, source_export, connections, dirty_bitmap) as sources:
        return await copy_disk(
            sources,
            [target],
            dirty_context=dirty_bitmap_context(dirty_bitmap) if dirty_bitmap else None,
            options=options,
            progress=progress,
        )
