"""One backup job of one domain, as a state machine (core.job_state):

    planned -> exporting -> copying -> committing -> complete
        \\-----------\\-----------\\-----------> failed

What a failure must take back is in the job's undo log (engine.undo),
written before each step is taken; ``_fail`` replays it, the same code
that cleans up after a dead process. The commit is engine.catalogue's.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

import structlog

from virtbackupd.adapters import host_folders, qcow2_writer, repository
from virtbackupd.adapters.libvirt_conn import DomainRef, Libvirt
from virtbackupd.adapters.nbd.client import UnixAddress
from virtbackupd.adapters.repository import (
    CHECKPOINT_XML,
    DOMAIN_XML,
    Manifest,
    Repository,
    StepHook,
    UndoKind,
    UndoLog,
    document_digests,
)
from virtbackupd.adapters.store import Store
from virtbackupd.config.daemon import DaemonConfig
from virtbackupd.core.backup_documents import (
    checkpoint_name,
)
from virtbackupd.core.checkpoint_xml import for_redefinition
from virtbackupd.core.domain_xml import DomainInfo, parse_domain
from virtbackupd.core.job_state import Cleanup, JobMachine, JobState
from virtbackupd.core.plan import CheckpointView, Plan, plan_backup
from virtbackupd.core.policy import Level, Policy
from virtbackupd.core.records import (
    BackupRecord,
    BackupStatus,
    CheckpointStatus,
    DiskRecord,
)
from virtbackupd.engine import own_checkpoints, scratch, vm_starts
from virtbackupd.engine.backup_export import Export, OfflineExport, OnlineExport
from virtbackupd.engine.catalogue import commit_backup, standing
from virtbackupd.engine.copy import (
    CopyOptions,
    CopyProgress,
    CopyResult,
    RateLimit,
    ZeroMode,
    copy_into,
)
from virtbackupd.engine.domain_job import domain_job
from virtbackupd.engine.locks import (
    backup_slot,
    cancel_requested,
    clear_cancel,
)
from virtbackupd.engine.prune import finish_interrupted
from virtbackupd.engine.undo import Images, ReplayContext, Undo, replay
from virtbackupd.errors import (
    BackupBusyError,
    BackupFailedError,
    DomainStartingError,
    LibvirtError,
    VirtBackupError,
    first_cause,
)

log = structlog.get_logger("virtbackupd.backup")


class _Cancel(StrEnum):
    """Why a job was cancelled from outside; the value is the reason shown."""

    OPERATOR = "cancelled by the operator"
    DOMAIN_STARTED = "cancelled: the domain was started (a VM start wins over an offline backup)"


@dataclass
class JobProgress:
    """What a running job has read of what it will read, over all disks."""

    backup_id: str
    domain: str
    started: float = field(default_factory=time.monotonic)
    disks: dict[str, CopyProgress] = field(default_factory=dict)

    @property
    def done(self) -> int:
        return sum(p.bytes_read for p in self.disks.values())

    @property
    def total(self) -> int:
        """Exact once every disk's walk has ended; an estimate before."""
        return sum(p.total_estimate for p in self.disks.values())

    def rate(self, now: float | None = None) -> float:
        elapsed = (now if now is not None else time.monotonic()) - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta(self, now: float | None = None) -> float | None:
        rate = self.rate(now)
        if rate <= 0 or self.total < self.done:
            return None
        return (self.total - self.done) / rate


ProgressFn = Callable[[JobProgress], None]


@dataclass
class BackupContext:
    config: DaemonConfig
    store: Store
    libvirt: Libvirt
    policy: Policy
    now: Callable[[], datetime] = lambda: datetime.now(UTC)
    step: StepHook | None = None  # called after each durable commit step (crash tests)


