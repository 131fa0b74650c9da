"""Restoring a backup: standalone images from a backup chain, optionally
defined as a new domain, or written back over a shut-off domain's disks.

Every image is written beside its destination as ``.<name>.partial``,
checked against the backup with `qemu-img compare`, fsynced and only
then renamed into place: a failed or interrupted restore never leaves a
file that looks like a finished one, and never damages what was there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from virtbackupd.adapters import qemu_img, qemu_nbd
from virtbackupd.adapters.libvirt_conn import DomainRef, Libvirt
from virtbackupd.adapters.store import Store
from virtbackupd.core.domain_xml import parse_domain
from virtbackupd.core.records import CheckpointStatus
from virtbackupd.core.restored_domain import RestoredImage, restored_domain_xml
from virtbackupd.engine import repository
from virtbackupd.engine.copy import CopyOptions, CopyProgress, CopyResult, ZeroMode, copy_export
from virtbackupd.errors import RestoreError, UnknownRestorePointError, VirtBackupError

log = structlog.get_logger("virtbackupd.restore")

FORMATS = ("qcow2", "raw")

ProgressFn = Callable[[str, CopyProgress], None]


@dataclass(frozen=True)
class RestoredDisk:
    disk: str
    path: Path
    fmt: str
    result: CopyResult


def disks_of(manifest: Mapping[str, Any], wanted: Sequence[str]) -> list[str]:
    have = [str(d["name"]) for d in manifest["disks"]]
    unknown = sorted(set(wanted) - set(have))
    if unknown:
        raise UnknownRestorePointError(
            f"backup {manifest['id']} has no disk {', '.join(unknown)} (it has {', '.join(have)})"
        )
    return [d for d in have if not wanted or d in wanted]


async def restore_image(
    source: Path,
    target: Path,
    fmt: str,
    runtime_dir: Path,
    progress: Callable[[CopyProgress], None] | None = None,
) -> CopyResult:
    """A standalone, sparse `fmt` image of `source`'s view at `target`."""
    if fmt not in FORMATS:
        raise RestoreError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    for image in await qemu_img.info_chain(source):
        try:
            await qemu_img.check(Path(image.filename))
        except VirtBackupError as exc:
            raise RestoreError(f"backup image {image.filename} is damaged: {exc}") from exc
    size = (await qemu_img.info(source)).virtual_size
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        await qemu_img.create(partial, size, fmt=fmt)
        async with (
            qemu_nbd.serve(source, runtime_dir=runtime_dir, readonly=True) as src,
            # cache=unsafe: no flush per request; the file is fsynced below.
            qemu_nbd.serve(
                partial, runtime_dir=runtime_dir, fmt=fmt, readonly=False, cache="unsafe"
            ) as dst,
        ):
            result = await copy_export(
                src.address,
                src.name,
                dst.address,
                dst.name,
                connections=4,
                options=CopyOptions(zero_mode=ZeroMode.SKIP),
                progress=progress,
            )
        repository.fsync_path(partial)
        await _check_identical(source, partial, fmt)
        partial.chmod(0o600)
        partial.rename(target)
        repository.fsync_path(target.parent)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return result


async def restore_to_dir(
    folder: Path,
    disks: Sequence[str],
    to: Path,
    fmt: str,
    runtime_dir: Path,
    force: bool = False,
    progress: ProgressFn | None = None,
) -> list[RestoredDisk]:
    """``<to>/<disk>.<fmt>`` for each disk of the backup in `folder`."""
    targets = {d: to / f"{d}.{fmt}" for d in disks}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not force:
        raise RestoreError(f"{', '.join(existing)} exists; give --force to replace it")
    # 0711: QEMU (another user) must reach the images of a --define'd
    # domain; the images themselves are 0600 until libvirt labels them.
    to.mkdir(parents=True, exist_ok=True, mode=0o711)
    out = []
    for disk, target in targets.items():
        source = folder / repository.disk_file(disk)
        result = await restore_image(source, target, fmt, runtime_dir, _of_disk(progress, disk))
        log.info("disk restored", disk=disk, path=str(target), bytes=result.bytes_written)
        out.append(RestoredDisk(disk, target, fmt, result))
    return out


async def define_restored(
    lv: Libvirt, folder: Path, name: str, restored: Sequence[RestoredDisk], force: bool
) -> tuple[DomainRef, tuple[str, ...]]:
    """Define `name` from the backup's saved domain XML, on the restored
    images. An existing domain of that name is replaced only with `force`,
    and never while it runs."""
    if await lv.exists(name):
        if not force:
            raise RestoreError(f"a domain named {name!r} exists; give --force to replace it")
        old = await lv.domain(name)
        if await lv.is_running(old):
            raise RestoreError(f"domain {name!r} is running; shut it off to replace it")
        await lv.undefine(old)
    saved = (folder / "domain.xml").read_text()
    images = {r.disk: RestoredImage(r.path, r.fmt) for r in restored}
    new = restored_domain_xml(saved, name, images, str(folder / "domain.xml"))
    ref = await lv.define(new.xml)
    log.info("domain defined from backup", domain=name, uuid=ref.uuid, dropped=new.dropped_disks)
    return ref, new.dropped_disks


async def restore_in_place(
    lv: Libvirt,
    store: Store,
    ref: DomainRef,
    folder: Path,
    disks: Sequence[str],
    runtime_dir: Path,
    progress: ProgressFn | None = None,
) -> list[RestoredDisk]:
    """Write the backup over the domain's own disk images (each in its own
    format), then remove every checkpoint: their bitmaps described images
    that are gone, so the next backup must be full."""
    if await lv.is_running(ref):
        raise RestoreError(f"domain {ref.name} is running; --in-place needs it shut off")
    info = parse_domain(await lv.xml(ref, inactive=True), f"domain XML of {ref.name}")
    out = []
    for disk in disks:
        dd = info.disk(disk)
        if dd is None or dd.source is None or dd.source_type != "file":
            raise RestoreError(f"domain {ref.name} has no file-backed disk {disk} to restore over")
        fmt = dd.driver_type or "raw"
        if fmt not in FORMATS:
            raise RestoreError(
                f"disk {disk} of {ref.name} is {fmt}; only qcow2 and raw are restored"
            )
        target = Path(dd.source)
        before = target.stat() if target.exists() else None
        source = folder / repository.disk_file(disk)
        result = await restore_image(source, target, fmt, runtime_dir, _of_disk(progress, disk))
        if before is not None:  # keep the image's owner and mode for libvirt/QEMU
            os.chown(target, before.st_uid, before.st_gid)
            target.chmod(before.st_mode & 0o7777)
        log.info("disk restored in place", domain=ref.name, disk=disk, path=str(target))
        out.append(RestoredDisk(disk, target, fmt, result))
    await forget_checkpoints(lv, store, ref, info_disks=list(info.disks))
    return out


async def forget_checkpoints(
    lv: Libvirt, store: Store, ref: DomainRef, info_disks: Sequence[Any]
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
            await store.set_checkpoint_status(ref.uuid, stored.name, CheckpointStatus.DELETED)


def _of_disk(progress: ProgressFn | None, disk: str) -> Callable[[CopyProgress], None] | None:
    return (lambda p: progress(disk, p)) if progress else None


async def _check_identical(source: Path, restored: Path, fmt: str) -> None:
    """The final integrity check: what was written reads like the backup."""
    if not await qemu_img.compare(source, restored, "qcow2", fmt):
        raise RestoreError(f"the restored image of {source} differs from the backup")
