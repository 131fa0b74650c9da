"""Checking a live restore's moved disks against the backup, while the new
domain runs on them.

The image is open read-write by the domain's QEMU, and what is on the file
is not what the guest sees: QEMU's qcow2 cache may hold metadata not yet
written (after the QEMU 7.2 crash of issue 22 the files had dropped their
backing file while the data the stream copied was never written: they
read as zeroes). Reading the file beside QEMU (`qemu-img`/`qemu-nbd -U`)
would check a torn state, and would pass a disk whose data exist only in
a cache that a crash then loses. So the disks are read through QEMU itself:
a libvirt pull-mode backup job exports each disk over NBD as QEMU shows
it, frozen at the job's start (copy-before-write to a scratch file keeps
that point in time while the guest writes on). The job is incremental from
the checkpoint made before the domain first started, so the export also
carries the dirty bitmap of every guest write since: those parts are the
guest's and are not compared (core.live_move).

Every other piece the backup's newest view shows is compared with its
recorded XXH3-128 (DATA) or must read as zeroes (ZERO), as a restore checks
them (core.chain_check): a piece newer layers hide in part is checked in
its own layer's view (the backup is whole there), and the live disk must
equal the backup's newest view over it. A disk passes when nothing differs.

When QEMU ended without closing the images (a crash, a kill), its bitmap
is marked inconsistent and libvirt refuses the incremental job: the guest's
writes are then unknown, every piece is compared, and a difference cannot
be told from lost data; the disk stays unverified and the backup held.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from virtbackupd.adapters import host_folders, qemu_img
from virtbackupd.adapters.libvirt_conn import DomainRef, Libvirt
from virtbackupd.adapters.nbd.client import NbdClient, UnixAddress, connect
from virtbackupd.adapters.nbd.protocol import (
    CONTEXT_BASE_ALLOCATION,
    STATE_DIRTY,
    dirty_bitmap_context,
)
from virtbackupd.core.backup_xml import (
    Backup,
    BackupDisk,
    BackupMode,
    Server,
    Store,
    StoreType,
    Transport,
)
from virtbackupd.core.chain_check import LayerPiece, Seen, classify
from virtbackupd.core.domain_xml import parse_domain
from virtbackupd.core.extents import Kind, content_hash
from virtbackupd.core.live_move import checkable, merge_spans, subtract_spans
from virtbackupd.engine import scratch
from virtbackupd.engine.datapath.content import chunks, non_zero, open_view
from virtbackupd.engine.restore.chain import load_chain
from virtbackupd.errors import CheckpointInconsistentError

log = structlog.get_logger("virtbackupd.live_restore")

STATUS_STEP = 1024 * 1024 * 1024  # block status asked per request
SHOWN = 3  # differences named in a message


@dataclass(frozen=True)
class DiskCheck:
    disk: str
    checked: int  # bytes compared
    guest_bytes: int  # bytes left out: the guest wrote there
    writes_known: bool  # False: the record of guest writes was lost (QEMU crashed)
    differences: tuple[str, ...]  # "bytes A-B read differently than recorded"

    @property
    def ok(self) -> bool:
        return not self.differences


@dataclass(frozen=True)
class MovedDisks:
    """What a check of moved disks compares, and where it works."""

    folder: Path  # the backup's folder in the repository
    disks: tuple[str, ...]
    checkpoint: str | None  # records the guest's writes since its start; None: unknown
    work: Path  # the export's socket and scratch files (QEMU's user must reach it)
    runtime_dir: Path


async def check_moved(lv: Libvirt, ref: DomainRef, moved: MovedDisks) -> list[DiskCheck]:
    """Check `moved.disks` of the running domain `ref` against the backup
    in `moved.folder` through a pull-mode export (see the module's
    docstring). Raises VirtBackupError when the export cannot be made (the
    caller tries again later)."""
    async with _export(lv, ref, moved.disks, moved.checkpoint, moved.work) as (address, known):
        out = []
        for disk in moved.disks:
            out.append(await _check_disk(address, moved.folder, disk, known, moved.runtime_dir))
        return out


@contextlib.asynccontextmanager
async def _export(
    lv: Libvirt, ref: DomainRef, disks: Sequence[str], checkpoint: str | None, work: Path
) -> AsyncIterator[tuple[UnixAddress, bool]]:
    shutil.rmtree(work, ignore_errors=True)
    info = parse_domain(await lv.xml(ref), f"domain XML of {ref.name}")
    await make_work(work, {d: await lv.disk_capacity(ref, d) for d in disks}, info.qemu_user)
    socket = work / "nbd.sock"

    def document(incremental: str | None) -> str:
        return Backup(
            mode=BackupMode.PULL,
            incremental=incremental,
            server=Server(transport=Transport.UNIX, socket=str(socket)),
            disks=tuple(
                BackupDisk(
                    d,
                    backup=True,
                    type=StoreType.FILE,
                    store=Store(path=str(work / f"{d}.scratch")),
                )
                for d in disks
            ),
        ).to_xml()

    known = checkpoint is not None
    try:
        try:
            await lv.backup_begin(ref, document(checkpoint), None, reuse_scratch=True)
        except CheckpointInconsistentError:
            log.warning(
                "live restore: the record of the guest's writes was lost (its QEMU ended "
                "without closing the images: a crash or a kill); every piece is compared",
                domain=ref.name,
            )
            known = False
            await lv.backup_begin(ref, document(None), None, reuse_scratch=True)
        try:
            yield UnixAddress(str(socket)), known
        finally:
            await lv.abort_job(ref)
    finally:
        await scratch.release(work)


async def make_work(
    work: Path, sizes: Mapping[str, int], qemu_user: tuple[int, int] | None
) -> None:
    """Make the export's folder with a scratch file per disk (`sizes`:
    disk -> virtual size), all of it QEMU's in the end.

    QEMU creates the socket here and is handed the scratch files (so the
    folder becomes its own); a link planted at `work` is refused, not
    followed. The folder is root's (0700) while qemu-img runs as root in
    it: QEMU's user could otherwise plant a link at a scratch file's name
    and have root write through it. It is handed over last, once every
    file is made and QEMU's.

    Scratch files of our own, which libvirt reuses: one libvirt creates it
    also deletes at the job's end, before it gives the file its label back
    (libvirt 9.0), and libvirtd logged "unable to stat ... .scratch" and
    "Unable to restore security label" on every check. Ours stay until
    libvirt has given them back (scratch.release). A check is short: no
    reservation as a backup's."""
    host_folders.make_folder(work, parents_mode=0o711, exist_ok=False)
    for d, size in sizes.items():
        path = work / f"{d}.scratch"
        await qemu_img.create(path, size)
        host_folders.set_owner(path, qemu_user)
    host_folders.set_owner(work, qemu_user)