async def backup_domain(
    ctx: BackupContext,
    domain: str,
    want: Level | None = None,
    progress: ProgressFn | None = None,
) -> BackupRecord:
    """Take one backup of `domain` (name or UUID) under its lock."""
    found = await ctx.libvirt.domain(domain)
    repo = Repository(ctx.policy.target or ctx.config.backup_root)
    async with domain_job(
        ctx.config,
        ctx.store,
        repo,
        found.uuid,
        found.name,
        "backup",
        libvirt=ctx.libvirt,
        now=ctx.now,
    ) as job:
        assert job.ref is not None
        ref = job.ref
        running = await ctx.libvirt.is_running(ref)
        if running and await ctx.libvirt.job_active(ref):
            # Another tool's backup (or a migration...) owns the domain's job
            # slot. Say so at once rather than wait for libvirt's job lock.
            raise BackupBusyError(
                f"{ref.name} has a libvirt job running that virtbackupd did not start "
                "(another backup tool?); not disturbing it"
            )
        await _finish_interrupted_prune(ctx, repo, ref)
        slots = ctx.config.max_concurrent_backups
        # Shut off: refused while libvirt starts the domain; from here on a
        # start waits in the hook until this job let go of the images.
        async with (
            backup_slot(
                ctx.config.runtime_dir,
                slots,
                lambda: log.info("waiting for a free backup slot", domain=ref.name, slots=slots),
            ),
            vm_starts.running_or_held(ctx.libvirt, ref) as running,
        ):
            return await Job(ctx, ref, want, progress, running).run()


async def _finish_interrupted_prune(ctx: BackupContext, repo: Repository, ref: DomainRef) -> None:
    """The domain's next backup finishes an interrupted prune, as
    docs/repository-format.md promises (the CLI's as the daemon's), before
    it plans: the chain it builds on is then what the manifests say. A
    replay that fails is logged and the backup goes on: an interrupted
    prune never touches the newest backup's view, which the backup builds
    on, and the next prune tries again."""
    try:
        removed = await finish_interrupted(
            ctx.store,
            repo.domain_dir(ref.uuid),
            ctx.config.runtime_dir,
            ctx.libvirt,
            domain=ref.name,
        )
    except (VirtBackupError, OSError) as exc:
        log.error(
            "could not finish the interrupted prune; backing up anyway",
            domain=ref.name,
            error=str(exc),
        )
        return
    if removed is not None:
        log.info(
            "finished an interrupted prune", domain=ref.name, removed_checkpoints=list(removed)
        )


