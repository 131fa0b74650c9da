"""Cleaning up after a backup whose process died (SIGKILL, host crash).

Called with the domain's lock held: a record still "running" then belongs
to no live process. What such a backup may have left, and what happens:

- its pull-mode libvirt job (it never ends by itself): aborted, but only if
  its NBD socket lies in our runtime dir's jobs/ folder (another tool's job
  is never touched);
- its checkpoint (no complete backup will ever vouch for it): deleted;
- its offline bitmaps: no checkpoint names them any more, and
  own_checkpoints.check_shut_off removes them while holding the images
  against a VM start (before the next offline backup copies, and at daemon
  start);
- its ``.partial`` folder, job folder and scratch folder: removed;
- its record: marked failed, "interrupted";
- a guest it froze and did not thaw (a freeze record left in the runtime
  dir): thawed first.
"""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

import structlog

from virtbackupd.adapters.libvirt_conn import DomainRef, Libvirt
from virtbackupd.adapters.store import Store
from virtbackupd.config.daemon import DaemonConfig
from virtbackupd.core.backup_xml import Backup
from virtbackupd.core.records import BackupStatus
from virtbackupd.engine import own_checkpoints
from virtbackupd.engine.locks import clear_freeze, freeze_left
from virtbackupd.engine.repository import Repository
from virtbackupd.errors import VirtBackupError

log = structlog.get_logger("virtbackupd.leftovers")


async def own_job_socket(lv: Libvirt, ref: DomainRef, jobs_dir: Path) -> Path | None:
    """The NBD socket of the domain's running backup job if it is one of
    ours (its socket is under `jobs_dir`), else None."""
    try:
        backup = Backup.from_xml(await lv.backup_xml(ref), "running backup job", internal=True)
    except VirtBackupError:
        return None  # no backup job, or not one we can read
    if backup.server is None or backup.server.socket is None:
        return None
    sock = Path(backup.server.socket)
    return sock if jobs_dir in sock.parents else None


async def clean_leftovers(
    lv: Libvirt,
    store: Store,
    ref: DomainRef,
    config: DaemonConfig,
    repo: Repository,
    now: datetime,
) -> list[str]:
    """Clean what dead backups of this domain left; the ids cleaned."""
    jobs_dir = config.runtime_dir / "jobs"
    cleaned = []
    if freeze_left(config.runtime_dir, ref.uuid):
        await _thaw(lv, ref)
        clear_freeze(config.runtime_dir, ref.uuid)
    if await lv.is_running(ref) and await lv.job_active(ref):
        sock = await own_job_socket(lv, ref, jobs_dir)
        if sock is not None:
            log.warning(
                "aborting the job of a backup whose process died", domain=ref.name, socket=str(sock)
            )
            await lv.abort_job(ref)
    known = {c.name for c in await lv.checkpoints(ref)}
    for rec in await store.backups(ref.uuid, status=BackupStatus.RUNNING):
        if rec.checkpoint and rec.checkpoint in known:
            await own_checkpoints.delete_checkpoint(lv, ref, rec.checkpoint)
        # The bitmap an offline backup added to the images is now one that
        # no checkpoint names: own_checkpoints.check_shut_off removes it,
        # holding the images against a VM start (the job before it copies,
        # the daemon at start).
        repo.discard(ref.uuid, rec.id)
        shutil.rmtree(jobs_dir / rec.id, ignore_errors=True)
        shutil.rmtree(config.scratch_dir / rec.id, ignore_errors=True)
        await store.fail_backup(rec.id, now, "interrupted: the backup process died")
        log.warning("cleaned up an interrupted backup", domain=ref.name, backup_id=rec.id)
        cleaned.append(rec.id)
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
