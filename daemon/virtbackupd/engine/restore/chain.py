"""Reading a backup chain for a restore, and checking what is read.

A restore reads one disk of a backup through its chain of layers (each
backup's image, the newest on top). What the copy reads is checked, as it
reads, against the piece hashes every layer of the chain recorded
(core.chain_check): a damaged chain is refused, naming the backup and
disk, unless the operator asks for what can be had (`allow_damaged`).
`verify` reads a chain exactly this way, writing nowhere, while an
interrupted prune is pending (:func:`damage_as_restored`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from virtbackupd.adapters import qemu_img, qemu_nbd
from virtbackupd.adapters.image_files import direct_io
from virtbackupd.adapters.nbd.protocol import BlockSize
from virtbackupd.adapters.qcow2_reader import (
    Qcow2Chain,
    Qcow2ReadError,
    Qcow2UnsupportedError,
    check_backing_names,
)
from virtbackupd.adapters.repository import Repository, read_pieces
from virtbackupd.core.chain_check import (
    ChainCheck,
    ChainDamagedError,
    Damage,
    LayerPiece,
    Seen,
    classify,
)
from virtbackupd.core.extents import Kind, content_hash
from virtbackupd.core.records import DiskRecord
from virtbackupd.core.repository_format.codec import RepositoryFormatError
from virtbackupd.core.repository_format.names import disk_file
from virtbackupd.core.repository_format.storage import StoredBackup
from virtbackupd.core.repository_format.versions import Operation
from virtbackupd.engine.datapath.content import chunks, digest_image, non_zero, open_view
from virtbackupd.engine.datapath.copy import (
    CopyOptions,
    CopyResult,
    Source,
    ZeroMode,
    copy_disk,
    nbd_sources,
)
from virtbackupd.errors import RestoreError, VirtBackupError

log = structlog.get_logger("virtbackupd.restore")

NOTHING_RESTORED = "nothing was restored"

# How a chain's view is copied to where a restore writes it.
CopyFn = Callable[[Sequence[Source], CopyOptions], Awaitable[CopyResult]]


@dataclass(frozen=True)
class _Layer:
    backup_id: str
    image: Path
    # A format-1 layer has no piece hashes: a pass over its view checked it
    # before the copy, and its recorded ranges stand in as pieces without
    # hashes, so that they hide the older layers' pieces the view does not
    # show (a prune may have put a format-2 layer under it).
    pieces: list[LayerPiece]
    checked_before: bool = False


class Chain:
    """The layers one disk of a backup restores through, newest first,
    with their recorded pieces; damage found before the copy (a layer's
    piece file or, for format-1 backups, its digest) is kept here."""

    def __init__(self, folder: Path, disk: str, runtime_dir: Path) -> None:
        self.folder = folder
        self.disk = disk
        self.runtime_dir = runtime_dir
        self.layers: list[_Layer] = []
        self.damage: list[str] = []
        self.size = 0  # the newest image's virtual size: the restored disk's

    async def load(self) -> None:
        chain = Repository.of_backup(self.folder).chain(self.folder, Operation.RESTORE)
        top = self.folder / disk_file(self.disk)
        try:
            # Before qemu-img opens what the images name (a host file, a FIFO).
            await asyncio.to_thread(check_backing_names, top)
        except Qcow2ReadError as exc:
            raise RestoreError(f"backup {self.folder.name} disk {self.disk}: {exc}") from exc
        images = await qemu_img.info_chain(top)
        self.size = images[0].virtual_size
        by_dir = {b.folder.resolve(): b for b in chain}
        for n, info in enumerate(images):
            image = Path(info.filename)
            if not image.is_absolute():
                image = (self.folder / image).resolve()
            stored = by_dir.get(image.resolve().parent)
            record = stored.manifest.disk(self.disk) if stored else None
            if stored is None or record is None:
                raise RestoreError(
                    f"{image} (layer {n} of disk {self.disk}) belongs to no backup of this chain"
                )
        # The recorded pieces are taken in the manifests' order, each layer's
        # from its own image. They agree with the images' chain except while
        # a prune is pending: a merged image in place, its manifest not yet
        # written, skips a layer the manifest still names. That layer's
        # bytes now live in the newer image, and its pieces still describe
        # the view: checked all the same (engine.upkeep.prune keeps every view).
        for stored in chain:
            record = stored.manifest.disk(self.disk)
            if record is None:
                break  # the disk is new above here: its image stands alone
            await self._add(stored, record)
            if record.standalone:
                break  # copied whole: it reads no older layer

    async def _add(self, stored: StoredBackup, record: DiskRecord) -> None:
        n = len(self.layers)
        image = stored.folder / record.path
        try:
            await asyncio.to_thread(check_backing_names, image)
            await qemu_img.check(image)
        except VirtBackupError as exc:
            raise RestoreError(
                f"backup {stored.manifest.id} disk {self.disk} is damaged: {exc}"
            ) from exc
        if record.pieces is None:  # format 1: a pass over this layer first
            got = await digest_image(image, list(record.ranges), record.grid, self.runtime_dir)
            if got.digest != record.digest or got.not_zero:
                self.damage.append(
                    f"backup {stored.manifest.id} disk {self.disk}: its content does not "
                    "match its recorded digest"
                )
            # Its ranges, checked by that pass, hide the older layers'
            # pieces where it wrote (a format-2 layer a prune put under it).
            pieces = [LayerPiece(n, r.offset, r.length, r.kind) for r in record.ranges]
            self.layers.append(_Layer(stored.manifest.id, image, pieces, checked_before=True))
            return
        pieces = []
        try:
            pieces = [
                LayerPiece(n, p.offset, p.length, p.kind, p.content)
                for p in read_pieces(stored.folder, record)
            ]
        except RepositoryFormatError as exc:
            self.damage.append(f"backup {stored.manifest.id} disk {self.disk}: {exc}")
        self.layers.append(_Layer(stored.manifest.id, image, pieces))

    def describe(self, d: Damage) -> str:
        layer = self.layers[d.layer]
        return (
            f"backup {layer.backup_id} disk {self.disk}: bytes {d.offset}-{d.offset + d.length} "
            f"{d.what}"
        )


async def load_chain(folder: Path, disk: str, runtime_dir: Path, allow_damaged: bool) -> Chain:
    chain = Chain(folder, disk, runtime_dir)
    await chain.load()
    if chain.damage and not allow_damaged:
        raise RestoreError(refusal(chain.damage))
    return chain


async def damage_as_restored(folder: Path, disk: str, runtime_dir: Path) -> tuple[str, ...]:
    """What a restore of `disk` of the backup in `folder` would find wrong,
    read exactly as the restore reads it but written nowhere: `verify`
    checks this way while an interrupted prune is pending, when the
    chain's files are between two consistent states and only the views a
    restore reads are promised."""
    chain = await load_chain(folder, disk, runtime_dir, allow_damaged=True)
    nowhere = _Nowhere(chain.size)

    async def copy(sources: Sequence[Source], options: CopyOptions) -> CopyResult:
        return await copy_disk(sources, [nowhere], options=options)

    _, damage = await copy_checked(chain, copy, ZeroMode.SKIP, allow_damaged=True)
    return damage


class _Nowhere:
    """A copy target that keeps nothing (the copy's watcher checks it all)."""

    name = "nowhere"
    block_size = BlockSize(minimum=512, preferred=4096, maximum=64 << 20)
    max_request = 64 << 20

    def __init__(self, size: int) -> None:
        self.size = size

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        pass

    async def write_zeroes(self, offset: int, length: int, no_hole: bool = False) -> None:
        pass

    async def flush(self) -> None:
        pass


async def copy_checked(
    chain: Chain,
    copy: CopyFn,
    zero_mode: ZeroMode,
    allow_damaged: bool,
    outcome: str = NOTHING_RESTORED,
) -> tuple[CopyResult, tuple[str, ...]]:
    """Copy the chain's newest view with `copy`, checking every layer's
    recorded pieces as they are read (core.chain_check). The chain is read
    in our own process (adapters.qcow2_reader); an image using parts of
    qcow2 that reader does not read goes through a read-only qemu-nbd."""
    seen = classify([layer.pieces for layer in chain.layers])
    for kind in (Seen.VISIBLE, Seen.PARTLY):
        seen[kind] = [p for p in seen[kind] if not chain.layers[p.layer].checked_before]
    check = ChainCheck(seen[Seen.VISIBLE], stop_at_first=not allow_damaged)
    options = CopyOptions(zero_mode=zero_mode, watch=check, digest=False)
    source = chain.folder / disk_file(chain.disk)
    try:
        try:
            reader = await asyncio.to_thread(Qcow2Chain.open, source)
        except Qcow2UnsupportedError as exc:
            log.info("reading the backup chain through qemu-nbd", reason=str(exc))
            result = await _copy_through_qemu_nbd(source, copy, options, chain.runtime_dir)
        else:
            try:
                result = await copy([reader], options)
            finally:
                reader.close()
        check.finish()
        await _check_partly_hidden(chain, seen[Seen.PARTLY], check)
    except ChainDamagedError as exc:
        raise RestoreError(refusal([chain.describe(exc.damage)], outcome)) from None
    return result, (*chain.damage, *(chain.describe(d) for d in check.damage))


async def _copy_through_qemu_nbd(
    source: Path,
    copy: CopyFn,
    options: CopyOptions,
    runtime_dir: Path,
) -> CopyResult:
    # Direct I/O where the repository's file system takes it: reading
    # through the page cache ran at 40 % of it here (docs/performance.md)
    # and would push the guests' cached data out.
    direct = direct_io(source)
    async with (
        qemu_nbd.serve(
            source,
            runtime_dir=runtime_dir,
            readonly=True,
            options=qemu_nbd.ExportOptions(
                cache="none" if direct else None, aio="native" if direct else None
            ),
        ) as src,
        nbd_sources(src.address, src.name, connections=4) as sources,
    ):
        return await copy(sources, options)


def refusal(found: Sequence[str], outcome: str = NOTHING_RESTORED) -> str:
    return (
        f"the backup chain is damaged: {found[0]}"
        + (f" (and {len(found) - 1} more)" if len(found) > 1 else "")
        + f"; {outcome}. `virtbackup verify` shows the damage; an older backup may "
        "be whole, or --allow-damaged writes what can be read"
    )


async def _check_partly_hidden(
    chain: Chain, pieces: Sequence[LayerPiece], check: ChainCheck
) -> None:
    """Pieces a newer layer covers in part: checked from their own layer's
    view. A DATA piece is at most a grid cell (about one per edge of a
    newer range is read); a ZERO range can be large, and block status
    tells most of it is zeroes without a read (content.non_zero)."""
    by_layer: dict[int, list[LayerPiece]] = {}
    for p in pieces:
        by_layer.setdefault(p.layer, []).append(p)
    for n, todo in sorted(by_layer.items()):
        async with open_view(chain.layers[n].image, chain.runtime_dir) as view:
            for p in todo:
                check.checked += p.length
                if p.kind is Kind.ZERO:
                    bad = bool(await non_zero(view, p.offset, p.length))
                    what = "should read as zeroes but does not"
                else:
                    data = b"".join([await view.read(o, k) for o, k in chunks(p.offset, p.end)])
                    bad = content_hash(data) != p.content
                    what = "reads differently than recorded"
                if bad:
                    check.damage.append(Damage(n, p.offset, p.length, what))
                    if check.stop_at_first:
                        raise ChainDamagedError(check.damage[-1])
