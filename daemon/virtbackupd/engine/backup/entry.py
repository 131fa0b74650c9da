"""The way into a backup: the domain looked up, its lock taken and what
dead processes left cleaned (engine.domain_job), another tool's libvirt
job refused, an interrupted prune finished, a backup slot and the
domain's images held; then the driver (engine.backup.driver) runs."""

from __future__ import annotations

import structlog

from virtbackupd.adapters.libvirt_conn import DomainRef
from virtbackupd.adapters.repository import Repository
from virtbackupd.core.policy import Level
from virtbackupd.core.records import BackupRecord
from virtbackupd.engine import vm_starts
from virtbackupd.engine.backup.context import BackupContext
from virtbackupd.engine.backup.copying import ProgressFn
from virtbackupd.engine.backup.driver import Job
from virtbackupd.engine.domain_job import domain_job
from virtbackupd.engine.locks import backup_slot
from virtbackupd.engine.upkeep.prune import finish_interrupted
from virtbackupd.errors import BackupBusyError, VirtBackupError

log = structlog.get_logger("virtbackupd.backup")


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
