"""Reading a backup image back: the content digest recomputed from what a
view shows, and the bytes an image holds beyond what its digest covers.

A *view* is what an image shows with its whole backing chain, served
read-only by qemu-nbd. Verification, restore and pruning all read views
through here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from virtbackupd.adapters import qemu_img, qemu_nbd
from virtbackupd.adapters.nbd.client import NbdClient, connect
from virtbackupd.adapters.nbd.protocol import CONTEXT_BASE_ALLOCATION, STATE_ZERO
from virtbackupd.adapters.qcow2_reader import check_backing_names
from virtbackupd.core import extents
from virtbackupd.core.extents import Kind, Range

MiB = 1024 * 1024
CHUNK = 4 * MiB  # largest read while comparing or checking zeroes


@contextlib.asynccontextmanager
async def open_view(image: Path, runtime_dir: Path) -> AsyncIterator[NbdClient]:
    """A read-only NBD connection to `image` and its backing chain."""
    await asyncio.to_thread(check_backing_names, image)  # before qemu-nbd opens them
    async with qemu_nbd.serve(
        image, runtime_dir=runtime_dir, readonly=True, options=qemu_nbd.ExportOptions(connections=1)
    ) as export:
        client = await connect(export.address, export.name, meta_contexts=[CONTEXT_BASE_ALLOCATION])
        try:
            yield client
        finally:
            await client.close()


@dataclass(frozen=True)
class ViewDigest:
    digest: str
    not_zero: tuple[tuple[int, int], ...]  # parts of ZERO ranges that hold other bytes
    pieces: bytes = b""  # the records the digest is made of (a .pieces file)


async def digest_view(
    client: NbdClient, ranges: Sequence[Range], grid: int, in_flight: int = 8
) -> ViewDigest:
    """The content digest of `ranges` as `client` shows them, built exactly
    as the copy built it (see core.extents.digest_of). ZERO ranges only
    contribute their place to the digest, so they are also checked to read
    as zeroes (block status first; only what it does not call zero is read)."""
    pieces = list(extents.view_records(ranges, grid))
    data = [(off, n) for off, n, kind in pieces if kind is Kind.DATA]
    hashes = await hashes_at(client, data, in_flight)
    not_zero: list[tuple[int, int]] = []
    records: list[tuple[int, bytes]] = []
    for off, n, kind in pieces:
        if kind is Kind.DATA:
            records.append((off, extents.piece_record(off, n, kind, hashes[off])))
        else:
            records.append((off, extents.piece_record(off, n, kind)))
            not_zero.extend(await non_zero(client, off, n))
    blob = extents.pieces_of(records)
    return ViewDigest(hashlib.sha256(blob).hexdigest(), tuple(sorted(not_zero)), blob)


async def hashes_at(
    client: NbdClient, spans: Sequence[tuple[int, int]], in_flight: int = 8
) -> dict[int, bytes]:
    """The XXH3-128 of the bytes `client` shows at each (offset, length)
    of `spans` (each at most one grid cell), keyed by offset."""
    out: dict[int, bytes] = {}
    todo = iter(list(spans))

    async def worker() -> None:
        for off, n in todo:
            out[off] = extents.content_hash(await client.read(off, n))

    async with asyncio.TaskGroup() as tg:
        for _ in range(min(in_flight, len(spans))):
            tg.create_task(worker())
    return out


async def digest_image(
    image: Path, ranges: Sequence[Range], grid: int, runtime_dir: Path
) -> ViewDigest:
    """:func:`digest_view` of `image`'s view, served for just this."""
    async with open_view(image, runtime_dir) as view:
        return await digest_view(view, ranges, grid)


async def non_zero(client: NbdClient, offset: int, length: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    pos, end = offset, offset + length
    while pos < end:
        status = await client.block_status(pos, min(end - pos, 1024 * MiB))
        found = status[CONTEXT_BASE_ALLOCATION]
        if not found:
            break
        for e in found:
            lo, hi = max(e.offset, pos), min(e.end, end)
            if lo >= hi or e.flags & STATE_ZERO:
                continue
            for off, n in chunks(lo, hi):
                if any(await client.read(off, n)):
                    out.append((off, off + n))
        pos = max(pos, min(found[-1].end, end))
    return out


def chunks(lo: int, hi: int) -> Iterator[tuple[int, int]]:
    while lo < hi:
        n = min(CHUNK, hi - lo)
        yield lo, n
        lo += n


async def allocated_here(image: Path) -> list[tuple[int, int]]:
    """[start, end) byte ranges whose data this image itself holds (not its
    backing files): `qemu-img map` entries at depth 0 with data."""
    out = await qemu_img.run_tool(
        [qemu_img.QEMU_IMG, "map", "-f", "qcow2", "--output=json", str(image)],
        f"qemu-img map {image}",
    )
    spans: list[tuple[int, int]] = []
    for e in json.loads(out):
        if e.get("depth") == 0 and e.get("data"):
            lo, hi = int(e["start"]), int(e["start"]) + int(e["length"])
            if spans and spans[-1][1] == lo:
                spans[-1] = (spans[-1][0], hi)
            else:
                spans.append((lo, hi))
    return spans


async def differing(
    view: NbdClient, base: NbdClient | None, spans: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Chunks of `spans` where `view` differs from `base` (zeroes if None)."""
    out: list[tuple[int, int]] = []
    for lo, hi in spans:
        for off, n in chunks(lo, hi):
            mine = await view.read(off, n)
            theirs = await base.read(off, n) if base is not None else bytes(n)
            if mine != theirs:
                first = next(i for i in range(n) if mine[i] != theirs[i])
                out.append((off + first, off + n))
    return out
