"""What a repository's storage backend offers: the seam a second backend
(object storage) plugs into. adapters.repository.Repository is the local
folder backend; it alone knows file and folder names. The types stored are
this package's; a backend reads and writes them whole, atomically, and
checks each as untrusted input when it reads it (their from_json)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from virtbackupd.core.repository_format.attempts import FailedAttempt
from virtbackupd.core.repository_format.holds import Hold
from virtbackupd.core.repository_format.manifest import Manifest
from virtbackupd.core.repository_format.prune_journal import PruneJournal
from virtbackupd.core.repository_format.undo import UndoLog

StepHook = Callable[[str], None]  # called after each durable step (tests crash there)


@dataclass(frozen=True)
class StoredBackup:
    """A committed backup: where it is (a local folder, or a backend's
    local view of it) and its manifest."""

    folder: Path
    manifest: Manifest


class RepositoryStorage(Protocol):
    """One repository's records, by domain UUID and backup id. Every write
    is atomic (a reader sees the old record or the new one) and durable
    before it returns; a record that cannot be read is refused by name
    (RepositoryFormatError), never half-used."""

    def identity(self) -> str | None:
        """The repository's id, None if it has none yet."""
        ...

    def make_identity(self) -> str:
        """The repository's id, given one first if it has none; two
        writers at once agree on one."""
        ...

    def commit(
        self,
        manifest: Manifest,
        texts: Mapping[str, str],
        pieces: Mapping[str, bytes],
        step: StepHook | None = None,
    ) -> Path:
        """Make the backup written under `manifest.id` count, with its
        documents (name -> text) and piece records (disk -> bytes): all or
        nothing."""
        ...

    def discard(self, uuid: str, backup_id: str) -> None:
        """Drop what an uncommitted backup wrote."""
        ...

    def backups(
        self, uuid: str, problems: list[str] | None = None, *, hidden: bool = False
    ) -> list[StoredBackup]:
        """The domain's committed backups, oldest first."""
        ...

    def backup(self, uuid: str, backup_id: str) -> StoredBackup: ...

    def journal(self, uuid: str) -> PruneJournal | None: ...

    def write_journal(self, uuid: str, journal: PruneJournal) -> None: ...

    def drop_journal(self, uuid: str) -> None: ...

    def write_undo(self, log: UndoLog) -> None: ...

    def undo_logs(self, uuid: str) -> list[UndoLog]:
        """The domain's undo logs; one that cannot be read is logged and
        left out (its steps are never acted on)."""
        ...

    def drop_undo(self, uuid: str, backup_id: str) -> None: ...

    def add_hold(self, hold: Hold) -> None: ...

    def holds(self, uuid: str | None = None) -> list[Hold]: ...

    def drop_hold(self, hold: Hold) -> None: ...

    def record_attempt(self, attempt: FailedAttempt) -> None: ...

    def attempts(self, uuid: str, problems: list[str] | None = None) -> list[FailedAttempt]: ...
