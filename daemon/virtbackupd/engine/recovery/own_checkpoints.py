"""Removing this project's checkpoints and bitmaps from a domain: after a
crash (none can be trusted), for a stray bitmap, and on the operator's
request (`virtbackup forget-checkpoints`, before reverting to an internal
snapshot). Only names with our prefix are ever touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from virtbackupd.adapters import qemu_img
from virtbackupd.adapters.libvirt_conn import DomainRef, Libvirt
from virtbackupd.adapters.store import Store
from virtbackupd.core.backup_documents import is_own_checkpoint
from virtbackupd.core.domain_xml import DomainInfo
from virtbackupd.core.records import BackupStatus, CheckpointStatus
from virtbackupd.errors import VirtBackupError


def qcow2_images(info: DomainInfo) -> list[Path]:
    """The domain's qcow2 file disks: the images that hold its bitmaps."""
    return [
        Path(d.source)
        for d in info.disks
        if d.device == "disk" and d.source and d.source_type == "file" and d.driver_type == "qcow2"
    ]


async def delete_checkpoint(lv: Libvirt, ref: DomainRef, name: str) -> None:
    """Delete with its bitmaps; where the bitmaps are already broken or gone
    (or the domain is shut off), libvirt refuses that, and the metadata
    alone goes (the caller removes bitmaps of a shut-off domain itself)."""
    try:
        await lv.delete_checkpoint(ref, name)
    except VirtBackupError:
        await lv.delete_checkpoint(ref, name, metadata_only=True)


async def forget_all(
    lv: Libvirt,
    store: Store,
    ref: DomainRef,
    info: DomainInfo,
    *,
    running: bool,
    keep: str | None = None,
) -> list[str]:
    """Every checkpoint of ours but `keep` goes, with its bitmaps (deleting
    one re-parents its children onto the others, so after a crash all are
    suspect), and the store marks them deleted: the next backup is full.
    A shut-off domain's images must be held (vm_starts.hold_images).
    Returns the names removed."""
    removed = []
    for cp in await lv.checkpoints(ref):
        if is_own_checkpoint(cp.name) and cp.name != keep:
            await delete_checkpoint(lv, ref, cp.name)
            removed.append(cp.name)
    if not running:
        # libvirt deleted only the metadata: the bitmaps go here.
        for image in qcow2_images(info):
            for name in await qemu_img.bitmap_names(image):
                if is_own_checkpoint(name) and name != keep:
                    await qemu_img.bitmap(image, name, remove=True)
    for rec in await store.checkpoints(ref.uuid):
        if rec.status is CheckpointStatus.ACTIVE and rec.name != keep:
            await store.set_checkpoint_status(ref.uuid, rec.name, CheckpointStatus.DELETED)
    return removed


async def check_shut_off(
    lv: Libvirt,
    store: Store,
    ref: DomainRef,
    info: DomainInfo,
    log: Any,
    keep: str | None = None,
) -> str | None:
    """A shut-off domain's images (held by the caller). A bitmap of ours
    that no libvirt checkpoint names (left by a backup the VM's stop or a
    kill interrupted) is removed: QEMU would track every guest write in it
    forever. If QEMU was killed (host crash, OOM) with the images open, a
    bitmap of ours is still flagged in-use, or the last checkpoint's bitmap
    is missing (QEMU writes a bitmap it created into the image only when it
    closes it): none of our checkpoints can be trusted. All go, and the
    reason is returned (else None): the next backup is full."""
    known = {cp.name for cp in await lv.checkpoints(ref)}
    disks = {d.target: Path(d.source or "") for d in info.disks}
    present: dict[Path, dict[str, frozenset[str]]] = {}
    broken = []
    for image in qcow2_images(info):
        present[image] = flags = await qemu_img.bitmap_flags(image)
        for name in sorted(flags):
            if not is_own_checkpoint(name):
                continue
            if name not in known:
                log.warning(
                    "removing a bitmap of ours that no checkpoint names",
                    image=str(image),
                    bitmap=name,
                )
                await remove_bitmap(image, name)
            elif "in-use" in flags[name]:
                broken.append(f"bitmap {name} in {image.name} left in use")
    complete = await store.backups(ref.uuid, status=BackupStatus.COMPLETE)
    last = complete[-1] if complete else None
    if last is not None and last.checkpoint in known:
        for d in last.disks:
            held = disks.get(d.disk)
            if held in present and last.checkpoint not in present[held]:
                broken.append(f"bitmap {last.checkpoint} missing from {held.name}")
    if not broken:
        return None
    await forget_all(lv, store, ref, info, running=False, keep=keep)
    return (
        f"QEMU did not shut down cleanly ({'; '.join(broken[:3])}): "
        "every checkpoint of ours was removed"
    )


async def remove_bitmap(image: Path, name: str, wait: float = 15.0) -> None:
    """Remove a bitmap from a shut-off domain's image. A dead backup's
    qemu-nbd got SIGTERM when its process died but may still hold the image
    lock for a moment (qemu_img.while_locked)."""

    async def remove() -> None:
        if name in await qemu_img.bitmap_names(image):
            await qemu_img.bitmap(image, name, remove=True)

    await qemu_img.while_locked(remove, wait)
