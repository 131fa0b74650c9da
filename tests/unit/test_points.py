"""Which backup a restore names: a time before every backup names none,
which is bad input (exit 2, docs/cli.md), like an unknown id; it was a
plain failure (exit 1; found by the hostile tester)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from virtbackupd.core.points import pick_backup
from virtbackupd.core.policy import Level
from virtbackupd.core.records import BackupRecord, BackupStatus
from virtbackupd.errors import InputError

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def _record(n: int, status: BackupStatus = BackupStatus.COMPLETE) -> BackupRecord:
    when = T0 + timedelta(hours=n)
    return BackupRecord(
        f"20261207T{12 + n:02d}0000.000Z-000{n}", "u", "vm", Level.FULL, status, None, None, when
    )


@pytest.mark.parametrize(
    ("backup_id", "at", "picked"),
    [
        (None, None, 2),
        (None, T0 + timedelta(hours=1, minutes=30), 1),
        ("20261207T120000.000Z-0000", None, 0),
    ],
)
def test_the_backup_a_restore_names(
    backup_id: str | None, at: datetime | None, picked: int
) -> None:
    backups = [_record(0), _record(1), _record(2)]
    assert pick_backup(backups, backup_id, at) == backups[picked]


@pytest.mark.parametrize(
    ("backup_id", "at"),
    [("20200101T000000.000Z-beef", None), (None, T0 - timedelta(days=1))],
)
def test_a_restore_point_that_names_nothing_is_bad_input(
    backup_id: str | None, at: datetime | None
) -> None:
    with pytest.raises(InputError):
        pick_backup([_record(0), _record(1)], backup_id, at)
