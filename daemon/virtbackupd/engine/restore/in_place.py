"""Restoring over what a domain runs on: a backup's disk written onto a
block device (`--to-device`), or over a shut-off domain's own disks
(`--in-place`), whose checkpoints then go: their bitmaps described images
that are gone."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import structlog

from virtbackupd.adapters import block_devices, qemu_img, qemu_nbd
from virtbackupd.adapters.libvirt_conn import DomainRef, Libvirt
from virtbackupd.adapters.repository import fsync_path
from virtbackupd.adapters.store import Store
from virtbackupd.core.domain_xml import DomainDisk, parse_domain
from virtbackupd.core.records import CheckpointStatus
from virtbackupd.core.repository_format.names import disk_file
from virtbackupd.engine.datapath.copy import (
    CopyOptions,
    CopyResult,
    Source,
    ZeroMode,
    copy_to_export,
)
from virtbackupd.engine.restore.chain import NOTHING_RESTORED, copy_checked, load_chain
from virtbackupd.engine.restore.context import (
    FORMATS,
    RestoreContext,
    RestoredDisk,
    running_user,
)
from virtbackupd.engine.restore.images import discard, publish, write_all
from virtbackupd.errors import RestoreError

log = structlog.get_logger("virtbackupd.restore")


async def restore_to_device(ctx: RestoreContext, disk: str, device: Path) -> RestoredDisk:
    """Write what `disk` of the backup in `ctx.folder` shows straight onto the
    block `device` (checked by the caller: not in use), checked against
    every layer's recorded pieces as it goes. Zero ranges are written as
    zeroes (the device held other data), which qemu-nbd turns into
    discards where the device supports them; bytes beyond the disk's size
    are left alone."""
    chain = await load_chain(ctx.folder, disk, ctx.runtime_dir, ctx.allow_damaged)
    size = chain.size
    progress = ctx.progress_of(disk)
    have = block_devices.device_size(device)
    if have < size:
        raise RestoreError(
            f"{device} is {have} bytes, smaller than disk {disk} ({size} bytes); nothing written"
        )
    dst = qemu_nbd.serve(
        device,
        runtime_dir=ctx.runtime_dir,
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

    result, damage = await copy_checked(
        chain,
        copy,
        ZeroMode.WRITE_ZEROES,
        ctx.allow_damaged,
        f"the restore stopped there, and {device} holds a partial copy: do not use it",
    )
    fsync_path(device)
    return RestoredDisk(disk, device, "raw", result, damage)


async def restore_in_place(
    lv: Libvirt, store: Store, ref: DomainRef, ctx: RestoreContext
) -> list[RestoredDisk]:
    """Write the backup (`ctx`) over the domain's own disks, each in its own
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
    for disk in ctx.disks:
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
            devices.append((disk, await _writable_device(lv, ctx.folder, disk, Path(dd.source))))
            continue
        if fmt not in FORMATS:
            raise RestoreError(
                f"disk {disk} of {ref.name} is {fmt}; only qcow2 and raw are restored"
            )
        jobs.append((disk, Path(dd.source), fmt))
    out = await write_all(ctx, jobs)
    try:
        for disk, device in devices:
            out.append(await restore_to_device(ctx, disk, device))
    except BaseException:
        discard(out)
        raise
    for r in out:
        if r.partial is not None:
            publish(r, r.path.stat() if r.path.exists() else None)
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
