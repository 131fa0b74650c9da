"""Choosing the restore point: a backup by id, or the newest one taken at
or before a time. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from virtbackupd.core.records import BackupRecord, BackupStatus
from virtbackupd.errors import RestoreError, UnknownRestorePointError


def parse_time(text: str) -> datetime:
    """ISO 8601; a time without an offset is UTC (the journal's and the
    backup ids' zone), said in the docs."""
    try:
        t = datetime.fromisoformat(text)
    except ValueError as exc:
        raise UnknownRestorePointError(
            f"--at {text!r} is not an ISO 8601 time (e.g. 2026-11-24T06:00:00Z)"
        ) from exc
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def pick_backup(
    backups: Sequence[BackupRecord], backup_id: str | None = None, at: datetime | None = None
) -> BackupRecord:
    """`backups`: one domain's, oldest first."""
    complete = [b for b in backups if b.status is BackupStatus.COMPLETE]
    if backup_id is not None:
        for b in backups:
            if b.id == backup_id:
                if b.status is not BackupStatus.COMPLETE:
                    raise RestoreError(f"backup {backup_id} is {b.status.value}, not complete")
                return b
        raise UnknownRestorePointError(
            f"no backup {backup_id} of this domain; `virtbackup list` shows the ids"
        )
    if not complete:
        raise RestoreError("the domain has no complete backup")
    if at is None:
        return complete[-1]
    before = [b for b in complete if b.started <= at]
    if not before:  # a time that names no backup: input, exit 2 (docs/cli.md)
        raise UnknownRestorePointError(
            f"no complete backup was taken at or before {at.isoformat()} "
            f"(the oldest is {complete[0].id}, started {complete[0].started.isoformat()})"
        )
    return before[-1]
