"""A failed backup attempt, kept so that a rebuilt catalogue still shows it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from virtbackupd.core.policy import Level
from virtbackupd.core.records import BackupRecord, BackupStatus
from virtbackupd.core.repository_format.codec import Fields
from virtbackupd.core.repository_format.names import MAX_NAME_CHARS, escaped
from virtbackupd.core.repository_format.versions import ATTEMPT_FORMAT, RECORD_VERSION

MAX_ERROR_CHARS = 16 * 1024  # what an attempt's error may say


@dataclass(frozen=True)
class FailedAttempt:
    """A backup that did not complete: kept in the repository so that a
    rebuilt catalogue still shows it."""

    backup_id: str
    domain_name: str
    domain_uuid: str
    level: Level
    started: datetime
    finished: datetime
    error: str
    parent: str | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "format": ATTEMPT_FORMAT,
            "format_version": RECORD_VERSION,
            "backup_id": self.backup_id,
            "domain": {"name": self.domain_name, "uuid": self.domain_uuid},
            "level": self.level.value,
            "started": self.started.isoformat(),
            "finished": self.finished.isoformat(),
            # Cut to what a reader takes (MAX_ERROR_CHARS): a long tool
            # output must not make the record unreadable.
            "error": self.error[:MAX_ERROR_CHARS],
            "parent": self.parent,
        }

    @classmethod
    def from_json(
        cls, data: object, path: Path, *, file_id: str, folder_uuid: str
    ) -> FailedAttempt:
        """Read from where the storage keeps the attempt `file_id` of the
        domain `folder_uuid`: a rebuilt catalogue records it as a backup
        row, so its id must be the one it is stored under, its domain the
        one it is stored with, its parent a backup id, its texts short
        single lines."""
        f = Fields(data, path)
        fmt = f.text("format")
        if fmt != ATTEMPT_FORMAT:
            raise f.error("format", f"{fmt[:40]!r} is not {ATTEMPT_FORMAT!r}")
        if f.integer("format_version") > RECORD_VERSION:
            raise f.error("format_version", f"newer than this virtbackupd reads ({RECORD_VERSION})")
        backup_id = f.backup_id("backup_id")
        if backup_id != file_id:
            raise f.error("backup_id", f"{backup_id!r} is not the file's own name {file_id!r}")
        domain = f.sub("domain")
        uuid = domain.uuid("uuid")
        if uuid != folder_uuid:
            raise domain.error(
                "uuid", f"{uuid!r} is not the domain folder it is in ({folder_uuid})"
            )
        return cls(
            backup_id,
            domain.line("name", MAX_NAME_CHARS),
            uuid,
            f.enum("level", Level),
            f.time("started"),
            f.time("finished"),
            escaped(f.bounded_text("error", MAX_ERROR_CHARS)),
            f.opt_backup_id("parent"),
        )

    def as_record(self) -> BackupRecord:
        return BackupRecord(
            id=self.backup_id,
            domain_uuid=self.domain_uuid,
            domain_name=self.domain_name,
            level=self.level,
            status=BackupStatus.FAILED,
            checkpoint=None,
            parent=self.parent,
            started=self.started,
            finished=self.finished,
            error=self.error,
        )
