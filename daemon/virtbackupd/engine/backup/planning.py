"""A backup's plan (core.plan) from what libvirt, the catalogue and the
repository say now, and the checkpoints of ours it must set right first:
one libvirt no longer trusts deleted, one libvirt lost redefined."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from virtbackupd.core.checkpoint_xml import for_redefinition
from virtbackupd.core.domain_xml import DomainInfo
from virtbackupd.core.plan import CheckpointView, Plan, plan_backup
from virtbackupd.core.policy import Level
from virtbackupd.core.records import BackupRecord, BackupStatus, CheckpointStatus
from virtbackupd.engine.backup.context import JobSetup
from virtbackupd.engine.recovery import own_checkpoints
from virtbackupd.engine.upkeep.catalogue import standing
from virtbackupd.errors import LibvirtError


async def plan(job: JobSetup, info: DomainInfo, want: Level | None) -> Plan:
    """The job's first plan. A shut-off domain whose bitmaps do not match
    our checkpoints (QEMU was killed) gets a full backup."""
    crashed = None if job.running else await _check_offline_bitmaps(job, info)
    if crashed is not None:
        return replace(await make_plan(job, info, Level.FULL), reason=crashed)
    return await make_plan(job, info, want)


async def replan_after_crash(job: JobSetup, info: DomainInfo, error: str) -> Plan:
    """libvirt refused our parent checkpoint: its bitmaps are broken
    (QEMU was killed). Our checkpoints are forgotten and the backup
    becomes a full one, recorded as such."""
    job.log.warning(
        "checkpoint bitmaps inconsistent; deleting ours, taking a full backup", error=error
    )
    await own_checkpoints.forget_all(
        job.libvirt, job.store, job.ref, info, running=job.running, keep=job.checkpoint
    )
    new = await make_plan(job, info, Level.FULL)
    new = replace(new, reason=f"checkpoint bitmaps inconsistent ({error})")
    await job.store.replan_backup(job.backup_id, new.level, None)
    job.log.info("backup replanned", backup_level=new.level.value, reason=new.reason)
    return new


async def _check_offline_bitmaps(job: JobSetup, info: DomainInfo) -> str | None:
    reason = await own_checkpoints.check_shut_off(
        job.libvirt, job.store, job.ref, info, job.log, keep=job.checkpoint
    )
    if reason is not None:
        job.log.warning("checkpoint bitmaps inconsistent; taking a full backup", reason=reason)
    return reason


async def make_plan(job: JobSetup, info: DomainInfo, want: Level | None) -> Plan:
    lv, store, ref = job.libvirt, job.store, job.ref
    libvirt_cps = await lv.checkpoints(ref)
    stored = await store.checkpoints(ref.uuid)
    sizes: dict[str, int] = {}
    for d in info.disks:
        if d.device == "disk" and d.source:
            try:
                sizes[d.target] = await lv.disk_capacity(ref, d.target)
            except LibvirtError as exc:  # the copy will still check the size it reads
                job.log.warning("cannot read the disk's size", disk=d.target, error=str(exc))
    history = await store.backups(ref.uuid)
    made = plan_backup(
        checkpoint=job.checkpoint,
        disks=info.disks,
        policy=job.policy,
        history=history,
        stored_checkpoints=[cp for cp in stored if cp.status is CheckpointStatus.ACTIVE],
        view=CheckpointView(
            known=frozenset(cp.name for cp in libvirt_cps),
            # Checkpoints we gave up on (bitmaps broken) stay untrusted.
            broken=frozenset(cp.name for cp in stored if cp.status is CheckpointStatus.DELETED),
            overwritten=frozenset(
                cp.name for cp in stored if cp.status is CheckpointStatus.OVERWRITTEN
            ),
        ),
        want=want,
        sizes=sizes,
        repository=str(job.repo.root),
        last_unrestorable=_unrestorable(history),
    )
    known = {cp.name for cp in libvirt_cps}
    for name in made.delete_checkpoints:
        if name in known:
            job.log.warning("deleting a checkpoint of ours that is not trusted", stale=name)
            await own_checkpoints.delete_checkpoint(lv, ref, name)
    current = await lv.xml(ref, inactive=True) if made.redefine else ""
    present = known - set(made.delete_checkpoints)
    for cp in made.redefine:
        job.log.warning("redefining checkpoint libvirt lost", lost=cp.name)
        # The oldest one redefined may name a parent a prune removed since:
        # libvirt refuses a parent it does not know, so it comes back as a
        # root (its bitmap is what an incremental uses; the parent is not).
        xml = for_redefinition(
            cp.xml,
            current,
            f"stored XML of checkpoint {cp.name}",
            keep_parent=lambda parent: parent in present,
        )
        await lv.redefine_checkpoint(ref, xml)
        present.add(cp.name)
    return made


def _unrestorable(history: Sequence[BackupRecord]) -> str | None:
    """Why the newest complete backup's folders cannot be restored, if so."""
    complete = [b for b in history if b.status is BackupStatus.COMPLETE and b.path]
    if not complete:
        return None
    s = standing(Path(complete[-1].path or ""))
    return None if s.restorable else s.why()
