"""Cron strings mean what crontab(5) says: 0 and 7 are Sunday, names,
ranges and steps, and the either-day rule when both day fields are set.
2026-11-22 is a Sunday."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from virtbackupd.adapters.scheduler import CrontabTrigger, Schedules
from virtbackupd.core.cron import parse_cron


def t(day: int, hour: int = 0, minute: int = 0, month: int = 11) -> datetime:
    return datetime(2026, month, day, hour, minute, tzinfo=UTC)


SUNDAY = t(22)


@pytest.mark.parametrize(
    ("expr", "after", "expected"),
    [
        # Sunday is 0 and 7, and by name; never Monday (APScheduler's 0).
        ("0 2 * * 0", t(20), t(22, 2)),
        ("0 2 * * 7", t(20), t(22, 2)),
        ("0 2 * * sun", t(20), t(22, 2)),
        ("0 2 * * SUN", t(20), t(22, 2)),
        # Monday to Friday: after Friday night comes Monday, not Saturday.
        ("0 2 * * 1-5", t(20, 3), t(23, 2)),
        ("0 2 * * mon-fri", t(20, 3), t(23, 2)),
        ("0 2 * * 1-5", t(22, 12), t(23, 2)),  # from Sunday noon: Monday
        # A range running into 7: Friday, Saturday, Sunday.
        ("30 1 * * 5-7", t(23), t(27, 1, 30)),
        ("30 1 * * 5-7", t(28, 2), t(29, 1, 30)),
        # Steps.
        ("*/15 * * * *", t(22, 10, 1), t(22, 10, 15)),
        ("0 */4 * * *", t(22, 5), t(22, 8)),
        ("0 1-10/3 * * *", t(22, 5), t(22, 7)),
        ("5/20 * * * *", t(22, 10, 6), t(22, 10, 25)),
        # Lists and month names.
        ("0 0 1 jan,jul *", t(22), datetime(2027, 1, 1, tzinfo=UTC)),
        ("0 12 15 * *", t(22), t(15, 12, month=12)),
        # Both day fields restricted: either one matches (the 1st, or Mondays).
        ("0 2 1 * 1", t(22), t(23, 2)),
        ("0 2 1 * 1", t(30, 3), t(1, 2, month=12)),
        # Day of month restricted, weekday '*': only the day of month.
        ("0 2 1 * *", t(22), t(1, 2, month=12)),
        # Shorthands.
        ("@weekly", t(20), t(22)),
        ("@daily", t(22, 0, 0), t(23)),
        ("@hourly", t(22, 5, 30), t(22, 6)),
        # Strictly after: the same minute is not "next".
        ("0 2 * * *", t(22, 2), t(23, 2)),
        # Leap day.
        ("0 0 29 2 *", t(22), datetime(2028, 2, 29, tzinfo=UTC)),
    ],
)
def test_next_fire_time(expr: str, after: datetime, expected: datetime) -> None:
    assert parse_cron(expr).next_after(after) == expected


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("0 2 * *", "4 fields instead of 5"),
        ("0 2 * * 8", "day of week: 8 is outside 0-7"),
        ("60 * * * *", "minute: 60 is outside 0-59"),
        ("0 2 * * funday", "not a number or a name"),
        ("0 2 5-1 * *", "runs backwards"),
        ("*/0 * * * *", "step '0'"),
        ("0 0 31 2 *", "never fires"),
        ("@reboot", "unknown shorthand"),
        ("0,,5 * * * *", "empty list element"),
    ],
)
def test_bad_expressions_say_what_is_wrong(expr: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_cron(expr)


def test_fired_between_decides_missed_runs() -> None:
    nightly = parse_cron("0 2 * * *")
    last = t(23, 1)
    assert not nightly.fired_between(last, t(23, 1, 59))
    assert nightly.fired_between(last, t(23, 2))
    assert nightly.fired_between(last, t(25, 9))


def test_the_trigger_adds_jitter_within_bounds_and_keeps_the_minute() -> None:
    """The jitter really is applied (APScheduler ignores add_job(jitter=)
    beside a trigger instance), never more than asked, and a jittered run
    does not shift the next one."""
    trig = CrontabTrigger(parse_cron("0 2 * * 0"), jitter=30, rng=random.Random(7))
    first = trig.get_next_fire_time(None, SUNDAY)
    assert first is not None
    assert t(22, 2) <= first <= t(22, 2) + timedelta(seconds=30)
    assert first != t(22, 2)
    second = trig.get_next_fire_time(first, first)
    assert second is not None
    assert t(29, 2) <= second <= t(29, 2) + timedelta(seconds=30)


def test_next_runs_are_known_before_the_scheduler_starts() -> None:
    """Status is published at start, before APScheduler runs: asking for a
    job's next run then must work (it crashed with AttributeError)."""
    schedules = Schedules(lambda uuid, level: None)
    schedules.sync({("u1", "incremental"): "0 2 * * 7"})
    assert schedules.next_run("u1", "incremental", t(20)) == t(22, 2)
    assert schedules.next_run("u1", "full", t(20)) is None
