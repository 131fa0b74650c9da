"""The export of a shut-off domain: no libvirt job and no checkpoint
creation are possible. Each image is exported read-only by qemu-nbd
(with the parent checkpoint's bitmap for an incremental). The new
checkpoint's bitmap is added *before* the copy: a guest started in
between is then tracked (at worst copied twice), never missed; while
qemu-nbd holds the image, QEMU cannot open it for writing. The
checkpoint is redefined in libvirt before the commit
(:func:`define_checkpoint`).

:func:`export` opens the sources and stops its qemu-nbd helpers when the
body is done, whatever happened; a bitmap it added is in the job's undo
log before it is added. It reads the job's context and never calls back
into the job."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from virtbackupd.adapters import qemu_img, qemu_nbd
from virtbackupd.core.backup_documents import is_own_checkpoint
from virtbackupd.core.checkpoint_xml import Checkpoint, CheckpointDisk, CheckpointDiskMode
from virtbackupd.core.domain_xml import DomainInfo
from virtbackupd.core.plan import Plan
from virtbackupd.core.policy import Level
from virtbackupd.core.repository_format.undo import UndoKind
from virtbackupd.engine.backup.context import JobContext
from virtbackupd.engine.backup.copying import Exported, Source


@contextlib.asynccontextmanager
async def export(job: JobContext, info: DomainInfo, plan: Plan) -> AsyncIterator[Exported]:
    """Each included image served read-only by its own qemu-nbd."""
    disks = {d.target: d for d in info.disks}
    sizes: dict[str, int] = {}
    for c in plan.choices:
        if not c.included:
            continue
        path = Path(disks[c.target].source or "")
        sizes[c.target] = (await qemu_img.info(path)).virtual_size
        if c.checkpoint:
            job.note(UndoKind.BITMAP, path, job.checkpoint)
            await qemu_img.bitmap(path, job.checkpoint, add=True)
    async with contextlib.AsyncExitStack() as stack:
        sources: dict[str, Source] = {}
        for c in plan.choices:
            if not c.included:
                continue
            dd = disks[c.target]
            inc = plan.level is Level.INCREMENTAL and c.checkpoint
            bitmap = plan.parent_checkpoint if inc else None
            served = await stack.enter_async_context(
                qemu_nbd.serve(
                    Path(dd.source or ""),
                    runtime_dir=job.job_dir,
                    readonly=True,
                    bitmaps=[bitmap] if bitmap else [],
                    options=qemu_nbd.ExportOptions(fmt=dd.driver_type or "raw"),
                )
            )
            sources[c.target] = Source(served.address, served.name, bitmap)
        yield Exported(sources, sizes)


async def define_checkpoint(job: JobContext, plan: Plan) -> None:
    """Tell libvirt about the bitmap we added: a redefined checkpoint
    (libvirt cannot create one on an inactive domain)."""
    known = await job.libvirt.checkpoints(job.ref)
    own = [c.name for c in known if is_own_checkpoint(c.name)]
    parent = plan.parent_checkpoint or (max(own) if own else None)
    xml = Checkpoint(
        name=job.checkpoint,
        parent=parent,
        creation_time=int(job.started.timestamp()),
        disks=tuple(
            CheckpointDisk(
                c.target,
                CheckpointDiskMode.BITMAP if c.checkpoint else CheckpointDiskMode.NO,
                bitmap=job.checkpoint if c.checkpoint else None,
            )
            for c in plan.choices
        ),
        domain_xml=await job.libvirt.xml(job.ref, inactive=True),
    ).to_xml()
    job.note(UndoKind.CHECKPOINT, name=job.checkpoint)
    await job.libvirt.redefine_checkpoint(job.ref, xml)