class Job:
    def __init__(
        self,
        ctx: BackupContext,
        ref: DomainRef,
        want: Level | None,
        progress: ProgressFn | None,
        running: bool,
    ) -> None:
        self.ctx = ctx
        self.running = running
        self.undo: Undo | None = None
        self.ref = ref
        self.want = want
        self.on_progress = progress
        self.started = ctx.now()
        self.id = repository.new_backup_id(self.started)
        self.checkpoint = checkpoint_name(self.id)
        self.repo = Repository(ctx.policy.target or ctx.config.backup_root)
        self.job_dir = ctx.config.runtime_dir / "jobs" / self.id
        self.scratch_dir = ctx.config.scratch_dir / self.id
        self.machine = JobMachine()
        self.log = log.bind(domain=ref.name, backup_id=self.id, checkpoint=self.checkpoint)
        self.libvirt_job = False
        self.record: BackupRecord | None = None
        self.info: DomainInfo | None = None
        self.progress: JobProgress | None = None
        self.cancelled: _Cancel | None = None
        # Each included disk's image: path, size, backing file (create_targets).
        self.targets: dict[str, tuple[Path, int, str | None]] = {}

    @property
    def state(self) -> JobState:
        return self.machine.state

    def enter(self, state: JobState) -> None:
        self.machine.advance(state)
        self.log.debug("backup state", state=state.value)

    async def run(self) -> BackupRecord:
        """The job, watched by a monitor that publishes its progress and
        honours `virtbackup cancel` (the same clean-up as any failure)."""
        runtime = self.ctx.config.runtime_dir
        clear_cancel(runtime, self.ref.uuid)  # a request for an earlier job
        body = asyncio.create_task(self._run())
        monitor = asyncio.create_task(self._monitor(body))
        try:
            return await body
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self.cancelled is not None and not (current and current.cancelling()):
                if self.cancelled is _Cancel.DOMAIN_STARTED:
                    raise DomainStartingError(
                        f"backup {self.id} of {self.ref.name} {self.cancelled.value}; "
                        "nothing of it is kept, and it is taken again once the domain runs"
                    ) from None
                raise BackupFailedError(
                    f"backup {self.id} of {self.ref.name} failed: {self.cancelled.value}",
                    backup_id=self.id,
                ) from None
            raise
        finally:
            monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await monitor
            clear_cancel(runtime, self.ref.uuid)

    async def _monitor(self, body: asyncio.Task[BackupRecord], interval: float = 0.2) -> None:
        runtime = self.ctx.config.runtime_dir
        published = 0.0
        while not body.done():
            await asyncio.sleep(interval)
            if self.cancelled is None:
                # The outcome line ("backup cancelled") says why, once.
                if cancel_requested(runtime, self.ref.uuid):
                    self.log.debug("cancel requested by the operator")
                    self.cancelled = _Cancel.OPERATOR
                    body.cancel()
                elif not self.running and vm_starts.starting(self.ref.uuid):
                    self.log.debug("the domain is being started: the offline backup gives way")
                    self.cancelled = _Cancel.DOMAIN_STARTED
                    body.cancel()
            now = time.monotonic()
            p = self.progress
            if p is not None and self.record is not None and now - published >= 1.0:
                published = now
                try:
                    await self.ctx.store.set_progress(
                        self.id, p.done, p.total, p.rate(now), self.ctx.now()
                    )
                except VirtBackupError as exc:  # progress is a nicety; the backup goes on
                    self.log.warning("cannot publish progress", error=str(exc))

    async def _run(self) -> BackupRecord:
        lv, store = self.ctx.libvirt, self.ctx.store
        info = self.info = parse_domain(
            await lv.xml(self.ref, inactive=not self.running), f"domain XML of {self.ref.name}"
        )
        crashed = None if self.running else await self._check_offline_bitmaps(info)
        if crashed is not None:
            plan = replace(await self._plan(info, Level.FULL), reason=crashed)
        else:
            plan = await self._plan(info)
        await store.see_domain(self.ref.uuid, self.ref.name, self.started)
        self.record = BackupRecord(
            id=self.id,
            domain_uuid=self.ref.uuid,
            domain_name=self.ref.name,
            level=plan.level,
            status=BackupStatus.RUNNING,
            checkpoint=self.checkpoint,
            parent=plan.parent_backup,
            started=self.started,
            path=str(self.repo.final_dir(self.ref.uuid, self.id)),
            left_out=plan.left_out,
        )
        # The catalogue describes every repository it writes into
        # (catalogue.check_identity): a new one gets its id, recorded,
        # before its first folder, so that a failed first backup leaves no
        # repository the catalogue would take for another's.
        self.repo.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        await store.record_repository(self.repo.root, self.repo.make_identity())
        await store.start_backup(self.record)
        self.undo = Undo(
            self.repo,
            UndoLog(
                self.id,
                self.ref.name,
                self.ref.uuid,
                plan.level,
                self.started,
                parent=plan.parent_backup,
            ),
        )
        self.log.info(
            "backup planned",
            backup_level=plan.level.value,
            reason=plan.reason,
            disks=list(plan.disks),
            online=self.running,
        )
        # What the policy chose (raw: full, an exclude) is information; a
        # disk left out for another reason (shareable, network) a warning.
        for c in plan.choices:
            say = self.log.info if c.by_policy else self.log.warning
            if c.included and not c.checkpoint:
                say("disk copied in full", disk=c.target, reason=c.reason)
            elif not c.included and not c.removable:
                say("disk left out of the backup", disk=c.target, reason=c.reason)
        # Online: libvirt's pull job; offline: qemu-nbd on the images.
        export: Export = OnlineExport(self) if self.running else OfflineExport(self)
        try:
            self.enter(JobState.EXPORTING)
            self._prepare(info)
            results, plan = await export.copy(info, plan)
            self.enter(JobState.COMMITTING)
            await export.before_commit(info, plan)
            return await self._commit(info, plan, results)
        except BaseException as exc:
            await self._fail(exc)
            if isinstance(exc, VirtBackupError):
                raise BackupFailedError(
                    f"backup {self.id} of {self.ref.name} failed: {exc}", backup_id=self.id
                ) from exc
            if isinstance(exc, Exception):
                # A bug or an untranslated library error: cleaned up like any
                # failure above; its traceback went to the log in _fail.
                raise BackupFailedError(
                    f"backup {self.id} of {self.ref.name} failed: internal error: "
                    f"{type(exc).__name__}: {exc}",
                    backup_id=self.id,
                ) from exc
            raise
        finally:
            _rmtree(self.job_dir)
            await scratch.release(self.scratch_dir)

    async def _plan(self, info: DomainInfo, want: Level | None = None) -> Plan:
        lv, store = self.ctx.libvirt, self.ctx.store
        libvirt_cps = await lv.checkpoints(self.ref)
        stored = await store.checkpoints(self.ref.uuid)
        sizes: dict[str, int] = {}
        for d in info.disks:
            if d.device == "disk" and d.source:
                try:
                    sizes[d.target] = await lv.disk_capacity(self.ref, d.target)
                except LibvirtError as exc:  # the copy will still check the size it reads
                    self.log.warning("cannot read the disk's size", disk=d.target, error=str(exc))
        history = await store.backups(self.ref.uuid)
        plan = plan_backup(
            checkpoint=self.checkpoint,
            disks=info.disks,
            policy=self.ctx.policy,
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
            want=want or self.want,
            sizes=sizes,
            repository=str(self.repo.root),
            last_unrestorable=_unrestorable(history),
        )
        known = {cp.name for cp in libvirt_cps}
        for name in plan.delete_checkpoints:
            if name in known:
                self.log.warning("deleting a checkpoint of ours that is not trusted", stale=name)
                await own_checkpoints.delete_checkpoint(lv, self.ref, name)
        current = await lv.xml(self.ref, inactive=True) if plan.redefine else ""
        for cp in plan.redefine:
            self.log.warning("redefining checkpoint libvirt lost", lost=cp.name)
            xml = for_redefinition(cp.xml, current, f"stored XML of checkpoint {cp.name}")
            await lv.redefine_checkpoint(self.ref, xml)
        return plan

    def note(self, kind: UndoKind, path: Path | str | None = None, name: str | None = None) -> None:
        assert self.undo is not None
        self.undo.note(kind, path, name)

    def _prepare(self, info: DomainInfo) -> None:
        self.note(UndoKind.PARTIAL, self.repo.partial_dir(self.ref.uuid, self.id))
        self.note(UndoKind.JOB_DIR, self.job_dir)
        if self.running:
            self.note(UndoKind.JOB_DIR, self.scratch_dir)
        self.repo.create_partial(self.ref.uuid, self.id)
        make_job_folder(
            self.job_dir, self.ctx.config.runtime_dir, info.qemu_user, qemu_passes=self.running
        )
        if self.running:
            # QEMU creates its copy-before-write scratch files in here.
            scratch.prepare(self.scratch_dir, info.qemu_user)

    async def _forget_own_checkpoints(self, info: DomainInfo) -> None:
        await own_checkpoints.forget_all(
            self.ctx.libvirt,
            self.ctx.store,
            self.ref,
            info,
            running=self.running,
            keep=self.checkpoint,
        )

    async def _check_offline_bitmaps(self, info: DomainInfo) -> str | None:
        reason = await own_checkpoints.check_shut_off(
            self.ctx.libvirt, self.ctx.store, self.ref, info, self.log, keep=self.checkpoint
        )
        if reason is not None:
            self.log.warning("checkpoint bitmaps inconsistent; taking a full backup", reason=reason)
        return reason

    async def after_crash(self, info: DomainInfo, error: str) -> Plan:
        """libvirt refused our parent checkpoint: its bitmaps are broken
        (QEMU was killed), and this backup becomes a full one."""
        self.log.warning(
            "checkpoint bitmaps inconsistent; deleting ours, taking a full backup", error=error
        )
        await self._forget_own_checkpoints(info)
        store = self.ctx.store
        plan = await self._plan(info, Level.FULL)
        plan = replace(plan, reason=f"checkpoint bitmaps inconsistent ({error})")
        await store.replan_backup(self.id, plan.level, None)
        self.log.info("backup replanned", backup_level=plan.level.value, reason=plan.reason)
        return plan

    async def copy_all(
        self, sources: dict[str, tuple[UnixAddress, str, str | None]], plan: Plan
    ) -> dict[str, CopyResult]:
        """Copy every disk concurrently from its source export (address,
        export name, dirty bitmap or None) into its target image."""
        progress = self.progress = JobProgress(self.id, self.ref.name)
        results: dict[str, CopyResult] = {}
        bandwidth = self.ctx.policy.bandwidth
        # One budget for the domain: a disk with little to copy leaves the
        # rest to the others.
        limit = RateLimit(bandwidth, CopyOptions().request_size) if bandwidth else None

        async def copy_one(
            target: str, address: UnixAddress, export: str, bitmap: str | None
        ) -> None:
            def on_progress(p: CopyProgress) -> None:
                progress.disks[target] = p
                if self.on_progress:
                    self.on_progress(progress)

            image, size, backing = self.targets[target]
            # Written in our own process (adapters.qcow2_writer): a writing
            # qemu-nbd was the slowest part of a backup (docs/performance.md).
            # Durable at commit, which fsyncs every image before the rename.
            async with qcow2_writer.new_image(image, size, backing) as writer:
                results[target] = await copy_into(
                    address,
                    export,
                    writer,
                    dirty_bitmap=bitmap,
                    connections=2,
                    options=CopyOptions(
                        zero_mode=ZeroMode.WRITE_ZEROES if bitmap else ZeroMode.SKIP,
                        shared_limit=limit,
                    ),
                    progress=on_progress,
                )

        try:
            async with asyncio.TaskGroup() as tg:
                for target, (address, export, bitmap) in sources.items():
                    tg.create_task(copy_one(target, address, export, bitmap))
        except BaseExceptionGroup as group:
            raise first_cause(group) from group
        return results

    async def create_targets(self, plan: Plan, sizes: dict[str, int]) -> None:
        """Name each included disk's image: its path, size and backing file
        (the images are written by copy_all)."""
        partial = self.repo.partial_dir(self.ref.uuid, self.id)
        self.targets = {}
        for c in plan.choices:
            if not c.included:
                continue
            backing = None
            if plan.level is Level.INCREMENTAL and c.checkpoint:
                assert plan.parent_backup is not None
                backing = repository.backing_of(plan.parent_backup, c.target)
            # Of the disk's size now: a disk grown since the parent gets an
            # overlay larger than its backing file (reads zeroes there).
            image = partial / repository.disk_file(c.target)
            self.targets[c.target] = (image, sizes[c.target], backing)

    async def _commit(
        self, info: DomainInfo, plan: Plan, results: dict[str, CopyResult]
    ) -> BackupRecord:
        lv, store = self.ctx.libvirt, self.ctx.store
        assert self.record is not None
        cp_xml = await lv.checkpoint_xml(self.ref, self.checkpoint)
        domain_xml = await lv.xml(self.ref, inactive=True)
        texts = {DOMAIN_XML: domain_xml, CHECKPOINT_XML: cp_xml}
        finished = self.ctx.now()
        standalone = {t for t, (_, _, backing) in self.targets.items() if backing is None}
        disks = disk_records(results, standalone=standalone)
        manifest = Manifest(
            id=self.id,
            domain_name=self.ref.name,
            domain_uuid=self.ref.uuid,
            level=plan.level,
            reason=plan.reason,
            checkpoint=self.checkpoint,
            parent=plan.parent_backup,
            parent_checkpoint=plan.parent_checkpoint,
            started=self.started,
            finished=finished,
            disks=disks,
            left_out=plan.left_out,
            documents=document_digests(texts),
        )
        assert self.undo is not None

        def step(label: str) -> None:
            if label == "renamed":  # the commit point
                self.enter(JobState.COMMITTED)
            if self.ctx.step is not None:
                self.ctx.step(label)

        await commit_backup(
            store,
            self.repo,
            manifest,
            texts,
            {name: r.pieces for name, r in results.items()},
            self.undo,
            step,
        )
        self.enter(JobState.COMPLETE)
        read = sum(d.bytes_read for d in disks)
        secs = (finished - self.started).total_seconds()
        self.log.info(
            "backup complete",
            backup_level=plan.level.value,
            bytes_read=read,
            bytes_written=sum(d.bytes_written for d in disks),
            seconds=round(secs, 2),
            mib_per_s=round(read / 2**20 / secs, 1) if secs else None,
        )
        record = await store.backup(self.id)
        assert record is not None
        return record

    async def _fail(self, exc: BaseException) -> None:
        """Every failure edge ends here; each cleanup step runs even if an
        earlier one fails."""
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, asyncio.CancelledError):
            # Asked for (`virtbackup cancel`, a VM start, the process
            # stopping): the outcome is a notice, not an error.
            reason = self.cancelled.value if self.cancelled is not None else "cancelled"
            self.log.notice("backup cancelled", state=self.state.value, reason=reason)
        elif isinstance(exc, Exception) and not isinstance(exc, VirtBackupError):
            reason = f"internal error: {type(exc).__name__}: {exc}"
            self.log.error("backup failed", state=self.state.value, error=reason, exc_info=exc)
        else:
            self.log.error("backup failed", state=self.state.value, error=reason)
        cleanup = self.machine.fail()
        if cleanup is Cleanup.KEEP:
            self.log.error(
                "the backup is complete in the repository but the catalogue could not record "
                "it; it is recorded at the next start or command",
                path=str(self.repo.final_dir(self.ref.uuid, self.id)),
            )
            return
        if cleanup is Cleanup.NOTHING or self.undo is None:
            if self.record is not None:
                await asyncio.shield(self.ctx.store.fail_backup(self.id, self.ctx.now(), reason))
            return
        undoing = ReplayContext(
            self.ctx.libvirt,
            self.ctx.store,
            self.repo,
            self.ref,
            images=Images.TAKE_HOLD if self.running else Images.HELD,
            logger=self.log,
        )
        await replay(undoing, self.undo.log, reason, self.ctx.now())


