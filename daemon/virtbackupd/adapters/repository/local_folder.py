"""The local folder backend of the repository: folders, atomic synced
writes, the commit (a rename) and removal. The only code that knows the
repository's file and folder names (core.repository_format holds the
format's types and codec; storage.RepositoryStorage says what a backend
offers).

    <root>/<domain uuid>/<backup id>/
        <disk>.qcow2       full: standalone; incremental: overlay whose backing
                           file is ../<parent id>/<disk>.qcow2 (relative)
        <disk>.pieces      the hash of every piece the digest covers
        manifest.json      ids, level, checkpoint, parent, disks, digests
        domain.xml         the domain's (inactive) XML at backup time
        checkpoint.xml     libvirt's checkpoint XML, for redefinition
    <root>/<domain uuid>/<backup id>.partial/   a backup being written
    <root>/<domain uuid>/.<backup id>.removing/ a backup a prune is deleting
    <root>/<domain uuid>/.undo/<backup id>.json  what a running backup must undo
    <root>/<domain uuid>/.attempts/<backup id>.json  a failed attempt
    <root>/<domain uuid>/.holds/<hold id>.json  a backup something still reads
    <root>/<domain uuid>/.prune-journal.json    a prune in progress
    <root>/.repository.json                     which repository this is (its id)

The folders are the truth; state.db is a catalogue of them. A backup
counts once its folder is renamed from ``.partial`` to its id (every file
fsynced first): that rename is the commit.
"""

from __future__ import annotations

import os
import secrets
import shutil
import uuid as uuidlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from virtbackupd.adapters import host_folders
from virtbackupd.adapters.repository.files import (
    fsync_path,
    read_bounded,
    read_json,
    replace_json,
    write_synced,
)
from virtbackupd.core.extents import Piece
from virtbackupd.core.records import DiskRecord
from virtbackupd.core.repository_format.attempts import FailedAttempt
from virtbackupd.core.repository_format.codec import RepositoryFormatError, decode_text, json_text
from virtbackupd.core.repository_format.documents import (
    MAX_DOCUMENT_BYTES,
    Document,
    judge_document,
)
from virtbackupd.core.repository_format.holds import Hold
from virtbackupd.core.repository_format.identity import identity_from_json, identity_json
from virtbackupd.core.repository_format.manifest import Manifest
from virtbackupd.core.repository_format.pieces import checked_pieces
from virtbackupd.core.repository_format.prune_journal import PruneJournal
from virtbackupd.core.repository_format.storage import StepHook, StoredBackup
from virtbackupd.core.repository_format.undo import UndoLog
from virtbackupd.core.repository_format.versions import Operation
from virtbackupd.errors import VirtBackupError

if TYPE_CHECKING:
    from virtbackupd.core.repository_format.storage import RepositoryStorage

MANIFEST = "manifest.json"
PRUNE_JOURNAL = ".prune-journal.json"
UNDO_DIR = ".undo"
ATTEMPTS_DIR = ".attempts"
HOLDS_DIR = ".holds"
IDENTITY = ".repository.json"
KEPT_ATTEMPTS = 50  # failed attempts remembered per domain

#: What an operator does with a refused journal or undo log: its steps
#: rename and delete folders as root, so nothing of it is ever done, and
#: only a human can tell a damaged file of ours from a planted one.
REFUSED_ADVICE = "inspect it and move it out of the repository"


log = structlog.get_logger("virtbackupd.repository")


