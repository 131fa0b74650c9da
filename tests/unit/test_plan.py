"""Planning, table-style: history and libvirt's view in, level and reason out."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from virtbackupd.core.domain_xml import DomainDisk
from virtbackupd.core.plan import CheckpointView, Plan, plan_backup
from virtbackupd.core.policy import Level, Policy
from virtbackupd.core.records import (
    BackupRecord,
    BackupStatus,
    CheckpointRecord,
    CheckpointStatus,
    DiskRecord,
)
from virtbackupd.errors import PlanError

T0 = datetime(2026, 11, 1, tzinfo=UTC)
DISKS = (DomainDisk("vda", "disk", "file", "/i/vda.qcow2", "qcow2"),)
POLICY = Policy(Path("p.yaml"), domains=("web",), max_incrementals=2)


def rec(
    n: int,
    parent: int | None,
    status: BackupStatus = BackupStatus.COMPLETE,
    disks: tuple[str, ...] = ("vda",),
) -> BackupRecord:
    return BackupRecord(
        id=f"b{n}",
        domain_uuid="u",
        domain_name="web",
        level=Level.FULL if parent is None else Level.INCREMENTAL,
        status=status,
        checkpoint=f"virtbackupd-b{n}",
        parent=None if parent is None else f"b{parent}",
        started=T0 + timedelta(hours=n),
        disks=tuple(DiskRecord(d, f"{d}.qcow2", 1, 0, 0, 0, "", 1, ()) for d in disks),
    )


def cp(n: int, parent: int | None) -> CheckpointRecord:
    return CheckpointRecord(
        "u",
        f"virtbackupd-b{n}",
        None if parent is None else f"virtbackupd-b{parent}",
        T0,
        CheckpointStatus.ACTIVE,
        f"<xml{n}/>",
    )


def view(*known: int, broken: tuple[int, ...] = ()) -> CheckpointView:
    return CheckpointView(
        known=frozenset(f"virtbackupd-b{n}" for n in known),
        broken=frozenset(f"virtbackupd-b{n}" for n in broken),
    )


def plan(
    history: list[BackupRecord],
    v: CheckpointView,
    stored: list[CheckpointRecord] = [],  # noqa: B006
    want: Level | None = None,
    disks: tuple[DomainDisk, ...] = DISKS,
) -> Plan:
    return plan_backup(
        checkpoint="virtbackupd-new",
        disks=disks,
        policy=POLICY,
        history=history,
        stored_checkpoints=stored,
        view=v,
        want=want,
    )


@pytest.mark.parametrize(
    ("history", "v", "want", "level", "reason"),
    [
        ([], view(), None, Level.FULL, "no earlier complete backup"),
        ([rec(1, None)], view(1), Level.FULL, Level.FULL, "full backup requested"),
        ([rec(1, None)], view(1), None, Level.INCREMENTAL, "changes since virtbackupd-b1"),
        (
            [rec(1, None), rec(2, 1, BackupStatus.FAILED)],
            view(1, 2),
            None,
            Level.INCREMENTAL,
            "changes since virtbackupd-b1 (backup b1)",
        ),
        ([rec(1, None)], view(1, broken=(1,)), None, Level.FULL, "inconsistent or missing"),
        # A long chain stays incremental: pruning merges it shorter.
        (
            [rec(1, None), rec(2, 1), rec(3, 2)],
            view(1, 2, 3),
            None,
            Level.INCREMENTAL,
            "changes since virtbackupd-b3",
        ),
        ([rec(1, None, disks=("vdb",))], view(1), None, Level.FULL, "disk vda is not in backup b1"),
        ([rec(1, None)], view(), None, Level.FULL, "unknown to libvirt and not in the store"),
    ],
)
def test_plan_table(
    history: list[BackupRecord], v: CheckpointView, want: Level | None, level: Level, reason: str
) -> None:
    p = plan(history, v, want=want)
    assert p.level is level
    assert reason in p.reason
    if level is Level.INCREMENTAL:
        assert (
            p.parent_backup == history[-1 if history[-1].status is BackupStatus.COMPLETE else -2].id
        )


def test_lost_lineage_is_redefined_from_the_store_oldest_first() -> None:
    history = [rec(1, None), rec(2, 1)]
    p = plan(history, view(), stored=[cp(1, None), cp(2, 1)])
    assert p.level is Level.INCREMENTAL
    assert [c.name for c in p.redefine] == ["virtbackupd-b1", "virtbackupd-b2"]
    assert "redefining 2 checkpoint(s)" in p.reason
    p = plan(history, view(1), stored=[cp(1, None), cp(2, 1)])
    assert [c.name for c in p.redefine] == ["virtbackupd-b2"]


def test_broken_own_checkpoints_are_listed_for_deletion_foreign_ones_never() -> None:
    v = CheckpointView(
        known=frozenset({"virtbackupd-b1", "nightly"}),
        broken=frozenset({"virtbackupd-b1", "nightly"}),
    )
    p = plan([rec(1, None)], v)
    assert p.delete_checkpoints == ("virtbackupd-b1",)


def test_no_eligible_disk_is_an_error() -> None:
    cdrom = (DomainDisk("hdc", "cdrom", "file", None, "raw"),)
    with pytest.raises(PlanError, match="hdc: device is a cdrom"):
        plan([], view(), disks=cdrom)


def test_max_incrementals_zero_means_every_backup_is_full() -> None:
    p = plan_backup(
        checkpoint="virtbackupd-new",
        disks=DISKS,
        policy=replace(POLICY, max_incrementals=0),
        history=[rec(1, None)],
        stored_checkpoints=[],
        view=view(1),
    )
    assert p.level is Level.FULL
    assert "max_incrementals is 0" in p.reason


@pytest.mark.parametrize(
    ("size", "level", "reason"),
    [
        (1, Level.INCREMENTAL, "changes since virtbackupd-b1"),
        # Grown (virsh blockresize): incremental onto an overlay of the new size.
        (2, Level.INCREMENTAL, "disk vda grew from 1 to 2 bytes: overlay of the new size"),
        # Shrunk: nothing says what the bitmap kept; the disk is read whole.
        (0, Level.FULL, "disk vda shrank from 1 to 0 bytes since backup b1"),
        (None, Level.INCREMENTAL, "changes since virtbackupd-b1"),  # size unknown
    ],
)
def test_a_disk_that_changed_size(size: int | None, level: Level, reason: str) -> None:
    p = plan_backup(
        checkpoint="virtbackupd-new",
        disks=DISKS,
        policy=POLICY,
        history=[rec(1, None)],
        stored_checkpoints=[],
        view=view(1),
        sizes={} if size is None else {"vda": size},
    )
    assert p.level is level
    assert reason in p.reason


@pytest.mark.parametrize(
    ("path", "level"),
    [
        ("/backups/u/b1", Level.INCREMENTAL),
        ("/backups/u/b1/", Level.INCREMENTAL),
        ("/old-disk/u/b1", Level.FULL),  # the policy's target moved
        ("/backups-old/u/b1", Level.FULL),  # a prefix is not the folder
    ],
)
def test_a_parent_outside_the_current_repository_means_a_full(path: str, level: Level) -> None:
    p = plan_backup(
        checkpoint="virtbackupd-new",
        disks=DISKS,
        policy=POLICY,
        history=[replace(rec(1, None), path=path)],
        stored_checkpoints=[],
        view=view(1),
        repository="/backups",
    )
    assert p.level is level
    if level is Level.FULL:
        assert f"is in another repository ({path}): the target is now /backups" in p.reason


def test_disks_left_out_are_named_with_their_reason_removable_media_are_not() -> None:
    disks = (
        *DISKS,
        DomainDisk("vdb", "disk", "file", "/i/vdb.img", "raw"),
        DomainDisk("vdc", "disk", "file", "/i/vdc.qcow2", "qcow2"),
        DomainDisk("vdd", "disk", "file", "/i/vdd.qcow2", "qcow2", readonly=True),
        DomainDisk("hdc", "cdrom", "file", None, "raw"),
    )
    p = plan_backup(
        checkpoint="virtbackupd-new",
        disks=disks,
        policy=replace(POLICY, exclude_disks=frozenset({"vdc"})),
        history=[],
        stored_checkpoints=[],
        view=view(),
    )
    # Raw disks are in by default (copied whole every time).
    assert p.disks == ("vda", "vdb")
    assert [(d.disk, d.reason) for d in p.left_out] == [
        ("vdc", "excluded by policy"),
        ("vdd", "read-only disk"),
    ]


def test_a_last_backup_that_cannot_be_restored_starts_a_new_chain() -> None:
    """An incremental on a backup whose manifest (or one below it) is
    unreadable could not be restored either: the next backup is full."""
    history = [rec(1, None), rec(2, 1)]
    assert plan(history, view(1, 2)).level is Level.INCREMENTAL
    p = plan_backup(
        checkpoint="virtbackupd-new",
        disks=DISKS,
        policy=POLICY,
        history=history,
        stored_checkpoints=[],
        view=view(1, 2),
        last_unrestorable="on an unreadable chain: backup b1: …/manifest.json: not valid JSON",
    )
    assert p.level is Level.FULL
    assert p.reason.startswith("the last backup b2 cannot be restored (on an unreadable chain")
