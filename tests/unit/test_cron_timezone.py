"""Schedules in a time zone across daylight-saving changes, as Debian's
cron(8) does it (issue 24, item 8): a fixed-time job whose time is skipped
when clocks go forward runs at the change; in a repeated hour it runs
once; a job with `*` in its minute or hour field runs by the clock as it
is (skipped in a skipped hour, twice in a repeated one).

Europe/Berlin: 2026-03-29 02:00 CET -> 03:00 CEST (01:00 UTC);
2026-10-25 03:00 CEST -> 02:00 CET (01:00 UTC), 02:00-02:59 twice."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from virtbackupd.core.cron import parse_cron

BERLIN = ZoneInfo("Europe/Berlin")


def u(month: int, day: int, hour: int, minute: int = 0) -> datetime:
    """A UTC instant in 2026."""
    return datetime(2026, month, day, hour, minute, tzinfo=UTC)


@pytest.mark.parametrize(
    ("expr", "after", "expected"),
    [
        # Spring forward: 02:xx local does not exist on 03-29.
        ("30 2 * * *", u(3, 28, 23), u(3, 29, 1)),  # fixed: at the change (03:00 CEST)
        ("0 2 * * *", u(3, 28, 23), u(3, 29, 1)),
        ("59 2 * * *", u(3, 28, 23), u(3, 29, 1)),
        ("30 2 * * *", u(3, 29, 1), u(3, 30, 0, 30)),  # after the moved run: next day 02:30 CEST
        ("30 1 * * *", u(3, 28, 23), u(3, 29, 0, 30)),  # before the gap: 01:30 CET
        ("30 3 * * *", u(3, 28, 23), u(3, 29, 1, 30)),  # after it: 03:30 CEST
        ("30 * * * *", u(3, 29, 0, 30), u(3, 29, 1, 30)),  # wildcard hour: 02:30 never was
        ("*/20 2 * * *", u(3, 28, 23), u(3, 30, 0)),  # wildcard minute: skipped that day
        ("@hourly", u(3, 29, 0, 0), u(3, 29, 1)),  # 01:00 CET -> 03:00 CEST
        ("0 2 29 3 *", u(3, 28, 23), u(3, 29, 1)),  # once a year, in the gap: still runs
        # Fall back: 02:xx local happens twice on 10-25.
        ("30 2 * * *", u(10, 24, 22), u(10, 25, 0, 30)),  # first time: 02:30 CEST
        ("30 2 * * *", u(10, 25, 0, 30), u(10, 26, 1, 30)),  # not again at 02:30 CET
        ("30 2 * * *", u(10, 25, 1, 10), u(10, 26, 1, 30)),  # asked inside the repeat
        ("30 * * * *", u(10, 25, 0, 30), u(10, 25, 1, 30)),  # wildcard: 02:30 CET too
        ("30 * * * *", u(10, 25, 1, 30), u(10, 25, 2, 30)),  # then 03:30 CET
        ("*/30 2 * * *", u(10, 25, 0, 0), u(10, 25, 0, 30)),
        ("*/30 2 * * *", u(10, 25, 0, 30), u(10, 25, 1, 0)),  # 02:00 CET
        ("*/30 2 * * *", u(10, 25, 1, 0), u(10, 25, 1, 30)),  # 02:30 CET
        ("30 1 * * *", u(10, 24, 22), u(10, 24, 23, 30)),  # 01:30 CEST, once
        ("0 3 * * *", u(10, 24, 22), u(10, 25, 2)),  # 03:00 CET
        # An ordinary day: local time, not UTC.
        ("0 2 * * *", u(11, 21, 12), u(11, 22, 1)),  # 02:00 CET is 01:00 UTC
        ("0 2 * * *", u(7, 1, 12), u(7, 2, 0)),  # 02:00 CEST is 00:00 UTC
    ],
)
def test_next_run_in_berlin_across_dst(expr: str, after: datetime, expected: datetime) -> None:
    got = parse_cron(expr).next_after(after.astimezone(BERLIN))
    assert got is not None
    assert got.astimezone(UTC) == expected, got
    assert got.tzinfo is BERLIN  # shown in the schedule's zone
    assert got.utcoffset() == expected.astimezone(BERLIN).utcoffset()  # the right side of a fold


def test_a_fixed_job_runs_once_on_each_change_day() -> None:
    """Walking a daily job's runs over both change days: one run a day."""
    cron = parse_cron("30 2 * * *")
    for start, days in ((u(3, 27, 12), 4), (u(10, 23, 12), 4)):
        runs = []
        t = start.astimezone(BERLIN)
        for _ in range(days):
            nxt = cron.next_after(t)
            assert nxt is not None
            runs.append(nxt)
            t = nxt
        dates = [r.date() for r in runs]
        assert len(set(dates)) == days, runs


def test_an_hourly_job_runs_per_real_hour() -> None:
    """23 runs on the spring day, 25 on the autumn day (per hour that is)."""
    cron = parse_cron("15 * * * *")
    for day, count in ((29, 23), (25, 25)):
        month = 3 if day == 29 else 10
        t = datetime(2026, month, day, tzinfo=BERLIN)
        end = datetime(2026, month, day + 1, tzinfo=BERLIN)
        runs = 0
        while True:
            nxt = cron.next_after(t)
            assert nxt is not None
            if nxt.astimezone(UTC) >= end.astimezone(UTC):
                break
            runs += 1
            t = nxt
        assert runs == count


def test_missed_runs_count_across_the_gap() -> None:
    """Down from 00:00 to 04:00 UTC on the spring day: the 02:30 job, moved
    to 03:00 CEST (01:00 UTC), was missed."""
    cron = parse_cron("30 2 * * *")
    assert cron.fired_between(u(3, 28, 23).astimezone(BERLIN), u(3, 29, 4).astimezone(BERLIN))
    assert not cron.fired_between(u(3, 29, 1).astimezone(BERLIN), u(3, 29, 23).astimezone(BERLIN))


@pytest.mark.parametrize(
    ("expr", "minute", "fires"),
    [
        ("30 2 * * *", u(3, 29, 1), True),  # moved to the change
        ("0 3 * * *", u(3, 29, 1), True),  # and the 03:00 job is the same minute
        ("30 2 * * *", u(10, 25, 0, 30), True),
        ("30 2 * * *", u(10, 25, 1, 30), False),  # the repeat: not again
        ("30 * * * *", u(10, 25, 1, 30), True),
        ("0 2 * * *", u(11, 22, 1), True),
        ("0 2 * * *", u(11, 22, 2), False),
    ],
)
def test_fires_at(expr: str, minute: datetime, fires: bool) -> None:
    assert parse_cron(expr).fires_at(minute.astimezone(BERLIN)) is fires


def test_in_utc_nothing_moves() -> None:
    cron = parse_cron("30 2 * * *")
    assert cron.next_after(u(3, 28, 23)) == u(3, 29, 2, 30)
    assert cron.next_after(u(10, 25, 0)) == u(10, 25, 2, 30)