class Repository:
    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def of_domain(cls, domain_dir: Path) -> Repository:
        """The repository a domain folder (``<root>/<uuid>``) is in."""
        return cls(domain_dir.parent)

    @classmethod
    def of_backup(cls, folder: Path) -> Repository:
        """The repository a backup folder (``<root>/<uuid>/<id>``) is in."""
        return cls(folder.parent.parent)

    def domain_dir(self, uuid: str) -> Path:
        return self.root / uuid

    # --- identity ---

    def identity(self) -> str | None:
        """The repository's id (a UUID in ``.repository.json``), None if it
        has none yet. A catalogue records it to know which repository it
        describes (engine.upkeep.catalogue.check_identity)."""
        path = self.root / IDENTITY
        data = read_json(path, missing_ok=True)
        if data is None:
            return None
        return identity_from_json(data, path)

    def make_identity(self) -> str:
        """The repository's id, given one first if it has none (an existing
        root only). Two processes doing this at once agree: the file is
        written aside and linked into place, which fails if one is there."""
        have = self.identity()
        if have is not None:
            return have
        path = self.root / IDENTITY
        tmp = self.root / f"{IDENTITY}.{secrets.token_hex(4)}.tmp"
        text = json_text(identity_json(str(uuidlib.uuid4())))
        write_synced(tmp, text)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process was first: its id stands
        finally:
            tmp.unlink()
        fsync_path(self.root)
        made = self.identity()
        assert made is not None
        return made

    def holds_backups(self) -> bool:
        """Whether any domain folder is here (an empty or missing root is a
        repository not yet written, or a share not mounted)."""
        return bool(self.domain_dirs())

    def final_dir(self, uuid: str, backup_id: str) -> Path:
        return self.domain_dir(uuid) / backup_id

    def partial_dir(self, uuid: str, backup_id: str) -> Path:
        return self.domain_dir(uuid) / f"{backup_id}.partial"

    def domain_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def create_partial(self, uuid: str, backup_id: str) -> Path:
        # 0700 whatever the umask, folders above backup_root included; a
        # link planted on the way is refused, not followed.
        partial = self.partial_dir(uuid, backup_id)
        host_folders.make_folder(partial, exist_ok=False)
        return partial

    def discard(self, uuid: str, backup_id: str) -> None:
        shutil.rmtree(self.partial_dir(uuid, backup_id), ignore_errors=True)

    def commit(
        self,
        manifest: Manifest,
        texts: Mapping[str, str],
        pieces: Mapping[str, bytes],
        step: StepHook | None = None,
    ) -> Path:
        """Write the metadata files, fsync everything, rename into place:
        the rename is the commit (a crash before it leaves a ``.partial``
        folder, after it a complete backup)."""
        hook = step or _no_step
        uuid = manifest.domain_uuid
        partial = self.partial_dir(uuid, manifest.id)
        for d in manifest.disks:
            if d.pieces is not None:
                write_synced(partial / d.pieces, pieces[d.disk])
        files = {**texts, MANIFEST: json_text(manifest.to_json())}
        for name, text in files.items():
            write_synced(partial / name, text.encode())
        for d in manifest.disks:
            path = partial / d.path
            host_folders.set_owner(path, mode=0o600)
            fsync_path(path)
        fsync_path(partial)
        hook("metadata written")
        final = self.final_dir(uuid, manifest.id)
        partial.rename(final)
        fsync_path(final.parent)
        hook("renamed")
        return final

    def stale_partials(self) -> list[Path]:
        """Leftovers of backups that crashed before their rename."""
        if not self.root.is_dir():
            return []
        return sorted(self.root.glob("*/*.partial"))

    # --- backups ---

    def backups(
        self,
        uuid: str,
        problems: list[str] | None = None,
        *,
        hidden: bool = False,
        operation: Operation = Operation.READ,
    ) -> list[StoredBackup]:
        """The committed backups of one domain, oldest first (ids sort by
        time), for `operation`. Those an unfinished prune is removing are
        left out unless `hidden`. An unreadable manifest, or one of a format
        version `operation` does not take, raises, or, given `problems`, is
        reported there and skipped."""
        domain_dir = self.domain_dir(uuid)
        if not domain_dir.is_dir():
            return []
        gone = set() if hidden else self.being_removed(uuid)
        out = []
        for folder in sorted(domain_dir.iterdir()):
            if not _is_backup_folder(folder) or folder.name in gone:
                continue
            try:
                out.append(StoredBackup(folder, read_manifest(folder, operation=operation)))
            except VirtBackupError as exc:
                if problems is None:
                    raise
                problems.append(str(exc))
        return out

    def backup(self, uuid: str, backup_id: str) -> StoredBackup:
        folder = self.final_dir(uuid, backup_id)
        return StoredBackup(folder, read_manifest(folder))

    def chain(self, folder: Path, operation: Operation = Operation.READ) -> list[StoredBackup]:
        """The backup in `folder` and every backup it restores through,
        newest first (its parent, the parent's parent, ... the standalone),
        each of a format version `operation` takes."""
        out = [StoredBackup(folder, read_manifest(folder, operation=operation))]
        while (parent := out[-1].manifest.parent) is not None:
            if any(b.manifest.id == parent for b in out):
                raise RepositoryFormatError(folder / MANIFEST, f"the chain loops at {parent}")
            above = folder.parent / parent
            out.append(StoredBackup(above, read_manifest(above, operation=operation)))
        return out

    def count_backup_folders(self) -> int:
        """Committed backup folders, without reading them: a cheap check
        that a repository is not empty."""
        if not self.root.is_dir():
            return 0
        return sum(1 for _ in self.root.glob(f"*/*/{MANIFEST}"))

    # --- the prune journal ---

    def journal(self, uuid: str) -> PruneJournal | None:
        """The domain's unfinished prune, if any. One that cannot be read
        is refused (RepositoryFormatError saying what to do): the domain's
        prunes wait on it; everything else goes on."""
        path = self.domain_dir(uuid) / PRUNE_JOURNAL
        try:
            data = read_json(path, missing_ok=True)
            return None if data is None else PruneJournal.from_json(data, path)
        except RepositoryFormatError as exc:
            raise RepositoryFormatError(
                exc.path,
                f"{exc.problem}; prune journal refused, nothing of it is done: {REFUSED_ADVICE} "
                "(this domain's prune, verify and restore wait until then)",
            ) from exc

    def write_journal(self, uuid: str, journal: PruneJournal) -> None:
        replace_json(self.domain_dir(uuid) / PRUNE_JOURNAL, journal.to_json())

    def drop_journal(self, uuid: str) -> None:
        (self.domain_dir(uuid) / PRUNE_JOURNAL).unlink(missing_ok=True)
        fsync_path(self.domain_dir(uuid))

    def being_removed(self, uuid: str) -> frozenset[str]:
        """Backups an unfinished prune is taking out: no longer restore points."""
        journal = self.journal(uuid)
        return journal.removing if journal is not None else frozenset()

    # --- undo logs ---

    def write_undo(self, log: UndoLog) -> None:
        folder = self.domain_dir(log.domain_uuid) / UNDO_DIR
        if not folder.is_dir():
            host_folders.make_folder(folder)
            fsync_path(folder.parent)
        replace_json(folder / f"{log.backup_id}.json", log.to_json())

    def undo_logs(self, uuid: str) -> list[UndoLog]:
        folder = self.domain_dir(uuid) / UNDO_DIR
        out = []
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                data = read_json(path, missing_ok=True)
                if data is not None:
                    out.append(UndoLog.from_json(data, path, self.domain_dir(uuid)))
            except RepositoryFormatError as exc:
                # Never acted on (its steps delete folders as root), never
                # in the way of anything else: named, and left for a human.
                log.error(
                    "undo log refused; nothing of it is taken back",
                    error=f"{exc}; {REFUSED_ADVICE} (with what it names, if its backup ran)",
                )
        return out

    def drop_undo(self, uuid: str, backup_id: str) -> None:
        path = self.domain_dir(uuid) / UNDO_DIR / f"{backup_id}.json"
        if path.exists():
            path.unlink()
            fsync_path(path.parent)

    # --- holds ---

    def add_hold(self, hold: Hold) -> None:
        folder = self.domain_dir(hold.domain_uuid) / HOLDS_DIR
        host_folders.make_folder(folder)
        replace_json(folder / f"{hold.id}.json", hold.to_json())

    def holds(self, uuid: str | None = None, strict: bool = False) -> list[Hold]:
        """The holds of one domain, or of every domain in the repository. A
        hold that cannot be read is logged and acted on in no way; `strict`
        (prune) refuses instead: it may keep backups in use."""
        dirs = [self.domain_dir(uuid)] if uuid is not None else self.domain_dirs()
        out = []
        for d in dirs:
            folder = d / HOLDS_DIR
            for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
                try:
                    data = read_json(path, missing_ok=True)
                    if data is not None:
                        out.append(Hold.from_json(data, path, self.root))
                except RepositoryFormatError as exc:
                    if strict:
                        raise RepositoryFormatError(
                            path,
                            f"{exc.problem}; a hold that cannot be read may keep backups in "
                            "use (a newer virtbackup's live restore or mount): nothing is "
                            "pruned until it reads, or is removed",
                        ) from exc
                    log.error("hold refused; nothing of it is acted on", error=str(exc))
        return out

    def drop_hold(self, hold: Hold) -> None:
        path = self.domain_dir(hold.domain_uuid) / HOLDS_DIR / f"{hold.id}.json"
        if path.exists():
            path.unlink()
            fsync_path(path.parent)

    def held(self, uuid: str) -> dict[str, list[Hold]]:
        """Backup id -> the holds on it, for every backup of `uuid` that a
        hold reads: the held backups and every backup their chains go
        through (an overlay reads its parents)."""
        out: dict[str, list[Hold]] = {}
        holds = self.holds(uuid, strict=True)
        if not holds:
            return out
        parent = {b.manifest.id: b.manifest.parent for b in self.backups(uuid)}
        for h in holds:
            at: str | None = h.backup_id
            while at is not None and at in parent:
                out.setdefault(at, []).append(h)
                at = parent[at]
        return out

    # --- failed attempts ---

    def record_attempt(self, attempt: FailedAttempt) -> None:
        folder = self.domain_dir(attempt.domain_uuid) / ATTEMPTS_DIR
        host_folders.make_folder(folder)
        replace_json(folder / f"{attempt.backup_id}.json", attempt.to_json())
        for old in sorted(folder.glob("*.json"))[:-KEPT_ATTEMPTS]:
            old.unlink(missing_ok=True)

    def attempts(self, uuid: str, problems: list[str] | None = None) -> list[FailedAttempt]:
        folder = self.domain_dir(uuid) / ATTEMPTS_DIR
        out = []
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                data = read_json(path, missing_ok=True)
                if data is not None:
                    out.append(
                        FailedAttempt.from_json(data, path, file_id=path.stem, folder_uuid=uuid)
                    )
            except VirtBackupError as exc:
                if problems is None:
                    raise
                problems.append(str(exc))
        return out


