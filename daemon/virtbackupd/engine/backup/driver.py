"""One backup job of one domain, as a pipeline with one driver:

    plan -> undo log and record -> folders -> export (online | offline)
         -> copy -> commit

The driver is the only code that moves the job's state machine
(core.job_state), through :meth:`Job._enter`:

    planned -> exporting -> copying -> committing -> committed -> complete
        \\-----------\\-----------\\-----------\\-----> failed

Everything after the plan is inside one failure path (:meth:`Job._fail`):
the undo log (engine.recovery.undo) is written before the catalogue's record and
before any step it lists, and replaying it is the same code that cleans
up after a dead process (engine.recovery.leftovers). The steps read the job's
frozen context (engine.backup.context) and never call back into the job;
the exports (engine.backup.online, .offline) own their teardown. When
libvirt refuses the parent checkpoint (its bitmaps are broken) the driver
replans a full backup and exports again. Why a job is stopped from
outside is core.stop_reason's decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import structlog

from virtbackupd import logs
from virtbackupd.adapters.libvirt_conn import DomainRef
from virtbackupd.adapters.repository import Repository
from virtbackupd.core.backup_documents import checkpoint_name
from virtbackupd.core.domain_xml import DomainInfo, parse_domain
from virtbackupd.core.job_state import Cleanup, JobMachine, JobState
from virtbackupd.core.plan import Plan
from virtbackupd.core.policy import Level
from virtbackupd.core.records import BackupRecord, BackupStatus
from virtbackupd.core.repository_format.names import new_backup_id
from virtbackupd.core.repository_format.undo import UndoLog
from virtbackupd.core.stop_reason import StopReason, stop_reason
from virtbackupd.engine import scratch, vm_starts
from virtbackupd.engine.backup import commit, offline, online, planning
from virtbackupd.engine.backup.context import BackupContext, JobContext, JobSetup
from virtbackupd.engine.backup.copying import (
    Exported,
    JobProgress,
    ProgressFn,
    Target,
    copy_all,
    targets,
)
from virtbackupd.engine.backup.folders import prepare
from virtbackupd.engine.datapath.copy import CopyResult
from virtbackupd.engine.locks import cancel_requested, clear_cancel
from virtbackupd.engine.recovery.undo import Images, ReplayContext, Undo, replay
from virtbackupd.errors import (
    BackupFailedError,
    CheckpointInconsistentError,
    DomainStartingError,
    VirtBackupError,
)

log = structlog.get_logger("virtbackupd.backup")

_STOPPING = {
    StopReason.OPERATOR: "cancel requested by the operator",
    StopReason.DOMAIN_STARTED: "the domain is being started: the offline backup gives way",
}

Export = Callable[[JobContext, DomainInfo, Plan], AbstractAsyncContextManager[Exported]]
Copied = tuple[dict[str, CopyResult], Plan, dict[str, Target]]


class Job:
    """The driver of one backup. Its own state: the machine, the
    catalogue's record once written, the copy's progress, and why it was
    stopped from outside; everything else is the frozen context."""

    def __init__(
        self,
        ctx: BackupContext,
        ref: DomainRef,
        want: Level | None,
        progress: ProgressFn | None,
        running: bool,
    ) -> None:
        started = ctx.now()
        backup_id = new_backup_id(started)
        checkpoint = checkpoint_name(backup_id)
        self._setup = JobSetup(
            config=ctx.config,
            store=ctx.store,
            libvirt=ctx.libvirt,
            policy=ctx.policy,
            now=ctx.now,
            step=ctx.step,
            ref=ref,
            running=running,
            backup_id=backup_id,
            checkpoint=checkpoint,
            started=started,
            repo=Repository(ctx.policy.target or ctx.config.backup_root),
            log=log.bind(domain=ref.name, backup_id=backup_id, checkpoint=checkpoint),
        )
        self._want = want
        self._on_progress = progress
        self._machine = JobMachine()
        self._job: JobContext | None = None  # once the undo log is written
        self._record: BackupRecord | None = None  # once the catalogue has it
        self._progress: JobProgress | None = None
        self._stop: StopReason | None = None

    @property
    def id(self) -> str:
        return self._setup.backup_id

    def _enter(self, state: JobState) -> None:
        """The one way the job's state moves."""
        self._machine.advance(state)
        self._setup.log.debug("backup state", state=state.value)

    async def run(self) -> BackupRecord:
        """The job, watched by a monitor that publishes its progress and
        honours `virtbackup cancel` (the same clean-up as any failure)."""
        setup = self._setup
        runtime, ref = setup.config.runtime_dir, setup.ref
        clear_cancel(runtime, ref.uuid)  # a request for an earlier job
        body = asyncio.create_task(self._run())
        monitor = asyncio.create_task(self._monitor(body))
        try:
            return await body
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self._stop is not None and not (current and current.cancelling()):
                if self._stop is StopReason.DOMAIN_STARTED:
                    raise DomainStartingError(
                        f"backup {self.id} of {ref.name} {self._stop.value}; "
                        "nothing of it is kept, and it is taken again once the domain runs"
                    ) from None
                raise BackupFailedError(
                    f"backup {self.id} of {ref.name} failed: {self._stop.value}",
                    backup_id=self.id,
                ) from None
            raise
        finally:
            monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await monitor
            clear_cancel(runtime, ref.uuid)

    async def _monitor(self, body: asyncio.Task[BackupRecord], interval: float = 0.2) -> None:
        setup = self._setup
        runtime, ref = setup.config.runtime_dir, setup.ref
        published = 0.0
        while not body.done():
            await asyncio.sleep(interval)
            if self._stop is None:
                asked = cancel_requested(runtime, ref.uuid)
                stop = stop_reason(
                    self._stop,
                    cancel_requested=asked,
                    online=setup.running,
                    domain_starting=not asked
                    and not setup.running
                    and vm_starts.starting(ref.uuid),
                )
                if stop is not None:
                    # The outcome line ("backup cancelled") says why, once.
                    setup.log.debug(_STOPPING[stop])
                    self._stop = stop
                    body.cancel()
            now = time.monotonic()
            p = self._progress
            if p is not None and self._record is not None and now - published >= 1.0:
                published = now
                try:
                    await setup.store.set_progress(
                        self.id, p.done, p.total, p.rate(now), setup.now()
                    )
                except VirtBackupError as exc:  # progress is a nicety; the backup goes on
                    setup.log.warning("cannot publish progress", error=str(exc))

    async def _run(self) -> BackupRecord:
        setup = self._setup
        info = parse_domain(
            await setup.libvirt.xml(setup.ref, inactive=not setup.running),
            f"domain XML of {setup.ref.name}",
        )
        plan = await planning.plan(setup, info, self._want)
        try:
            job = await self._start(plan)
            self._enter(JobState.EXPORTING)
            prepare(job, info)
            results, plan, images = await self._export_and_copy(job, info, plan)
            self._enter(JobState.COMMITTING)
            if not job.running:
                await offline.define_checkpoint(job, plan)
            return await self._commit(job, plan, results, images)
        except BaseException as exc:
            await self._fail(exc)
            if isinstance(exc, VirtBackupError):
                raise BackupFailedError(
                    f"backup {self.id} of {setup.ref.name} failed: {exc}", backup_id=self.id
                ) from exc
            if isinstance(exc, OSError):
                # The host refused a file operation (a read-only or full file
                # system): the operator's to fix, one line, no traceback.
                raise BackupFailedError(
                    f"backup {self.id} of {setup.ref.name} failed: {logs.host_refusal(exc)}",
                    backup_id=self.id,
                ) from exc
            if isinstance(exc, Exception):
                # A bug or an untranslated library error: cleaned up like any
                # failure above; its traceback went to the log in _fail.
                raise BackupFailedError(
                    f"backup {self.id} of {setup.ref.name} failed: internal error: "
                    f"{type(exc).__name__}: {exc}",
                    backup_id=self.id,
                ) from exc
            raise
        finally:
            await _release(setup)

    async def _start(self, plan: Plan) -> JobContext:
        """The undo log, then the catalogue's record: a process that dies
        in between or later leaves a log the next job replays (marking
        the record failed), never a record nothing will clean."""
        setup = self._setup
        ref, store, repo = setup.ref, setup.store, setup.repo
        await store.see_domain(ref.uuid, ref.name, setup.started)
        # The catalogue describes every repository it writes into
        # (catalogue.check_identity): a new one gets its id, recorded,
        # before its first folder (the undo log's), so that a failed first
        # backup leaves no repository the catalogue would take for another's.
        repo.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        await store.record_repository(repo.root, repo.make_identity())
        first = UndoLog(
            self.id, ref.name, ref.uuid, plan.level, setup.started, parent=plan.parent_backup
        )
        job = self._job = JobContext.planned(setup, Undo(repo, first))
        self._record = BackupRecord(
            id=self.id,
            domain_uuid=ref.uuid,
            domain_name=ref.name,
            level=plan.level,
            status=BackupStatus.RUNNING,
            checkpoint=setup.checkpoint,
            parent=plan.parent_backup,
            started=setup.started,
            path=str(repo.final_dir(ref.uuid, self.id)),
            left_out=plan.left_out,
        )
        await store.start_backup(self._record)
        _log_plan(job, plan)
        return job

    async def _export_and_copy(self, job: JobContext, info: DomainInfo, plan: Plan) -> Copied:
        """Online: libvirt's pull job; offline: qemu-nbd on the images. An
        online incremental whose parent checkpoint libvirt refuses is
        replanned as a full and exported again."""
        export: Export = online.export if job.running else offline.export
        try:
            return await self._copy(job, export, info, plan)
        except CheckpointInconsistentError as exc:
            if not job.running or plan.level is not Level.INCREMENTAL:
                raise
            plan = await planning.replan_after_crash(job, info, str(exc))
            self._enter(JobState.EXPORTING)
            return await self._copy(job, export, info, plan)

    async def _copy(self, job: JobContext, export: Export, info: DomainInfo, plan: Plan) -> Copied:
        async with export(job, info, plan) as exported:
            images = targets(plan, exported.sizes, job.partial_dir)
            self._enter(JobState.COPYING)
            progress = self._progress = JobProgress(self.id, job.ref.name)
            results = await copy_all(
                exported.sources,
                images,
                progress,
                bandwidth=job.policy.bandwidth,
                on_progress=self._on_progress,
            )
        return results, plan, images

    async def _commit(
        self,
        job: JobContext,
        plan: Plan,
        results: dict[str, CopyResult],
        images: dict[str, Target],
    ) -> BackupRecord:
        def step(label: str) -> None:
            if label == "renamed":  # the commit point
                self._enter(JobState.COMMITTED)
            if job.step is not None:
                job.step(label)

        await commit.commit(job, plan, results, images, step)
        self._enter(JobState.COMPLETE)
        record = await job.store.backup(self.id)
        assert record is not None
        return record

    async def _fail(self, exc: BaseException) -> None:
        """Every failure edge after the plan ends here; each cleanup step
        runs even if an earlier one fails."""
        setup = self._setup
        reason = str(exc) or type(exc).__name__
        state = self._machine.state.value
        if isinstance(exc, asyncio.CancelledError):
            # Asked for (`virtbackup cancel`, a VM start, the process
            # stopping): the outcome is a notice, not an error.
            reason = self._stop.value if self._stop is not None else "cancelled"
            setup.log.notice("backup cancelled", state=state, reason=reason)
        else:
            # A bug with its traceback; an error of ours in one line, with
            # its context (disk, path, libvirt code) as journal fields.
            if logs.is_bug(exc):
                reason = logs.bug_text(exc)
            elif isinstance(exc, OSError):
                reason = logs.host_refusal(exc)
            logs.failure(setup.log, "backup failed", exc, state=state, error=reason)
        cleanup = self._machine.fail()
        if cleanup is Cleanup.KEEP:
            setup.log.error(
                "the backup is complete in the repository but the catalogue could not record "
                "it; it is recorded at the next start or command",
                path=str(setup.repo.final_dir(setup.ref.uuid, self.id)),
            )
            return
        if self._job is None:
            return  # nothing written yet: no undo log, no record
        # Planned but not exporting yet, the log lists no step: the replay
        # records the failed attempt and drops the log.
        undoing = ReplayContext(
            setup.libvirt,
            setup.store,
            setup.repo,
            setup.ref,
            images=Images.TAKE_HOLD if setup.running else Images.HELD,
            logger=setup.log,
        )
        await replay(undoing, self._job.undo.log, reason, setup.now())


def _log_plan(job: JobContext, plan: Plan) -> None:
    job.log.info(
        "backup planned",
        backup_level=plan.level.value,
        reason=plan.reason,
        disks=list(plan.disks),
        online=job.running,
    )
    # What the policy chose (raw: full, an exclude) is information; a
    # disk left out for another reason (shareable, network) a warning.
    for c in plan.choices:
        say = job.log.info if c.by_policy else job.log.warning
        if c.included and not c.checkpoint:
            say("disk copied in full", disk=c.target, reason=c.reason)
        elif not c.included and not c.removable:
            say("disk left out of the backup", disk=c.target, reason=c.reason)


async def _release(setup: JobSetup) -> None:
    """The job's runtime and scratch folders go whatever the outcome (the
    undo log names them too, for a dead process)."""
    shutil.rmtree(setup.job_dir, ignore_errors=True)
    await scratch.release(setup.scratch_dir)
