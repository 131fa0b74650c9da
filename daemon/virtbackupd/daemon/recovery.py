"""At start (and when libvirtd first answers): what a dead daemon or
command left is put right before anything new starts. The folders are
the truth, the catalogue is brought in line with them; interrupted
backups are cleaned under their domain's lock; shut-off domains lose
bitmaps and checkpoints of ours that a QEMU crash broke."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import structlog

from virtbackupd.adapters.libvirt_conn import Libvirt
from virtbackupd.adapters.repository import Repository
from virtbackupd.adapters.store import Store
from virtbackupd.config.daemon import DaemonConfig
from virtbackupd.core.domain_xml import parse_domain
from virtbackupd.core.policy import Policy
from virtbackupd.core.records import BackupStatus
from virtbackupd.engine import vm_starts
from virtbackupd.engine.domain_job import domain_job
from virtbackupd.engine.locks import domain_lock
from virtbackupd.engine.recovery import own_checkpoints
from virtbackupd.engine.upkeep import catalogue
from virtbackupd.errors import VirtBackupError

log = structlog.get_logger("virtbackupd.daemon")

#: The policy that governs a domain (name, uuid) now, or None.
PolicyOf = Callable[[str, str], Policy | None]


async def reconcile_catalogue(store: Store, repositories: Sequence[Repository]) -> None:
    """The folders are the truth: the catalogue is brought in line with
    them at start (cheap: only what it disagrees on is read)."""
    for repo in repositories:
        try:
            found = await catalogue.reconcile(store, repo)
        except (OSError, VirtBackupError) as exc:
            log.error("cannot reconcile the catalogue", root=str(repo.root), error=str(exc))
            continue
        for problem in found.problems:
            log.warning("repository problem", root=str(repo.root), problem=problem)


async def tidy_shut_off(config: DaemonConfig, store: Store, policy_of: PolicyOf) -> None:
    """At start, for every governed domain that is shut off: remove
    bitmaps of ours that no checkpoint names, and drop our checkpoints
    after a QEMU crash (own_checkpoints.check_shut_off). A domain that
    is busy or being started is left to its next backup."""
    async with await Libvirt.open(config.libvirt_uri) as lv:
        for ref in await lv.domains():
            if policy_of(ref.name, ref.uuid) is None or await lv.is_running(ref):
                continue
            try:
                with domain_lock(config.runtime_dir, ref.uuid, ref.name, "tidy"):
                    async with vm_starts.running_or_held(lv, ref) as running:
                        if running:
                            continue
                        info = parse_domain(
                            await lv.xml(ref, inactive=True), f"domain XML of {ref.name}"
                        )
                        reason = await own_checkpoints.check_shut_off(
                            lv, store, ref, info, log.bind(domain=ref.name)
                        )
            except VirtBackupError as exc:
                log.info("left for the domain's next backup", domain=ref.name, error=str(exc))
                continue
            if reason is not None:
                log.warning(
                    "checkpoint bitmaps inconsistent; the next backup is full",
                    domain=ref.name,
                    reason=reason,
                )


async def clean_interrupted(
    config: DaemonConfig, store: Store, repositories: Sequence[Repository], policy_of: PolicyOf
) -> None:
    """Backups left "running" by a daemon that died: clean each domain
    (job aborted, checkpoint deleted, partial folder removed, record
    failed) under its lock, before anything new starts."""
    uuids = {b.domain_uuid for b in await store.backups(status=BackupStatus.RUNNING)}
    for repo in repositories:
        uuids |= {d.name for d in repo.domain_dirs() if repo.undo_logs(d.name)}
    if not uuids:
        return
    async with await Libvirt.open(config.libvirt_uri) as lv:
        for uuid in sorted(uuids):
            try:
                ref = await lv.domain(uuid)
            except VirtBackupError:
                for b in await store.backups(uuid, status=BackupStatus.RUNNING):
                    await store.fail_backup(
                        b.id, datetime.now(UTC), "interrupted: the domain is gone"
                    )
                continue
            policy = policy_of(ref.name, ref.uuid)
            repo = Repository((policy.target if policy else None) or config.backup_root)
            try:
                async with domain_job(
                    config, store, repo, ref.uuid, ref.name, "backup", libvirt=lv
                ) as job:
                    cleaned = list(job.cleaned)
            except VirtBackupError as exc:
                # A CLI backup may hold the lock: its own process cleans
                # up; otherwise the domain's next backup tries again.
                log.warning(
                    "cleaning an interrupted backup failed", domain=ref.name, error=str(exc)
                )
                continue
            # Each backup cleaned had its own line ("cleaned up an
            # interrupted backup", with BACKUP_ID).
            log.debug("cleaned interrupted backups", domain=ref.name, backups=cleaned)
