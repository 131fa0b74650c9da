"""Restoring a backup: standalone images from a backup chain, optionally
defined as a new domain, or written back over a shut-off domain's disks.

Every image is written beside its destination as ``.<name>.partial``,
fsynced and only then renamed into place: a failed or interrupted restore
never leaves a file that looks like a finished one, and never damages
what was there. What the copy reads is checked, as it reads, against the
piece hashes every layer of the chain recorded (core.chain_check): a
damaged chain is refused, naming the backup and disk, unless the
operator asks for what can be had (`allow_damaged`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence, Set
from dataclasses import dataclass
from pathlib import Path

import structlog

from virtbackupd.adapters import block_devices, host_folders, qemu_img, qemu_nbd
from virtbackupd.adapters.image_files import direct_io
from virtbackupd.adapters.libvirt_conn import DomainRef, Libvirt
from virtbackupd.adapters.nbd.protocol import BlockSize
from virtbackupd.adapters.qcow2_reader import (
    Qcow2Chain,
    Qcow2ReadError,
    Qcow2UnsupportedError,
    check_backing_names,
)
from virtbackupd.adapters.qcow2_writer import new_image
from virtbackupd.adapters.raw_writer import new_raw_image
from virtbackupd.adapters.repository import Repository, fsync_path, read_pieces
from virtbackupd.adapters.store import Store
from virtbackupd.core.chain_check import (
    ChainCheck,
    ChainDamagedError,
    Damage,
    LayerPiece,
    Seen,
    classify,
)
from virtbackupd.core.domain_xml import DomainDisk, parse_domain
from virtbackupd.core.extents import Kind, content_hash
from virtbackupd.core.records import CheckpointStatus, DiskRecord
from virtbackupd.core.repository_format.codec import RepositoryFormatError
from virtbackupd.core.repository_format.manifest import Manifest
from virtbackupd.core.repository_format.names import disk_file
from virtbackupd.core.repository_format.storage import StoredBackup
from virtbackupd.core.repository_format.versions import Operation
from virtbackupd.engine.content import chunks, digest_image, non_zero, open_view
from virtbackupd.engine.copy import (
    CopyOptions,
    CopyProgress,
    CopyResult,
    Source,
    ZeroMode,
    copy_disk,
    copy_to_export,
    nbd_sources,
)
from virtbackupd.errors import (
    DefineRefusedError,
    DomainNotFoundError,
    InputError,
    RestoreError,
    UnknownRestorePointError,
    VirtBackupError,
)

log = structlog.get_logger("virtbackupd.restore")

FORMATS = ("qcow2", "raw")
NOTHING_RESTORED = "nothing was restored"

ProgressFn = Callable[[str, CopyProgress], None]


@dataclass(frozen=True)
class RestoredDisk:
    disk: str
    path: Path
    fmt: str
    result: CopyResult
    damage: tuple[str, ...] = ()  # with allow_damaged: what did not check out
    partial: Path | None = None  # written, not yet renamed to `path`


def disks_of(manifest: Manifest, wanted: Sequence[str]) -> list[str]:
    have = [d.disk for d in manifest.disks]
    unknown = sorted(set(wanted) - set(have))
    if unknown:
        raise UnknownRestorePointError(
            f"backup {manifest.id} has no disk {', '.join(unknown)} (it has {', '.join(have)})"
        )
    return [d for d in have if not wanted or d in wanted]


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


class _Chain:
    """The layers one disk of a backup restores through, newest first,
    with their recorded pieces; damage found before the copy (a layer's
    piece file or, for format-1 backups, its digest) is kept here."""

    def __init__(self, folder: Path, disk: str) -> None:
        self.folder = folder
        self.disk = disk
        self.layers: list[_Layer] = []
        self.damage: list[str] = []
        self.size = 0  # the newest image's virtual size: the restored disk's

    async def load(self, runtime_dir: Path) -> None:
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
        # the view: checked all the same (engine.prune keeps every view).
        for stored in chain:
            record = stored.manifest.disk(self.disk)
            if record is None:
                break  # the disk is new above here: its image stands alone
            await self._add(stored, record, runtime_dir)
            if record.standalone:
                break  # copied whole: it reads no older layer

    async def _add(self, stored: StoredBackup, record: DiskRecord, runtime_dir: Path) -> None:
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
            got = await digest_image(image, list(record.ranges), record.grid, runtime_dir)
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


async def restore_image(
    folder: Path,
    disk: str,
    target: Path,
    fmt: str,
    runtime_dir: Path,
    progress: Callable[[CopyProgress], None] | None = None,
    allow_damaged: bool = False,
) -> RestoredDisk:
    """A standalone, sparse `fmt` image of what `disk` of the backup in
    `folder` shows, checked against every layer's recorded pieces as it is
    copied (no pass of its own), written and fsynced beside `target` as
    ``.<name>.partial``: :func:`_publish` renames it once every disk of the
    restore is written (all or nothing)."""
    if fmt not in FORMATS:
        raise RestoreError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    chain = await load_chain(folder, disk, runtime_dir, allow_damaged)
    size = chain.size
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        # Written in our own process, as backups are (docs/data-path.md).
        # Through the page cache: measured faster for restores than direct
        # writes (adapters.image_files).
        opener = (
            new_image(partial, size, direct=False)
            if fmt == "qcow2"
            else new_raw_image(partial, size, direct=False)
        )
        async with opener as writer:

            async def copy(sources: Sequence[Source], options: CopyOptions) -> CopyResult:
                return await copy_disk(sources, [writer], options=options, progress=progress)

            result, damage = await _copy_checked(
                chain, copy, ZeroMode.SKIP, runtime_dir, allow_damaged
            )
        fsync_path(partial)
        host_folders.set_owner(partial, mode=0o600)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return RestoredDisk(disk, target, fmt, result, damage, partial)


async def restore_to_device(
    folder: Path,
    disk: str,
    device: Path,
    runtime_dir: Path,
    progress: Callable[[CopyProgress], None] | None = None,
    allow_damaged: bool = False,
) -> RestoredDisk:
    """Write what `disk` of the backup in `folder` shows straight onto the
    block `device` (checked by the caller: not in use), checked against
    every layer's recorded pieces as it goes. Zero ranges are written as
    zeroes (the device held other data), which qemu-nbd turns into
    discards where the device supports them; bytes beyond the disk's size
    are left alone."""
    chain = await load_chain(folder, disk, runtime_dir, allow_damaged)
    size = chain.size
    have = block_devices.device_size(device)
    if have < size:
        raise RestoreError(
            f"{device} is {have} bytes, smaller than disk {disk} ({size} bytes); nothing written"
        )
    dst = qemu_nbd.serve(
        device,
        runtime_dir=runtime_dir,
        readonly=False,
        options=qemu_nbd.ExportOptions(
            fmt="raw",
            cache="none",
            extra=["--discard=unmap"],
            size=size if have > size else None,
        ),
    )

    async def copy(sources: Sequence[Source], options: CopyOptions) -> CopyResult:
        async with dst as d:
            return await copy_to_export(
                sources, d.address, d.name, connections=4, options=options, progress=progress
            )

    result, damage = await _copy_checked(
        chain,
        copy,
        ZeroMode.WRITE_ZEROES,
        runtime_dir,
        allow_damaged,
        f"the restore stopped there, and {device} holds a partial copy: do not use it",
    )
    fsync_path(device)
    return RestoredDisk(disk, device, "raw", result, damage)


async def load_chain(folder: Path, disk: str, runtime_dir: Path, allow_damaged: bool) -> _Chain:
    chain = _Chain(folder, disk)
    await chain.load(runtime_dir)
    if chain.damage and not allow_damaged:
        raise RestoreError(_refusal(chain.damage))
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

    _, damage = await _copy_checked(chain, copy, ZeroMode.SKIP, runtime_dir, allow_damaged=True)
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


async def _copy_checked(
    chain: _Chain,
    copy: Callable[[Sequence[Source], CopyOptions], Awaitable[CopyResult]],
    zero_mode: ZeroMode,
    runtime_dir: Path,
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
            result = await _copy_through_qemu_nbd(source, copy, options, runtime_dir)
        else:
            try:
                result = await copy([reader], options)
            finally:
                reader.close()
        check.finish()
        await _check_partly_hidden(chain, seen[Seen.PARTLY], check, runtime_dir)
    except ChainDamagedError as exc:
        raise RestoreError(_refusal([chain.describe(exc.damage)], outcome)) from None
    return result, (*chain.damage, *(chain.describe(d) for d in check.damage))


async def _copy_through_qemu_nbd(
    source: Path,
    copy: Callable[[Sequence[Source], CopyOptions], Awaitable[CopyResult]],
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


async def _restore_all(
    folder: Path,
    jobs: Sequence[tuple[str, Path, str]],
    runtime_dir: Path,
    progress: ProgressFn | None,
    allow_damaged: bool,
) -> list[RestoredDisk]:
    """Every (disk, target, format) written first, then all renamed into
    place: a refused or failed restore leaves none of its images, and
    replaces nothing that was there."""
    written: list[RestoredDisk] = []
    try:
        for disk, target, fmt in jobs:
            written.append(
                await restore_image(
                    folder, disk, target, fmt, runtime_dir, of_disk(progress, disk), allow_damaged
                )
            )
    except BaseException:
        for r in written:
            if r.partial is not None:
                r.partial.unlink(missing_ok=True)
        raise
    return written


def _publish(r: RestoredDisk, like: os.stat_result | None = None) -> None:
    """Rename a written image into place (with `like`'s owner and mode)."""
    assert r.partial is not None
    if like is not None:  # keep the image's owner and mode for libvirt/QEMU
        host_folders.set_owner(r.partial, (like.st_uid, like.st_gid), like.st_mode & 0o7777)
    r.partial.rename(r.path)
    fsync_path(r.path.parent)


def _refusal(found: Sequence[str], outcome: str = NOTHING_RESTORED) -> str:
    return (
        f"the backup chain is damaged: {found[0]}"
        + (f" (and {len(found) - 1} more)" if len(found) > 1 else "")
        + f"; {outcome}. `virtbackup verify` shows the damage; an older backup may "
        "be whole, or --allow-damaged writes what can be read"
    )


async def _check_partly_hidden(
    chain: _Chain, pieces: Sequence[LayerPiece], check: ChainCheck, runtime_dir: Path
) -> None:
    """Pieces a newer layer covers in part: checked from their own layer's
    view. A DATA piece is at most a grid cell (about one per edge of a
    newer range is read); a ZERO range can be large, and block status
    tells most of it is zeroes without a read (content.non_zero)."""
    by_layer: dict[int, list[LayerPiece]] = {}
    for p in pieces:
        by_layer.setdefault(p.layer, []).append(p)
    for n, todo in sorted(by_layer.items()):
        async with open_view(chain.layers[n].image, runtime_dir) as view:
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


def check_target_folder(to: Path) -> None:
    """Refuse, before anything is read or written, a --to that cannot hold
    the restored images: a file, or a place under /proc, /sys or /dev."""
    real = to.resolve()
    if host_folders.on_pseudo_fs(real):
        raise InputError(f"--to {to}: not a folder for images (a kernel pseudo file system)")
    if real.exists() and not real.is_dir():
        raise InputError(
            f"--to {to}: not a folder (restore writes one image per disk into a folder)"
        )
    # A folder to be made below a file can never be: input, not a failure.
    above = next((p for p in real.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise InputError(f"--to {to}: {above} is not a folder, so no folder can be made below it")


async def restore_to_dir(
    folder: Path,
    disks: Sequence[str],
    to: Path,
    fmt: str,
    runtime_dir: Path,
    force: bool = False,
    progress: ProgressFn | None = None,
    allow_damaged: bool = False,
    before_publish: Callable[[Sequence[RestoredDisk]], Awaitable[None]] | None = None,
) -> list[RestoredDisk]:
    """``<to>/<disk>.<fmt>`` for each disk of the backup in `folder`.
    `before_publish` runs once every image is written, before any is
    renamed into place (`--define` defines the domain there): if it
    fails, the written images are removed and nothing is replaced."""
    check_target_folder(to)
    targets = {d: to / f"{d}.{fmt}" for d in disks}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not force:
        raise RestoreError(f"{', '.join(existing)} exists; give --force to replace it")
    # 0711: QEMU (another user) must reach the images of a --define'd
    # domain; the images themselves are 0600 until libvirt labels them.
    try:
        # 0711 whatever the umask: QEMU reaches the images.
        host_folders.make_passable(to, trusted=False)
    except OSError as exc:
        raise RestoreError(f"--to {to}: cannot create the folder: {exc.strerror}") from exc
    jobs = [(disk, target, fmt) for disk, target in targets.items()]
    out = await _restore_all(folder, jobs, runtime_dir, progress, allow_damaged)
    try:
        if before_publish is not None:
            await before_publish(out)
    except BaseException as exc:
        for r in out:
            if r.partial is not None:
                r.partial.unlink(missing_ok=True)
        if isinstance(exc, DefineRefusedError):
            raise DefineRefusedError(
                f"{exc}; the images this restore wrote were removed, {NOTHING_RESTORED}"
            ) from exc
        raise
    for r in out:
        _publish(r)
        log.info("disk restored", disk=r.disk, path=str(r.path), bytes=r.result.bytes_written)
    return out


async def running_user(lv: Libvirt, paths: Set[Path]) -> tuple[str, Path] | None:
    """A running domain with one of `paths` (files or devices) as a disk,
    and which path: nothing a domain runs on may be written over."""
    wanted = {p.resolve(): p for p in paths}
    for ref in await lv.domains():
        try:
            if not await lv.is_running(ref):
                continue
            xml = await lv.xml(ref)
        except DomainNotFoundError:
            continue  # undefined since the listing: it runs on nothing
        info = parse_domain(xml, f"domain XML of {ref.name}")
        for d in info.disks:
            if d.source and (hit := wanted.get(Path(d.source).resolve())) is not None:
                return ref.name, hit
    return None


async def restore_in_place(
    lv: Libvirt,
    store: Store,
    ref: DomainRef,
    folder: Path,
    disks: Sequence[str],
    runtime_dir: Path,
    progress: ProgressFn | None = None,
    allow_damaged: bool = False,
) -> list[RestoredDisk]:
    """Write the backup over the domain's own disks, each in its own
    format, then remove every checkpoint: their bitmaps described images
    that are gone, so the next backup must be full. Disk images are
    written beside and renamed (all or nothing); a block-device disk is
    written onto its device as `--to-device` writes it, after every image
    is written, and only once every device was checked (a block device,
    large enough, in use by nothing)."""
    if await lv.is_running(ref):
        raise RestoreError(f"domain {ref.name} is running; --in-place needs it shut off")
    info = parse_domain(await lv.xml(ref, inactive=True), f"domain XML of {ref.name}")
    jobs = []
    devices: list[tuple[str, Path]] = []
    for disk in disks:
        dd = info.disk(disk)
        if dd is None or dd.source is None or dd.source_type not in ("file", "block"):
            raise RestoreError(
                f"domain {ref.name} has no file or block-device disk {disk} to restore over"
            )
        fmt = dd.driver_type or "raw"
        if dd.source_type == "block":
            if fmt != "raw":
                raise RestoreError(
                    f"disk {disk} of {ref.name} is {fmt} on block device {dd.source}; "
                    "only raw block devices are restored onto"
                )
            devices.append((disk, await _writable_device(lv, folder, disk, Path(dd.source))))
            continue
        if fmt not in FORMATS:
            raise RestoreError(
                f"disk {disk} of {ref.name} is {fmt}; only qcow2 and raw are restored"
            )
        jobs.append((disk, Path(dd.source), fmt))
    out = await _restore_all(folder, jobs, runtime_dir, progress, allow_damaged)
    try:
        for disk, device in devices:
            out.append(
                await restore_to_device(
                    folder, disk, device, runtime_dir, of_disk(progress, disk), allow_damaged
                )
            )
    except BaseException:
        for r in out:
            if r.partial is not None:
                r.partial.unlink(missing_ok=True)
        raise
    for r in out:
        if r.partial is not None:
            _publish(r, r.path.stat() if r.path.exists() else None)
        log.info("disk restored in place", domain=ref.name, disk=r.disk, path=str(r.path))
    await forget_checkpoints(lv, store, ref, info_disks=list(info.disks))
    return out


async def _writable_device(lv: Libvirt, folder: Path, disk: str, source: Path) -> Path:
    """The block device `source` of `disk`, refused before anything is
    written unless the disk fits on it and nothing uses it."""
    device = block_devices.check_block_device(source)
    user = await running_user(lv, {device})
    if user is not None:
        raise RestoreError(f"{source} (disk {disk}) is a disk of running domain {user[0]}")
    why = block_devices.in_use(device)
    if why is not None:
        raise RestoreError(f"{source} (disk {disk}) is in use: {why}; {NOTHING_RESTORED}")
    size = (await qemu_img.info_chain(folder / disk_file(disk)))[0].virtual_size
    have = block_devices.device_size(device)
    if have < size:
        raise RestoreError(
            f"{source} is {have} bytes, smaller than disk {disk} ({size} bytes); {NOTHING_RESTORED}"
        )
    return device


async def forget_checkpoints(
    lv: Libvirt, store: Store, ref: DomainRef, info_disks: Sequence[DomainDisk]
) -> None:
    """Drop all of the domain's checkpoints: libvirt's metadata, the
    bitmaps left in images that were not restored, and the store's trust."""
    cps = await lv.checkpoints(ref)
    for cp in cps:
        await lv.delete_checkpoint(ref, cp.name, metadata_only=True)
    names = {cp.name for cp in cps}
    for dd in info_disks:
        if dd.driver_type != "qcow2" or not dd.source or dd.source_type != "file":
            continue
        image = Path(dd.source)
        for bitmap in sorted(await qemu_img.bitmap_names(image) & names):
            await qemu_img.bitmap(image, bitmap, remove=True)
    for stored in await store.checkpoints(ref.uuid):
        if stored.status is CheckpointStatus.ACTIVE:
            # Not "deleted": the next backup's reason names the restore, not a crash.
            await store.set_checkpoint_status(ref.uuid, stored.name, CheckpointStatus.OVERWRITTEN)


def of_disk(progress: ProgressFn | None, disk: str) -> Callable[[CopyProgress], None] | None:
    return (lambda p: progress(disk, p)) if progress else None