def _no_step(_: str) -> None:
    pass


def _is_backup_folder(folder: Path) -> bool:
    return folder.is_dir() and not folder.name.endswith(".partial") and folder.name[0] != "."


def read_manifest(
    folder: Path, lazy_ranges: bool = False, *, operation: Operation = Operation.READ
) -> Manifest:
    """`lazy_ranges`: for a listing; the disks' range lists (100 000
    entries in a fragmented backup) are neither decoded nor checked until
    something reads them. `operation`: what the caller does with the
    backup; a format version it does not take is refused by name."""
    path = folder / MANIFEST
    cuts: list[str] | None = [] if lazy_ranges else None
    data = read_json(path, cuts=cuts)
    manifest = Manifest.from_json(data, path, cuts)
    # A manifest copied into another backup's folder would make that
    # backup another; its id must name the folder it is in.
    names = (manifest.id, f"{manifest.id}.partial", f".{manifest.id}.removing")
    if folder.name not in names:
        raise RepositoryFormatError(
            path, f"field id: {manifest.id!r} is not the name of its folder {folder.name!r}"
        )
    manifest.check_version(path, operation)
    return manifest


def remove_backup(domain_dir: Path, backup_id: str, hook: StepHook) -> None:
    """Delete a committed backup's folder, crash-safe: it is first renamed
    to a hidden name (no longer a backup to any reader; read_manifest
    still accepts its manifest there), then deleted. Run again after a
    crash, it finishes either step."""
    folder, doomed = domain_dir / backup_id, domain_dir / f".{backup_id}.removing"
    if folder.exists():
        folder.rename(doomed)
        fsync_path(domain_dir)
        hook(f"hid {backup_id}")
    if doomed.exists():
        shutil.rmtree(doomed)
        fsync_path(domain_dir)
        hook(f"removed {backup_id}")


