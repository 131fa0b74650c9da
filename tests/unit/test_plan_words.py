"""A full backup's reason says what happened, not a guess (issue 24 item 6):
after `restore --in-place` the checkpoints are gone on purpose, and the
next full names the restore, not a crash."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from virtbackupd.core.domain_xml import DomainDisk
from virtbackupd.core.plan import CheckpointView, plan_backup
from virtbackupd.core.policy import Level, Policy
from virtbackupd.core.records import BackupRecord, BackupStatus, DiskRecord

T0 = datetime(2026, 11, 1, tzinfo=UTC)
LAST = BackupRecord(
    id="b1",
    domain_uuid="u",
    domain_name="web",
    level=Level.FULL,
    status=BackupStatus.COMPLETE,
    checkpoint="virtbackupd-b1",
    parent=None,
    started=T0,
    disks=(DiskRecord("vda", "vda.qcow2", 1, 0, 0, 0, "", 1, ()),),
)


def reason(v: CheckpointView) -> tuple[Level, str]:
    p = plan_backup(
        checkpoint="virtbackupd-new",
        disks=(DomainDisk("vda", "disk", "file", "/i/vda.qcow2", "qcow2"),),
        policy=Policy(Path("p.yaml"), domains=("web",)),
        history=[LAST],
        stored_checkpoints=[],
        view=v,
    )
    return p.level, p.reason


def test_after_an_in_place_restore_the_full_names_the_restore_not_a_crash() -> None:
    level, why = reason(
        CheckpointView(known=frozenset(), overwritten=frozenset({"virtbackupd-b1"}))
    )
    assert level is Level.FULL
    assert "restored in place" in why and "b1" in why
    assert "crash" not in why


def test_broken_bitmaps_still_say_crash() -> None:
    level, why = reason(
        CheckpointView(known=frozenset({"virtbackupd-b1"}), broken=frozenset({"virtbackupd-b1"}))
    )
    assert level is Level.FULL and "crash?" in why
