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

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import structlog

from virtbackupd.adapters.repository import (
    IDENTITY,
    MANIFEST,
    Repository,
    document_path,
    has_document,
    read_document,
    read_manifest,
)
from virtbackupd.adapters.store import Store
from virtbackupd.core.checkpoint_xml import Checkpoint
from virtbackupd.core.policy import Level
from virtbackupd.core.records import (
    BackupRecord,
    BackupStatus,
    CheckpointRecord,
    CheckpointStatus,
)
from virtbackupd.core.repository_format.documents import CHECKPOINT_XML
from virtbackupd.core.repository_format.manifest import Manifest
from virtbackupd.core.repository_format.storage import StepHook, StoredBackup
from virtbackupd.engine.recovery.undo import Undo
from virtbackupd.errors import VirtBackupError

log = structlog.get_logger("virtbackupd.catalogue")


class ForeignCatalogueError(VirtBackupError):
    """The catalogue describes other repositories than the one at a root:
    it was copied or moved beside another backup_root (or the root was
    swapped), and its rows name backups that are not this repository's."""

    def __init__(self, store: Path, root: Path, recorded: Sequence[str], found: str | None) -> None:
        self.path, self.root, self.recorded, self.found = store, root, tuple(recorded), found
        holds = (
            f"repository {found} ({root / IDENTITY})"
            if found
            else f"backups but no {IDENTITY} (so not one of them)"
        )
        described = ", ".join(self.recorded[:3]) + (", ..." if len(self.recorded) > 3 else "")
        super().__init__(
            f"{store}: this catalogue describes repository {described}, but {root} holds "
            f"{holds}; `virtbackup reindex` rebuilds the catalogue for this repository"
        )


async def check_identity(store: Store, repos: Sequence[Repository]) -> None:
    """Refuse a catalogue that does not describe the repositories at the
    roots of `repos` (ForeignCatalogueError). The catalogue records each
    repository's id (``.repository.json``) when it first describes it: at
    its first backup's commit, or here when it records none at all (new,
    or from a version before identities: there is nothing to compare, so
    nothing is silently passed over; it adopts what it is opened with). A
    root without backups (not yet written, or a share not mounted) is left
    alone: there is nothing there to act on."""
    recorded = await store.repository_ids()
    for repo in repos:
        found = repo.identity()
        if found is None and not repo.holds_backups():
            continue
        if found is not None and found in recorded:
            if recorded[found] != str(repo.root):
                await store.record_repository(repo.root, found)  # moved: same repository
            continue
        if recorded:
            raise ForeignCatalogueError(store.path, repo.root, sorted(recorded), found)
        await store.record_repository(repo.root, found or repo.make_identity())


def checkpoint_record(stored: StoredBackup) -> CheckpointRecord | None:
    """The checkpoint a committed backup vouches for (its checkpoint.xml)."""
    m = stored.manifest
    if m.checkpoint is None or not has_document(stored.folder, CHECKPOINT_XML):
        return None
    # Its XML is what a later backup hands libvirt to redefine the
    # checkpoint: one edited since the backup (DocumentDigestError) or torn
    # is not trusted; reindex and crash recovery record the backup without
    # it (record_committed), so the domain's next backup is full.
    doc = read_document(stored.folder, m, CHECKPOINT_XML)
    xml = doc.text
    cp = Checkpoint.from_xml(xml, str(doc.path))
    return CheckpointRecord(
        m.domain_uuid, m.checkpoint, cp.parent, m.started, CheckpointStatus.ACTIVE, xml
    )


async def record_committed(
    store: Store,
    repo: Repository,
    stored: StoredBackup,
    *,
    with_checkpoint: bool = True,
    problems: list[str] | None = None,
    _below: frozenset[str] = frozenset(),
) -> None:
    """Record a committed backup (its parent first, if the catalogue lacks
    it: a row's parent must exist; a parent folder that cannot be read is
    recorded as a stand-in, one that is gone leaves the row without a
    parent). The checkpoint is trusted only where asked (reindex and crash
    recovery ask; whether libvirt still has it is the next backup's plan to
    check). Given `problems`, an unreadable checkpoint.xml is said there
    and the backup recorded without its checkpoint; else it raises."""
    m = stored.manifest
    if m.parent is not None and m.parent not in _below and m.parent != m.id:
        parent = await store.backup(m.parent)
        if parent is None or parent.status is not BackupStatus.COMPLETE:
            folder = stored.folder.parent / m.parent
            try:
                above = repo.backup(m.domain_uuid, m.parent)
            except VirtBackupError as exc:
                if folder.is_dir():
                    await record_unreadable(store, folder, str(exc))
            else:
                await record_committed(
                    store, repo, above, problems=problems, _below=_below | {m.id}
                )
    cp = None
    if with_checkpoint:
        try:
            cp = checkpoint_record(stored)
        except (VirtBackupError, OSError) as exc:
            if problems is None:
                raise
            problems.append(
                f"{exc}; backup {m.id} is recorded without its checkpoint"
                if isinstance(exc, VirtBackupError)
                else f"{document_path(stored.folder, CHECKPOINT_XML)}: cannot read: {exc}"
            )
    await store.record_backup(m.as_record(stored.folder), cp)


async def record_unreadable(
    store: Store, folder: Path, problem: str, domain_name: str | None = None
) -> None:
    """A stand-in row for a committed folder whose manifest cannot be read:
    listed `unreadable` (verify then names the file), and the backups built
    on it keep their rows instead of vanishing from the catalogue."""
    uuid = folder.parent.name
    if domain_name is None:
        known = await store.domain(uuid)
        domain_name = known.name if known is not None else _name_in(folder.parent) or uuid
    await store.record_backup(
        BackupRecord(
            id=folder.name,
            domain_uuid=uuid,
            domain_name=domain_name,
            level=Level.FULL,  # unknown; `unreadable` says the row is a stand-in
            status=BackupStatus.COMPLETE,  # the folder's rename was its commit
            checkpoint=None,  # vouches for no checkpoint: the next backup is full
            parent=None,
            started=_started_of(folder),
            path=str(folder),
            unreadable=problem,
        )
    )