def write_manifest(folder: Path, manifest: Manifest, pieces: Mapping[str, bytes]) -> None:
    """Replace a backup's manifest (merges rewrite it) and, first, the
    piece files it names: each atomically. A crash in between leaves the
    old manifest naming a piece file that no longer matches its digest, so
    the new piece files get new names (``<disk>.<n>.pieces``) and the old
    ones are removed only after the new manifest is in place."""
    old = read_manifest(folder) if (folder / MANIFEST).exists() else None
    for d in manifest.disks:
        if d.pieces is not None and d.disk in pieces:
            write_synced(folder / d.pieces, pieces[d.disk])
    fsync_path(folder)
    replace_json(folder / MANIFEST, manifest.to_json())
    if old is not None:
        keep = {d.pieces for d in manifest.disks}
        for d in old.disks:
            if d.pieces is not None and d.pieces not in keep:
                (folder / d.pieces).unlink(missing_ok=True)


def read_document(
    folder: Path, manifest: Manifest, name: str, *, accept_edited: bool = False
) -> Document:
    """`name` (domain.xml or checkpoint.xml) of the backup in `folder`,
    checked against the manifest's digest: one that does not match raises
    DocumentDigestError unless `accept_edited`."""
    path = folder / name
    data = read_bounded(path, MAX_DOCUMENT_BYTES)
    trust = judge_document(
        path, data, manifest.documents, name, MANIFEST, accept_edited=accept_edited
    )
    return Document(path, decode_text(path, data), trust)


def has_document(folder: Path, name: str) -> bool:
    """Whether the backup in `folder` has its document `name`."""
    return (folder / name).is_file()


def document_path(folder: Path, name: str) -> Path:
    """Where the document `name` of the backup in `folder` is (to name it)."""
    return folder / name


def read_pieces(folder: Path, disk: DiskRecord) -> list[Piece]:
    """The disk's piece hashes, checked against its recorded digest."""
    if disk.pieces is None:
        raise RepositoryFormatError(folder / MANIFEST, f"disk {disk.disk} has no piece file")
    path = folder / disk.pieces
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RepositoryFormatError(path, f"cannot read: {exc.strerror or exc}") from exc
    return checked_pieces(data, path, disk.digest)


if TYPE_CHECKING:
    # The local folder backend is one RepositoryStorage (mypy checks it here).
    _STORAGE: RepositoryStorage = Repository(Path())
