"""How a backup job reads the domain's disks: two strategies behind one
interface, chosen once per job (engine.backup).

- :class:`OnlineExport`, a running domain: libvirt's pull-mode backup job
  exports each disk over NBD at the point in time the job starts (with the
  parent checkpoint's dirty bitmap for an incremental) and creates the new
  checkpoint; the guest may be frozen for that instant.
- :class:`OfflineExport`, a shut-off domain: no libvirt job and no
  checkpoint creation are possible; qemu-nbd exports each image read-only,
  our bitmap is added to the images before the copy, and the checkpoint is
  redefined in libvirt before the commit.

Each step that must be taken back on failure is noted in the job's undo
log before it is taken (engine.undo).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from virtbackupd.adapters import qemu_img, qemu_nbd
from virtbackupd.adapters.nbd.client import UnixAddress
from virtbackupd.core.backup_documents import (
    BackupRequest,
    DiskChoice,
    build_documents,
    is_own_checkpoint,
)
from virtbackupd.core.checkpoint_xml import Checkpoint, CheckpointDisk, CheckpointDiskMode
from virtbackupd.core.domain_xml import DomainInfo
from virtbackupd.core.job_state import JobState
from virtbackupd.core.plan import Plan
from virtbackupd.core.policy import Level, Quiesce
from virtbackupd.core.repository_format.undo import UndoKind
from virtbackupd.engine import scratch
from virtbackupd.engine.copy import CopyResult
from virtbackupd.engine.locks import clear_freeze, note_freeze
from virtbackupd.errors import (
    BackupFailedError,
    CheckpointInconsistentError,
    VirtBackupError,
)

if TYPE_CHECKING:
    from virtbackupd.engine.backup import Job

Results = dict[str, CopyResult]


class Export(Protocol):
    async def copy(self, info: DomainInfo, plan: Plan) -> tuple[Results, Plan]:
        """Copy every included disk into the partial folder; returns the
        results and the plan they followed (an online incremental whose
        parent checkpoint libvirt refused becomes a full)."""
        ...

    async def before_commit(self, info: DomainInfo, plan: Plan) -> None:
        """What must hold before the commit (the checkpoint exists)."""
        ...


class OnlineExport:
    def __init__(self, job: Job) -> None:
        self.job = job

    async def copy(self, info: DomainInfo, plan: Plan) -> tuple[Results, Plan]:
        try:
            return await self._export_and_copy(info, plan), plan
        except CheckpointInconsistentError as exc:
            if plan.level is not Level.INCREMENTAL:
                raise
            plan = await self.job.after_crash(info, str(exc))
            return await self._export_and_copy(info, plan), plan

    async def before_commit(self, info: DomainInfo, plan: Plan) -> None:
        pass  # libvirt created the checkpoint when the job began

    async def _stopped(self, wait: float = 3.0) -> bool:
        """Did the domain stop? QEMU closes the export as it goes down, a
        moment before libvirt reports the domain shut off."""
        lv, loop = self.job.ctx.libvirt, asyncio.get_running_loop()
        deadline = loop.time() + wait
        while await lv.is_running(self.job.ref):
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.2)
        return True

    async def _export_and_copy(self, info: DomainInfo, plan: Plan) -> dict[str, CopyResult]:
        lv = self.job.ctx.libvirt
        self.job.enter(JobState.EXPORTING)
        socket = self.job.job_dir / "nbd.sock"
        docs = build_documents(
            info.disks,
            BackupRequest(
                checkpoint=self.job.checkpoint,
                incremental_from=plan.parent_checkpoint,
                socket_path=str(socket),
                scratch_dir=str(self.job.scratch_dir),
                include=self.job.ctx.policy.include_disks,
                exclude=self.job.ctx.policy.exclude_disks,
                raw=self.job.ctx.policy.raw,
            ),
        )
        # Before anything touches the guest: every scratch image with all the
        # space it can need (engine/scratch.py), or a refusal with the numbers.
        sizes = await self._sizes(docs.included)
        files = {
            c.target: scratch.ScratchFile(
                c.target, Path(docs.scratch_path(c.target)), sizes[c.target]
            )
            for c in docs.included
        }
        reserved = await scratch.reserve(
            files, self.job.ctx.config.scratch_dir, self.job.ref.name, info.qemu_user
        )
        self.job.log.debug("scratch space reserved", bytes=reserved)
        self.job.note(UndoKind.LIBVIRT_JOB, socket)
        self.job.note(UndoKind.CHECKPOINT, name=self.job.checkpoint)
        frozen = await self._freeze(info)
        try:
            await lv.backup_begin(
                self.job.ref, docs.backup.to_xml(), docs.checkpoint.to_xml(), reuse_scratch=True
            )
        finally:
            if frozen:
                # The point in time is taken when the job starts: thaw at once.
                # Shielded: a cancel must not leave the guest frozen. On a
                # failed thaw the record stays, and the next run thaws.
                await asyncio.shield(lv.fs_thaw(self.job.ref))
                clear_freeze(self.job.ctx.config.runtime_dir, self.job.ref.uuid)
        self.job.libvirt_job = True
        self.job.log.debug("pull job started")  # bench/first_byte.py times libvirt's share
        await self.job.create_targets(plan, sizes)
        self.job.enter(JobState.COPYING)
        sources = {
            c.target: (
                UnixAddress(str(socket)),
                c.target,
                f"backup-{c.target}" if plan.level is Level.INCREMENTAL and c.checkpoint else None,
            )
            for c in docs.included
        }
        try:
            results = await self.job.copy_all(sources, plan)
        except VirtBackupError as exc:
            if await self._stopped():
                # The export died with QEMU: say why, not how the socket closed.
                raise BackupFailedError(
                    f"{self.job.ref.name} stopped during the backup (the export went away with "
                    f"it: {exc}); nothing of this backup is kept"
                ) from exc
            raise
        # The export must still be ours and alive: a job that someone else
        # ended, or that failed, no longer shows our point in time.
        if not await lv.job_active(self.job.ref):
            failure = await lv.completed_job_failed(self.job.ref)
            raise BackupFailedError(
                f"the libvirt backup job of {self.job.ref.name} ended before the copy finished"
                + (f": {failure}" if failure else "")
            )
        await lv.abort_job(self.job.ref)
        self.job.libvirt_job = False
        return results

    async def _freeze(self, info: DomainInfo) -> bool:
        """Quiesce per policy: `never` skips; `auto` tries where the domain
        has a guest agent channel and warns when its agent does not answer;
        `always` fails the backup when the guest agent cannot freeze."""
        mode = self.job.ctx.policy.quiesce
        if mode is Quiesce.NEVER:
            return False
        if mode is Quiesce.AUTO and not info.agent_channel:
            # Not a problem to warn about on every backup: the domain has no
            # agent to ask (crash-consistent, as documented for `auto`).
            self.job.log.info("no guest agent channel; backing up without quiesce")
            return False
        # Recorded before it is made: if this process dies before the thaw,
        # the next backup of the domain thaws the guest (clean_leftovers).
        note_freeze(self.job.ctx.config.runtime_dir, self.job.ref.uuid)
        try:
            count = await self.job.ctx.libvirt.fs_freeze(self.job.ref)
        except VirtBackupError as exc:
            clear_freeze(self.job.ctx.config.runtime_dir, self.job.ref.uuid)
            if mode is Quiesce.ALWAYS:
                raise BackupFailedError(
                    f"quiesce is 'always' but the guest agent of {self.job.ref.name} cannot "
                    f"freeze its file systems: {exc}"
                ) from exc
            self.job.log.warning(
                "the guest agent did not answer; backing up without quiesce", error=str(exc)
            )
            return False
        if count == 0:
            # An agent with nothing mounted it can freeze (a guest on a
            # ramdisk, file systems it does not know): the backup is
            # crash-consistent, and "frozen count=0" would read as a quiesce.
            self.job.log.info("no guest file system frozen (the agent reported none)")
        else:
            self.job.log.info("guest file systems frozen", count=count)
        return True

    async def _sizes(self, choices: Sequence[DiskChoice]) -> dict[str, int]:
        """Virtual size of each exported disk: what QEMU shows the guest
        (libvirt's block info). Read before the job begins, for the scratch
        reservation; QEMU starts the job only if each disk still has its
        scratch image's size, so it is also the size the export serves. No
        NBD connection of its own: the copy connects anyway, and refuses a
        target whose size differs from the export's."""
        lv = self.job.ctx.libvirt
        return {c.target: await lv.disk_capacity(self.job.ref, c.target) for c in choices}


class OfflineExport:
    def __init__(self, job: Job) -> None:
        self.job = job

    async def copy(self, info: DomainInfo, plan: Plan) -> tuple[Results, Plan]:
        return await self._copy_offline(info, plan), plan

    async def before_commit(self, info: DomainInfo, plan: Plan) -> None:
        await self._redefine_offline_checkpoint(info, plan)

    async def _copy_offline(self, info: DomainInfo, plan: Plan) -> dict[str, CopyResult]:
        """A shut-off domain: no libvirt job and no checkpoint creation are
        possible. Each image is exported read-only by qemu-nbd (with the
        parent checkpoint's bitmap for an incremental). The new checkpoint's
        bitmap is added *before* the copy: a guest started in between is
        then tracked (at worst copied twice), never missed; while qemu-nbd
        holds the image, QEMU cannot open it for writing."""
        self.job.enter(JobState.EXPORTING)
        disks = {d.target: d for d in info.disks}
        sizes: dict[str, int] = {}
        for c in plan.choices:
            if not c.included:
                continue
            path = Path(disks[c.target].source or "")
            sizes[c.target] = (await qemu_img.info(path)).virtual_size
            if c.checkpoint:
                self.job.note(UndoKind.BITMAP, path, self.job.checkpoint)
                await qemu_img.bitmap(path, self.job.checkpoint, add=True)
        await self.job.create_targets(plan, sizes)
        self.job.enter(JobState.COPYING)
        async with contextlib.AsyncExitStack() as stack:
            sources: dict[str, tuple[UnixAddress, str, str | None]] = {}
            for c in plan.choices:
                if not c.included:
                    continue
                dd = disks[c.target]
                inc = plan.level is Level.INCREMENTAL and c.checkpoint
                bitmap = plan.parent_checkpoint if inc else None
                export = await stack.enter_async_context(
                    qemu_nbd.serve(
                        Path(dd.source or ""),
                        runtime_dir=self.job.job_dir,
                        readonly=True,
                        bitmaps=[bitmap] if bitmap else [],
                        options=qemu_nbd.ExportOptions(fmt=dd.driver_type or "raw"),
                    )
                )
                sources[c.target] = (export.address, export.name, bitmap)
            return await self.job.copy_all(sources, plan)

    async def _redefine_offline_checkpoint(self, info: DomainInfo, plan: Plan) -> None:
        """Tell libvirt about the bitmap we added: a redefined checkpoint
        (libvirt cannot create one on an inactive domain)."""
        known = await self.job.ctx.libvirt.checkpoints(self.job.ref)
        own = [c.name for c in known if is_own_checkpoint(c.name)]
        parent = plan.parent_checkpoint or (max(own) if own else None)
        xml = Checkpoint(
            name=self.job.checkpoint,
            parent=parent,
            creation_time=int(self.job.started.timestamp()),
            disks=tuple(
                CheckpointDisk(
                    c.target,
                    CheckpointDiskMode.BITMAP if c.checkpoint else CheckpointDiskMode.NO,
                    bitmap=self.job.checkpoint if c.checkpoint else None,
                )
                for c in plan.choices
            ),
            domain_xml=await self.job.ctx.libvirt.xml(self.job.ref, inactive=True),
        ).to_xml()
        self.job.note(UndoKind.CHECKPOINT, name=self.job.checkpoint)
        await self.job.ctx.libvirt.redefine_checkpoint(self.job.ref, xml)