def disk_records(results: dict[str, CopyResult], *, standalone: Set[str]) -> tuple[DiskRecord, ...]:
    """What the manifest and the catalogue keep of each disk's copy;
    `standalone`: the disks whose image has no backing file (every disk of
    a full backup; in an incremental, a disk copied whole: a raw or
    block-device disk, or one new since the parent)."""
    return tuple(
        DiskRecord(
            disk=name,
            path=repository.disk_file(name),
            virtual_size=r.size,
            bytes_read=r.bytes_read,
            bytes_written=r.bytes_written,
            bytes_zeroed=r.bytes_zeroed,
            digest=r.digest,
            grid=r.grid,
            ranges=r.ranges,
            pieces=repository.pieces_file(name),
            standalone=name in standalone,
        )
        for name, r in sorted(results.items())
    )


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _unrestorable(history: Sequence[BackupRecord]) -> str | None:
    """Why the newest complete backup's folders cannot be restored, if so."""
    complete = [b for b in history if b.status is BackupStatus.COMPLETE and b.path]
    if not complete:
        return None
    s = standing(Path(complete[-1].path or ""))
    return None if s.restorable else s.why()


def make_job_folder(
    job_dir: Path, runtime_dir: Path, qemu_user: tuple[int, int] | None, *, qemu_passes: bool
) -> None:
    """Create a job's folder (`runtime_dir`/jobs/<id>), QEMU's own: it
    makes the NBD socket in there. A link planted on the way or in its
    place is refused, never followed. `qemu_passes`: an online backup,
    whose QEMU (often not root) must traverse to it, not list it."""
    # QEMU (often not root) must traverse to its job folder, not list it.
    host_folders.make_folder(job_dir.parent, 0o711, parents_mode=0o711, reset=True)
    if qemu_passes and qemu_user is not None and qemu_user[0] != 0:
        blocked = host_folders.unpassable(job_dir.parent)
        if blocked is not None:
            raise VirtBackupError(
                f"runtime_dir {runtime_dir}: QEMU (uid {qemu_user[0]}) "
                f"cannot reach its job folder, because {blocked} is mode "
                f"{blocked.stat().st_mode & 0o7777:04o}; give that folder o+x "
                "(0711: passing through, no listing)"
            )
    # QEMU creates the NBD socket in here (so its own).
    host_folders.make_folder(job_dir, owner=qemu_user, exist_ok=False)
