"""The export of a running domain: libvirt's pull-mode backup job exports
each disk over NBD at the point in time the job starts (with the parent
checkpoint's dirty bitmap for an incremental) and creates the new
checkpoint; the guest may be frozen for that instant.

:func:`export` opens the sources (scratch space reserved, the guest
frozen and thawed, the libvirt job begun) and, once the copy is done,
checks that the job is still ours and alive and ends it. Each step that
must be taken back on failure is written to the job's undo log before it
is taken: on any failure the libvirt job and the new checkpoint are the
undo log's to take back (engine.recovery.undo), which also serves after a dead
process. It reads the job's context and never calls back into the job."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from virtbackupd.adapters.nbd.client import UnixAddress
from virtbackupd.core.backup_documents import BackupRequest, DiskChoice, build_documents
from virtbackupd.core.domain_xml import DomainInfo
from virtbackupd.core.plan import Plan
from virtbackupd.core.policy import Level, Quiesce
from virtbackupd.core.repository_format.undo import UndoKind
from virtbackupd.engine import scratch
from virtbackupd.engine.backup.context import JobContext
from virtbackupd.engine.backup.copying import Exported, Source
from virtbackupd.engine.locks import clear_freeze, note_freeze
from virtbackupd.errors import BackupFailedError, VirtBackupError


@contextlib.asynccontextmanager
async def export(job: JobContext, info: DomainInfo, plan: Plan) -> AsyncIterator[Exported]:
    """The domain's disks exported by a libvirt pull job for the body's
    copy. A libvirt that refuses the parent checkpoint raises
    CheckpointInconsistentError here, before anything is exported."""
    lv = job.libvirt
    socket = job.job_dir / "nbd.sock"
    docs = build_documents(
        info.disks,
        BackupRequest(
            checkpoint=job.checkpoint,
            incremental_from=plan.parent_checkpoint,
            socket_path=str(socket),
            scratch_dir=str(job.scratch_dir),
            include=job.policy.include_disks,
            exclude=job.policy.exclude_disks,
            raw=job.policy.raw,
        ),
    )
    # Before anything touches the guest: every scratch image with all the
    # space it can need (engine/scratch.py), or a refusal with the numbers.
    sizes = await _sizes(job, docs.included)
    files = {
        c.target: scratch.ScratchFile(c.target, Path(docs.scratch_path(c.target)), sizes[c.target])
        for c in docs.included
    }
    reserved = await scratch.reserve(files, job.config.scratch_dir, job.ref.name, info.qemu_user)
    job.log.debug("scratch space reserved", bytes=reserved)
    job.note(UndoKind.LIBVIRT_JOB, socket)
    job.note(UndoKind.CHECKPOINT, name=job.checkpoint)
    frozen = await _freeze(job, info)
    try:
        await lv.backup_begin(
            job.ref, docs.backup.to_xml(), docs.checkpoint.to_xml(), reuse_scratch=True
        )
    finally:
        if frozen:
            # The point in time is taken when the job starts: thaw at once.
            # Shielded: a cancel must not leave the guest frozen. On a
            # failed thaw the record stays, and the next run thaws.
            await asyncio.shield(lv.fs_thaw(job.ref))
            clear_freeze(job.config.runtime_dir, job.ref.uuid)
    job.log.debug("pull job started")  # bench/first_byte.py times libvirt's share
    incremental = plan.level is Level.INCREMENTAL
    sources = {
        c.target: Source(
            UnixAddress(str(socket)),
            c.target,
            f"backup-{c.target}" if incremental and c.checkpoint else None,
        )
        for c in docs.included
    }
    try:
        yield Exported(sources, sizes)
    except VirtBackupError as exc:
        if await _stopped(job):
            # The export died with QEMU: say why, not how the socket closed.
            raise BackupFailedError(
                f"{job.ref.name} stopped during the backup (the export went away with "
                f"it: {exc}); nothing of this backup is kept"
            ) from exc
        raise
    # The export must still be ours and alive: a job that someone else
    # ended, or that failed, no longer shows our point in time.
    if not await lv.job_active(job.ref):
        failure = await lv.completed_job_failed(job.ref)
        raise BackupFailedError(
            f"the libvirt backup job of {job.ref.name} ended before the copy finished"
            + (f": {failure}" if failure else "")
        )
    await lv.abort_job(job.ref)


async def _stopped(job: JobContext, wait: float = 3.0) -> bool:
    """Did the domain stop? QEMU closes the export as it goes down, a
    moment before libvirt reports the domain shut off."""
    lv, loop = job.libvirt, asyncio.get_running_loop()
    deadline = loop.time() + wait
    while await lv.is_running(job.ref):
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


async def _freeze(job: JobContext, info: DomainInfo) -> bool:
    """Quiesce per policy: `never` skips; `auto` tries where the domain
    has a guest agent channel and warns when its agent does not answer;
    `always` fails the backup when the guest agent cannot freeze."""
    mode = job.policy.quiesce
    if mode is Quiesce.NEVER:
        return False
    if mode is Quiesce.AUTO and not info.agent_channel:
        # Not a problem to warn about on every backup: the domain has no
        # agent to ask (crash-consistent, as documented for `auto`).
        job.log.info("no guest agent channel; backing up without quiesce")
        return False
    # Recorded before it is made: if this process dies before the thaw,
    # the next backup of the domain thaws the guest (clean_leftovers).
    note_freeze(job.config.runtime_dir, job.ref.uuid)
    try:
        count = await job.libvirt.fs_freeze(job.ref)
    except VirtBackupError as exc:
        clear_freeze(job.config.runtime_dir, job.ref.uuid)
        if mode is Quiesce.ALWAYS:
            raise BackupFailedError(
                f"quiesce is 'always' but the guest agent of {job.ref.name} cannot "
                f"freeze its file systems: {exc}"
            ) from exc
        job.log.warning(
            "the guest agent did not answer; backing up without quiesce", error=str(exc)
        )
        return False
    if count == 0:
        # An agent with nothing mounted it can freeze (a guest on a
        # ramdisk, file systems it does not know): the backup is
        # crash-consistent, and "frozen count=0" would read as a quiesce.
        job.log.info("no guest file system frozen (the agent reported none)")
    else:
        job.log.info("guest file systems frozen", count=count)
    return True


async def _sizes(job: JobContext, choices: Sequence[DiskChoice]) -> dict[str, int]:
    """Virtual size of each exported disk: what QEMU shows the guest
    (libvirt's block info). Read before the job begins, for the scratch
    reservation; QEMU starts the job only if each disk still has its
    scratch image's size, so it is also the size the export serves. No
    NBD connection of its own: the copy connects anyway, and refuses a
    target whose size differs from the export's."""
    return {c.target: await job.libvirt.disk_capacity(job.ref, c.target) for c in choices}
