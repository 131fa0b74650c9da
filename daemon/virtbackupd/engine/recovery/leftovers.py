"""Cleaning up after a backup whose process died (SIGKILL, host crash).

Called with the domain's lock held: an undo log (or a record still
"running") then belongs to no live process. For each undo log:

- its backup folder exists: the backup committed (the rename is the
  commit) and the catalogue is told so (engine.upkeep.catalogue);
- otherwise the log is replayed (engine.recovery.undo, the same code a failing job
  runs): its libvirt pull job aborted if it is still ours, its checkpoint
  deleted (no complete backup will ever vouch for it), its ``.partial``,
  job and scratch folders removed, the attempt recorded as failed
  ("interrupted"). An offline bitmap it added is named by no checkpoint
  any more: own_checkpoints.check_shut_off removes it while holding the
  images against a VM start.

A backup writes its undo log before its catalogue record
(engine.backup.driver), so every record still "running" of a dead
process has a log, and the replay marks it failed. Versions before
issue 25 wrote the record first: one of theirs that died in between left
a record and nothing else (every folder is in the log before it is made),
which is marked failed too. A guest a dead backup froze and did not thaw
(a freeze record in the runtime dir) is thawed first.

Whatever the dead process was (a backup, restore, prune, verify,
reindex), :func:`sweep_runtime` stops the helpers it left and removes
their folders in the runtime dir; every command and every job runs it
first.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import structlog

from virtbackupd.adapters import nbd_folders
from virtbackupd.adapters.libvirt_conn import DomainRef, Libvirt
from virtbackupd.adapters.repository import Repository
from virtbackupd.adapters.store import Store
from virtbackupd.config.daemon import DaemonConfig
from virtbackupd.core.records import BackupStatus
from virtbackupd.engine.locks import clear_freeze, freeze_left
from virtbackupd.engine.recovery import undo
from virtbackupd.engine.upkeep import catalogue
from virtbackupd.errors import VirtBackupError

log = structlog.get_logger("virtbackupd.leftovers")

INTERRUPTED = "interrupted: the backup process died"


async def sweep_runtime(runtime_dir: Path) -> None:
    """Stop the qemu-nbd helpers dead processes left and remove their
    export folders (adapters.nbd_folders), and release what their
    filesystem checks left (engine.guest_view); each is logged."""
    from virtbackupd.engine import guest_view  # its adapters load only when it is needed

    if (runtime_dir / guest_view.FSCHECK).is_dir():
        for folder in await guest_view.sweep_checks(runtime_dir):
            log.warning("released the filesystem check of a dead process", folder=str(folder))
    for swept in await nbd_folders.sweep(runtime_dir):
        stopped = [str(h) for h in swept.stopped]
        if swept.removed:
            log.warning(
                "removed the export folder of a dead process",
                folder=str(swept.folder),
                stopped_helpers=stopped,
            )
        else:
            log.warning(
                "a helper of a dead process would not stop; its folder stays",
                folder=str(swept.folder),
                helpers=stopped,
            )


async def clean_leftovers(
    lv: Libvirt,
    store: Store,
    ref: DomainRef,
    config: DaemonConfig,
    repo: Repository,
    now: datetime,
) -> list[str]:
    """Clean what dead backups of this domain left; the ids cleaned."""
    if freeze_left(config.runtime_dir, ref.uuid):
        await _thaw(lv, ref)
        clear_freeze(config.runtime_dir, ref.uuid)
    cleaned = await settle(store, repo, ref.uuid, now, lv, ref)
    # Only an older version's record is still running here (see above):
    # the record is all it left.
    for rec in await store.backups(ref.uuid, status=BackupStatus.RUNNING):
        await store.fail_backup(rec.id, now, INTERRUPTED)
        log.warning("cleaned up an interrupted backup", domain=ref.name, backup_id=rec.id)
        cleaned.append(rec.id)
    return cleaned


# PLR0913: libvirt and its domain are optional (libvirt may be down), then one switch
async def settle(  # noqa: PLR0913 (see above)
    store: Store,
    repo: Repository,
    uuid: str,
    now: datetime,
    lv: Libvirt | None = None,
    ref: DomainRef | None = None,
    *,
    libvirt_free_only: bool = False,
) -> list[str]:
    """The undo logs of dead backups of one domain: a committed one is
    catalogued, the others replayed (with `libvirt_free_only`, only those
    that need nothing of libvirt: the others wait for a caller with
    libvirt). Returns the ids replayed."""
    cleaned = []
    for left in repo.undo_logs(uuid):
        if repo.final_dir(uuid, left.backup_id).is_dir():
            await catalogue.record_committed(store, repo, repo.backup(uuid, left.backup_id))
            repo.drop_undo(uuid, left.backup_id)
            log.warning(
                "a backup whose process died after its commit is complete",
                domain=left.domain_name,
                backup_id=left.backup_id,
            )
            continue
        if libvirt_free_only and any(s.kind in undo.LIBVIRT_STEPS for s in left.steps):
            continue
        undoing = undo.ReplayContext(lv, store, repo, ref, images=undo.Images.LEAVE, logger=log)
        await undo.replay(undoing, left, INTERRUPTED, now)
        log.warning(
            "cleaned up an interrupted backup", domain=left.domain_name, backup_id=left.backup_id
        )
        cleaned.append(left.backup_id)
    return cleaned


async def _thaw(lv: Libvirt, ref: DomainRef) -> None:
    """A backup froze the guest's file systems and died before the thaw."""
    if not await lv.is_running(ref):
        return  # the guest stopped since: nothing is frozen any more
    try:
        await lv.fs_thaw(ref)
    except VirtBackupError as exc:
        log.warning(
            "thawing a guest a dead backup had frozen failed", domain=ref.name, error=str(exc)
        )
        raise
    log.warning("thawed the file systems of a guest a dead backup had frozen", domain=ref.name)
