"""The daemon's decisions, without a clock, libvirt or a store: what an
event or a missed run asks for, how queued requests merge, what becomes
of a busy or failed request."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from virtbackupd.core.policy import EventAction, Level, Policy
from virtbackupd.core.records import BackupRecord, BackupStatus
from virtbackupd.daemon.decisions import (
    Trigger,
    event_request,
    merge,
    missed_request,
    outcome_of,
)
from virtbackupd.errors import BackupBusyError, BackupFailedError, DomainNotFoundError

FULL, INC = Level.FULL, Level.INCREMENTAL


def t(day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(2026, 11, day, hour, minute, tzinfo=UTC)


def rec(
    started: datetime, level: Level, status: BackupStatus = BackupStatus.COMPLETE
) -> BackupRecord:
    return BackupRecord(f"b{started:%d%H%M}", "u1", "web", level, status, None, None, started)


@pytest.mark.parametrize(
    ("pending", "new", "merged"),
    [(None, INC, INC), (None, FULL, FULL), (INC, INC, INC), (INC, FULL, FULL), (FULL, INC, FULL)],
)
def test_queued_requests_merge_full_wins(pending: Level | None, new: Level, merged: Level) -> None:
    assert merge(pending, new) is merged


POLICY = Policy(
    Path("p.yaml"),
    domains=("web",),
    on_define=EventAction.FULL,
    on_shutdown=EventAction.INCREMENTAL,
)


@pytest.mark.parametrize(
    ("trigger", "policy", "has_backups", "asked"),
    [
        (Trigger.DEFINED, POLICY, False, FULL),
        (Trigger.DEFINED, POLICY, True, None),  # a redefinition is an edit
        (Trigger.STOPPED, POLICY, True, INC),
        (Trigger.STOPPED, POLICY, False, INC),
        (Trigger.OTHER, POLICY, False, None),
        (Trigger.DEFINED, None, False, None),  # no policy governs it
        (Trigger.STOPPED, Policy(Path("q.yaml"), domains=("web",)), True, None),
    ],
)
def test_what_an_event_asks_for(
    trigger: Trigger, policy: Policy | None, has_backups: bool, asked: Level | None
) -> None:
    assert event_request(trigger, policy, has_backups) is asked


NIGHTLY_INC = {"incremental": "0 2 * * *"}
SUNDAY_FULL = {"full": "0 3 * * 0", "incremental": "0 2 * * *"}


@pytest.mark.parametrize(
    ("schedules", "history", "now", "asked"),
    [
        ({}, [rec(t(20), FULL)], t(25), None),  # no schedule
        (NIGHTLY_INC, [], t(25), None),  # never backed up: the schedule takes the first
        (NIGHTLY_INC, [rec(t(23, 1), FULL)], t(23, 1, 59), None),  # not missed yet
        (NIGHTLY_INC, [rec(t(23, 1), FULL)], t(23, 2), INC),
        (NIGHTLY_INC, [rec(t(20, 1), FULL)], t(25), INC),  # several missed: once
        # A failed attempt does not count as a backup.
        (
            NIGHTLY_INC,
            [rec(t(23, 1), FULL), rec(t(23, 2), INC, BackupStatus.FAILED)],
            t(23, 3),
            INC,
        ),
        # The Sunday full missed (last full before Sunday 03:00): full wins.
        (SUNDAY_FULL, [rec(t(21, 3), FULL), rec(t(22, 2, 1), INC)], t(22, 4), FULL),
        # Only the nightly incremental missed.
        (SUNDAY_FULL, [rec(t(22, 3, 1), FULL)], t(23, 2, 30), INC),
    ],
)
def test_what_a_missed_run_asks_for_at_start(
    schedules: dict[str, str], history: list[BackupRecord], now: datetime, asked: Level | None
) -> None:
    assert missed_request(schedules, history, now) is asked


def test_busy_requests_are_retried_and_failures_carry_their_reason() -> None:
    busy = outcome_of(BackupBusyError("another backup of web is running (process 12)"))
    assert busy.retry and not busy.ok and "process 12" in busy.reason
    failed = outcome_of(BackupFailedError("backup x of web failed: disk on fire"))
    assert not failed.retry and not failed.ok and "disk on fire" in failed.reason
    gone = outcome_of(DomainNotFoundError("no domain named 'web'"))
    assert not gone.retry and "gone" in gone.reason
    assert outcome_of(None).ok
    crash = outcome_of(KeyError("x"))
    assert not crash.retry and crash.reason


SCHED = {"full": "0 2 * * 0", "incremental": "0 2 * * *"}


@pytest.mark.parametrize(
    ("fired", "minute", "already", "asked"),
    [
        (INC, t(23, 2), None, INC),  # Monday: only the incremental fires
        (INC, t(22, 2), None, FULL),  # Sunday: both fire; the full serves both
        (FULL, t(22, 2), (t(22, 2), FULL), None),  # ...and the second asks nothing
        (INC, t(22, 2), (t(22, 2), FULL), None),
        (FULL, t(22, 2), None, FULL),
        (INC, t(23, 2), (t(22, 2), FULL), INC),  # last week's full is another minute
        (FULL, t(22, 2), (t(22, 2), INC), FULL),  # a stronger ask still goes through
    ],
)
def test_two_schedules_in_one_minute_make_one_backup(
    fired: Level, minute: datetime, already: tuple[datetime, Level] | None, asked: Level | None
) -> None:
    from virtbackupd.daemon.decisions import scheduled_request

    assert scheduled_request(fired, minute, SCHED, already) is asked
