"""state.db as a catalogue of the repository: the folders are the truth,
and this module makes the catalogue say what they say.

- :func:`commit_backup` is a backup's commit, one transaction: the
  folder's rename (the commit point), then the catalogue, then the undo
  log dropped. A crash before the rename leaves nothing trusted (the undo
  log is replayed); after it, a complete backup that :func:`reconcile`
  records.
- :func:`reconcile` (cheap: reads only the manifests the catalogue does
  not agree with) runs at daemon start, before `list` and by `reindex`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import structlog

from virtbackupd.adapters.repository import (
    CHECKPOINT_XML,
    DocumentDigestError,
    Manifest,
    Repository,
    StepHook,
    StoredBackup,
    read_document,
    read_manifest,
)
from virtbackupd.adapters.store import Store
from virtbackupd.core.checkpoint_xml import Checkpoint
from virtbackupd.core.records import BackupStatus, CheckpointRecord, CheckpointStatus
from virtbackupd.engine.undo import Undo
from virtbackupd.errors import VirtBackupError

log = structlog.get_logger("virtbackupd.catalogue")


def checkpoint_record(stored: StoredBackup) -> CheckpointRecord | None:
    """The checkpoint a committed backup vouches for (its checkpoint.xml)."""
    m = stored.manifest
    path = stored.folder / CHECKPOINT_XML
    if m.checkpoint is None or not path.is_file():
        return None
    # Its XML is what a later backup hands libvirt to redefine the
    # checkpoint: one edited since the backup is not trusted (the backup
    # still counts; the next one of the domain is full).
    try:
        xml = read_document(stored.folder, m, CHECKPOINT_XML).text
    except DocumentDigestError as exc:
        log.warning("checkpoint not trusted", backup=m.id, problem=str(exc))
        return None
    cp = Checkpoint.from_xml(xml, str(path))
    return CheckpointRecord(
        m.domain_uuid, m.checkpoint, cp.parent, m.started, CheckpointStatus.ACTIVE, xml
    )


async def record_committed(
    store: Store, repo: Repository, stored: StoredBackup, *, with_checkpoint: bool = True
) -> None:
    """Record a committed backup (its parent first, if the catalogue lacks
    it: a row's parent must exist). The checkpoint is trusted only where
    asked (reindex and crash recovery ask; whether libvirt still has it is
    the next backup's plan to check)."""
    m = stored.manifest
    if m.parent is not None:
        parent = await store.backup(m.parent)
        if parent is None or parent.status is not BackupStatus.COMPLETE:
            await record_committed(store, repo, repo.backup(m.domain_uuid, m.parent))
    cp = checkpoint_record(stored) if with_checkpoint else None
    await store.record_backup(m.as_record(stored.folder), cp)


async def commit_backup(
    store: Store,
    repo: Repository,
    manifest: Manifest,
    texts: dict[str, str],
    pieces: dict[str, bytes],
    undo: Undo,
    step: StepHook | None = None,
) -> Path:
    """The commit of one backup; see the module's docstring."""
    hook = step or (lambda _: None)
    final = repo.commit(manifest, texts, pieces, hook)
    await record_committed(store, repo, StoredBackup(final, manifest))
    hook("catalogue updated")
    undo.committed()
    hook("undo log dropped")
    return final


@dataclass
class Reconciled:
    recorded: list[str] = field(default_factory=list)  # committed, now catalogued
    attempts: list[str] = field(default_factory=list)  # failed attempts added
    vanished: list[str] = field(default_factory=list)  # catalogued, folder gone
    problems: list[str] = field(default_factory=list)


async def reconcile(store: Store, repo: Repository, uuid: str | None = None) -> Reconciled:
    """Make the catalogue agree with the repository (one domain, or all).
    A backup whose undo log is still there belongs to a running (or dead)
    job and is left to it (engine.leftovers)."""
    out = Reconciled()
    dirs = [repo.domain_dir(uuid)] if uuid else repo.domain_dirs()
    catalogued = {b.id: b for b in await store.backups()}
    for domain_dir in dirs:
        duuid = domain_dir.name
        busy = {u.backup_id for u in repo.undo_logs(duuid)}
        removing = repo.being_removed(duuid)
        on_disk: set[str] = set()
        for folder in _backup_folders(domain_dir):
            on_disk.add(folder.name)
            have = catalogued.get(folder.name)
            if folder.name in busy or folder.name in removing:
                continue
            if have is not None and have.status is BackupStatus.COMPLETE:
                continue
            try:
                stored = StoredBackup(folder, read_manifest(folder))
                await record_committed(store, repo, stored)
            except VirtBackupError as exc:
                out.problems.append(str(exc))
                continue
            out.recorded.append(folder.name)
        for attempt in repo.attempts(duuid, out.problems):
            if attempt.backup_id not in catalogued and attempt.backup_id not in on_disk:
                await store.record_backup(attempt.as_record())
                out.attempts.append(attempt.backup_id)
        for b in catalogued.values():
            if (
                b.domain_uuid == duuid
                and b.status is BackupStatus.COMPLETE
                and b.path is not None
                and Path(b.path).parent == domain_dir
                and b.id not in on_disk
            ):
                await store.delete_backup(b.id)
                out.vanished.append(b.id)
    for what, ids in (("recorded", out.recorded), ("forgot", out.vanished)):
        if ids:
            log.warning(f"catalogue {what} what the repository says", backups=ids)
    return out


def _backup_folders(domain_dir: Path) -> list[Path]:
    if not domain_dir.is_dir():
        return []
    return sorted(
        p
        for p in domain_dir.iterdir()
        if p.is_dir() and not p.name.startswith(".") and not p.name.endswith(".partial")
    )