def _started_of(folder: Path) -> datetime:
    """When a backup began, from its id (ids sort as backups were taken);
    the folder's time for a name that is no id."""
    try:
        return datetime.strptime(folder.name.split("Z-")[0], "%Y%m%dT%H%M%S.%f").replace(tzinfo=UTC)
    except ValueError:
        return datetime.fromtimestamp(folder.stat().st_mtime, UTC)


def _name_in(domain_dir: Path) -> str | None:
    """The domain's name as any readable manifest of it says."""
    for folder in _backup_folders(domain_dir):
        with contextlib.suppress(VirtBackupError):
            return read_manifest(folder).domain_name
    return None


# PLR0913: a commit's parts (manifest, documents, pieces) are written in one ordered step
async def commit_backup(  # noqa: PLR0913 (see above)
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
    # The catalogue describes every repository it holds backups of
    # (check_identity); the first backup of a new one gives it its id.
    await store.record_repository(repo.root, repo.make_identity())
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
    unreadable: list[str] = field(default_factory=list)  # recorded as stand-ins
    problems: list[str] = field(default_factory=list)  # one line each, naming the file


# C901: one branch per mismatch of catalogue and folders, each with its own repair
async def reconcile(store: Store, repo: Repository, uuid: str | None = None) -> Reconciled:  # noqa: C901 (see above)
    """Make the catalogue agree with the repository (one domain, or all).
    A backup whose undo log is still there belongs to a running (or dead)
    job and is left to it (engine.recovery.leftovers). Whatever the repository's
    state, this completes: a folder it cannot read is recorded as a
    stand-in and named in `problems`, never left out."""
    out = Reconciled()
    dirs = [repo.domain_dir(uuid)] if uuid else repo.domain_dirs()
    catalogued = {b.id: b for b in await store.backups()}
    for domain_dir in dirs:
        duuid = domain_dir.name
        try:
            busy = {u.backup_id for u in repo.undo_logs(duuid)}
        except VirtBackupError as exc:
            out.problems.append(str(exc))
            busy = set()
        try:
            removing = repo.being_removed(duuid)
        except VirtBackupError as exc:
            out.problems.append(str(exc))
            removing = frozenset()
        on_disk: set[str] = set()
        name: str | None = None
        for folder in _backup_folders(domain_dir):
            on_disk.add(folder.name)
            have = catalogued.get(folder.name)
            if folder.name in busy or folder.name in removing:
                continue
            if have is not None and have.status is BackupStatus.COMPLETE and not have.unreadable:
                continue
            try:
                stored = StoredBackup(folder, read_manifest(folder))
            except VirtBackupError as exc:
                if have is not None and have.unreadable == str(exc):
                    continue  # a stand-in already, for this same reason: said before
                out.problems.append(str(exc))
                if name is None:
                    name = _name_in(domain_dir)
                await record_unreadable(store, folder, str(exc), name)
                out.unreadable.append(folder.name)
                continue
            await record_committed(store, repo, stored, problems=out.problems)
            out.problems += [
                f"{folder / d.path}: missing (the manifest lists it)"
                for d in stored.manifest.disks
                if not (folder / d.path).is_file()
            ]
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


# --- whether a backup can be restored, as its folders say ---------------------------------


@dataclass(frozen=True)
class Standing:
    """What a backup's folders say of it, before any image is read: its
    own problem (manifest unreadable, an image missing), or the first
    unreadable backup its chain goes through."""

    manifest: Manifest | None
    problem: str | None = None
    through: str | None = None  # id of the unreadable backup below it
    through_problem: str | None = None

    @property
    def restorable(self) -> bool:
        return self.problem is None and self.through is None

    def why(self) -> str:
        if self.problem is not None:
            return self.problem
        return f"on an unreadable chain: backup {self.through}: {self.through_problem}"


def standing(folder: Path, seen: dict[Path, Standing] | None = None) -> Standing:
    """The :class:`Standing` of the backup in `folder` (`seen` caches the
    answers for a listing: each manifest is read once)."""
    seen = {} if seen is None else seen
    if folder in seen:
        return seen[folder]
    # Marked first: a chain that loops back here finds this answer.
    seen[folder] = Standing(None, f"{folder / MANIFEST}: the chain loops through it")
    try:
        # A listing asks only how the chain stands: the range lists are
        # read (and checked) by whoever uses them.
        m = read_manifest(folder, lazy_ranges=True)
    except VirtBackupError as exc:
        seen[folder] = Standing(None, str(exc))
        return seen[folder]
    missing = [d.path for d in m.disks if not (folder / d.path).is_file()]
    if missing:
        found = Standing(m, f"{folder / missing[0]}: missing (the manifest lists it)")
    elif m.parent is None:
        found = Standing(m)
    else:
        below = standing(folder.parent / m.parent, seen)
        if below.problem is not None:
            found = Standing(m, None, m.parent, below.problem)
        else:
            found = Standing(m, None, below.through, below.through_problem)
    seen[folder] = found
    return found


def _backup_folders(domain_dir: Path) -> list[Path]:
    if not domain_dir.is_dir():
        return []
    return sorted(
        p
        for p in domain_dir.iterdir()
        if p.is_dir() and not p.name.startswith(".") and not p.name.endswith(".partial")
    )
