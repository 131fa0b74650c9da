"""The end of a backup's pipeline: its manifest from the plan and the
copy's results, committed by engine.upkeep.catalogue (the rename of the partial
folder is the commit point), and the summary line."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Set

from virtbackupd.core.plan import Plan
from virtbackupd.core.records import DiskRecord
from virtbackupd.core.repository_format.documents import (
    CHECKPOINT_XML,
    DOMAIN_XML,
    document_digests,
)
from virtbackupd.core.repository_format.manifest import Manifest
from virtbackupd.core.repository_format.names import disk_file, pieces_file
from virtbackupd.engine.backup.context import JobContext
from virtbackupd.engine.backup.copying import Target
from virtbackupd.engine.datapath.copy import CopyResult
from virtbackupd.engine.upkeep.catalogue import commit_backup


async def commit(
    job: JobContext,
    plan: Plan,
    results: Mapping[str, CopyResult],
    images: Mapping[str, Target],
    step: Callable[[str], None],
) -> None:
    """Write the manifest and commit; `step` is told each durable step
    ("renamed": the commit point)."""
    lv = job.libvirt
    cp_xml = await lv.checkpoint_xml(job.ref, job.checkpoint)
    domain_xml = await lv.xml(job.ref, inactive=True)
    texts = {DOMAIN_XML: domain_xml, CHECKPOINT_XML: cp_xml}
    finished = job.now()
    standalone = {t for t, image in images.items() if image.backing is None}
    disks = disk_records(results, standalone=standalone)
    manifest = Manifest(
        id=job.backup_id,
        domain_name=job.ref.name,
        domain_uuid=job.ref.uuid,
        level=plan.level,
        reason=plan.reason,
        checkpoint=job.checkpoint,
        parent=plan.parent_backup,
        parent_checkpoint=plan.parent_checkpoint,
        started=job.started,
        finished=finished,
        disks=disks,
        left_out=plan.left_out,
        documents=document_digests(texts),
    )
    await commit_backup(
        job.store,
        job.repo,
        manifest,
        texts,
        {name: r.pieces for name, r in results.items()},
        job.undo,
        step,
    )
    read = sum(d.bytes_read for d in disks)
    secs = (finished - job.started).total_seconds()
    job.log.info(
        "backup complete",
        backup_level=plan.level.value,
        bytes_read=read,
        bytes_written=sum(d.bytes_written for d in disks),
        seconds=round(secs, 2),
        mib_per_s=round(read / 2**20 / secs, 1) if secs else None,
    )


def disk_records(
    results: Mapping[str, CopyResult], *, standalone: Set[str]
) -> tuple[DiskRecord, ...]:
    """What the manifest and the catalogue keep of each disk's copy;
    `standalone`: the disks whose image has no backing file (every disk of
    a full backup; in an incremental, a disk copied whole: a raw or
    block-device disk, or one new since the parent)."""
    return tuple(
        DiskRecord(
            disk=name,
            path=disk_file(name),
            virtual_size=r.size,
            bytes_read=r.bytes_read,
            bytes_written=r.bytes_written,
            bytes_zeroed=r.bytes_zeroed,
            digest=r.digest,
            grid=r.grid,
            ranges=r.ranges,
            pieces=pieces_file(name),
            standalone=name in standalone,
        )
        for name, r in sorted(results.items())
    )