async def _written(client: NbdClient, context: str) -> list[tuple[int, int]]:
    """The guest's writes since the checkpoint: the export's dirty extents."""
    spans: list[tuple[int, int]] = []
    pos = 0
    while pos < client.size:
        found = (await client.block_status(pos, min(STATUS_STEP, client.size - pos)))[context]
        if not found:
            break
        spans += [(e.offset, e.end) for e in found if e.flags & STATE_DIRTY]
        pos = max(pos + 1, found[-1].end)
    return merge_spans(spans)


async def _check_disk(
    address: UnixAddress, folder: Path, disk: str, known: bool, runtime_dir: Path
) -> DiskCheck:
    chain = await load_chain(folder, disk, runtime_dir, allow_damaged=False)
    seen = classify([layer.pieces for layer in chain.layers])
    context = dirty_bitmap_context(f"backup-{disk}")
    contexts = [CONTEXT_BASE_ALLOCATION, context] if known else [CONTEXT_BASE_ALLOCATION]
    found: list[str] = []
    checked = 0
    live = await connect(address, disk, meta_contexts=contexts)
    try:
        written = await _written(live, context) if known else []
        todo = checkable(seen[Seen.VISIBLE], written)
        for p in todo.whole:
            checked += p.length
            what = await _differs(live, p, written)
            if what:
                found.append(f"bytes {p.offset}-{p.end} {what}")
        partly = checkable(seen[Seen.PARTLY], written)
        if partly.whole:
            layers = [(layer.image, layer.backup_id) for layer in chain.layers]
            more, differ = await _check_partly(live, layers, partly.whole, written, runtime_dir)
            checked += more
            found += differ
    finally:
        await live.close()
    guest = todo.guest_bytes + partly.guest_bytes
    return DiskCheck(disk, checked, guest, known, tuple(found))


async def _differs(
    live: NbdClient, p: LayerPiece, written: Sequence[tuple[int, int]]
) -> str | None:
    if p.kind is Kind.ZERO:
        bad = subtract_spans(await non_zero(live, p.offset, p.length), written)
        return "should read as zeroes but do not" if bad else None
    data = b"".join([await live.read(o, n) for o, n in chunks(p.offset, p.end)])
    return "read differently than the backup recorded" if content_hash(data) != p.content else None


async def _check_partly(
    live: NbdClient,
    layers: Sequence[tuple[Path, str]],
    pieces: Sequence[LayerPiece],
    written: Sequence[tuple[int, int]],
    runtime_dir: Path,
) -> tuple[int, list[str]]:
    """Pieces newer layers hide in part: each checked in its own layer's
    view (the backup is whole there), and the live disk compared with the
    backup's newest view over it (outside the guest's writes). The bytes
    compared, and what differs."""
    checked = 0
    found: list[str] = []
    async with open_view(layers[0][0], runtime_dir) as view:
        for p in pieces:
            checked += p.length
            for lo, hi in subtract_spans([(p.offset, p.end)], written):
                for o, n in chunks(lo, hi):
                    if await live.read(o, n) != await view.read(o, n):
                        found.append(f"bytes {o}-{o + n} read differently than the backup")
                        break
    by_layer: dict[int, list[LayerPiece]] = {}
    for p in pieces:
        by_layer.setdefault(p.layer, []).append(p)
    for n, todo in sorted(by_layer.items()):
        async with open_view(layers[n][0], runtime_dir) as own:
            for p in todo:
                if p.kind is Kind.ZERO:
                    bad = bool(await non_zero(own, p.offset, p.length))
                else:
                    data = b"".join([await own.read(o, k) for o, k in chunks(p.offset, p.end)])
                    bad = content_hash(data) != p.content
                if bad:
                    found.append(
                        f"bytes {p.offset}-{p.end} of backup {layers[n][1]} read "
                        "differently than recorded (the backup itself is damaged)"
                    )
    return checked, found


def describe(c: DiskCheck) -> str:
    """One line for the journal and `status`."""
    if c.ok:
        guest = f", {c.guest_bytes} bytes the guest wrote left out" if c.guest_bytes else ""
        return f"{c.disk}: {c.checked} bytes equal the backup{guest}"
    more = f" (and {len(c.differences) - SHOWN} more)" if len(c.differences) > SHOWN else ""
    why = (
        ""
        if c.writes_known
        else "; its QEMU crashed, so the guest's writes are unknown and cannot be told apart "
        "from lost data"
    )
    return f"{c.disk}: {'; '.join(c.differences[:SHOWN])}{more}{why}"
