"""Cron expressions as crontab(5) means them, as pure values.

Five fields, minute hour day-of-month month day-of-week, each a list of
``*``, ``N``, ``N-M``, optionally stepped (``*/15``, ``1-10/3``; ``N/S``
means ``N-max/S``). Day of week: 0 and 7 are Sunday, 1 Monday ... 6
Saturday; names (``sun``..``sat``, ``jan``..``dec``, any case) work in
lists and ranges; a range may run into Sunday as 7 (``5-7`` = Fri, Sat,
Sun). ``@hourly``, ``@daily``/``@midnight``, ``@weekly``, ``@monthly``,
``@yearly``/``@annually`` are the usual shorthands.

As in cron, when both day of month and day of week are restricted (their
field does not start with ``*``), a day matches if *either* matches:
``0 2 1 * 1`` fires on the 1st and on every Monday.

Times are evaluated in the time zone of the datetimes passed in (the
daemon passes its `schedule.timezone`, by default the host's local time,
as cron). Across a daylight-saving change it does what Debian's cron(8)
documents: a job at a fixed time (neither the minute nor the hour field
starts with ``*``) whose time is skipped when clocks go forward runs at
the change (the first minute after the gap), and runs once, at the first
occurrence, when clocks go back and its time repeats; a job with ``*`` in
its minute or hour field runs by the clock as it is: not at all in a
skipped hour, twice in a repeated one. Resolution is one minute; seconds
are not a field.
APScheduler's own ``CronTrigger.from_crontab`` counts 0 as Monday and
ANDs the two day fields; nothing here uses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_SHORTHANDS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
#: How far ahead a next fire time is searched: 28 years cover every
#: combination of weekday and leap day.
_HORIZON_DAYS = 366 * 28


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: Sequence[str] = ()
    names_from: int = 0  # the value of names[0]


_FIELDS = (
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day of month", 1, 31),
    _Field("month", 1, 12, _MONTHS, 1),
    # 7 is Sunday too; folded to 0 after parsing.
    _Field("day of week", 0, 7, _DAYS, 0),
)


@dataclass(frozen=True)
class Cron:
    """A parsed cron expression; `weekdays` has 0 for Sunday."""

    expr: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    days_restricted: bool
    weekdays_restricted: bool
    # Neither minute nor hour starts with `*`: cron's "fixed time" job,
    # moved out of a skipped hour and not repeated in a repeated one.
    fixed_time: bool = True

    def day_matches(self, day: datetime) -> bool:
        if day.month not in self.months:
            return False
        by_dom = day.day in self.days
        by_dow = (day.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return by_dom or by_dow
        return by_dom and by_dow

    def matches(self, t: datetime) -> bool:
        return t.minute in self.minutes and t.hour in self.hours and self.day_matches(t)

    def next_after(self, t: datetime) -> datetime | None:
        """The first minute strictly after `t` at which the expression
        fires (seconds zero, in `t`'s time zone, with the daylight-saving
        rules above for an aware `t`); None if it never does."""
        zone = t.tzinfo
        if zone is None:  # a naive wall clock: no gaps, no repeats
            return self._next_wall(t)
        # Compared as instants: aware datetimes of one zone compare by
        # their wall clock, ignoring `fold` (the repeated hour).
        start = t.astimezone(UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
        day = start.astimezone(zone).replace(tzinfo=None, hour=0, minute=0, second=0)
        hours = sorted(self.hours)
        minutes = sorted(self.minutes)
        for _ in range(_HORIZON_DAYS):
            if self.day_matches(day):
                walls = (day.replace(hour=h, minute=m) for h in hours for m in minutes)
                if not _changes_offset(day, zone):  # the wall clock runs as time does
                    for wall in walls:
                        instant = wall.replace(tzinfo=zone).astimezone(UTC)
                        if instant >= start:
                            return instant.astimezone(zone)
                else:
                    fires = [i for w in walls for i in self._instants(w, zone) if i >= start]
                    if fires:
                        return min(fires).astimezone(zone)
            day = _next_day(day)
        return None

    def _instants(self, wall: datetime, zone: tzinfo) -> list[datetime]:
        """When the naive local time `wall` happens, as UTC instants: one;
        none or the end of the gap when clocks skip it; one or two when it
        repeats (see the module's daylight-saving rules)."""
        first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
        second = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
        if first == second:
            return [first]
        if first < second:  # a repeated time: fold 0 is the earlier one
            return [first] if self.fixed_time else [first, second]
        # A skipped time (fold 0 reads it with the offset before the gap).
        if not self.fixed_time:
            return []
        after = wall
        while (
            after.replace(tzinfo=zone).astimezone(UTC).astimezone(zone).replace(tzinfo=None)
            != after
        ):
            after += timedelta(minutes=1)
        return [after.replace(tzinfo=zone).astimezone(UTC)]

    def _next_wall(self, t: datetime) -> datetime | None:
        start = t.replace(second=0, microsecond=0) + timedelta(minutes=1)
        day = start.replace(hour=0, minute=0)
        hours = sorted(self.hours)
        minutes = sorted(self.minutes)
        for _ in range(_HORIZON_DAYS):
            if self.day_matches(day):
                for h in hours:
                    for m in minutes:
                        candidate = day.replace(hour=h, minute=m)
                        if candidate >= start:
                            return candidate
            day = _next_day(day)
        return None

    def fired_between(self, since: datetime, until: datetime) -> bool:
        """Whether it fired at least once after `since` and up to `until`."""
        nxt = self.next_after(since)
        return nxt is not None and nxt <= until

    def fires_at(self, minute: datetime) -> bool:
        """Whether it fires at this minute (aware: by the rules above, so a
        fixed-time job moved out of a skipped hour fires at the change)."""
        if minute.tzinfo is None:
            nxt = self.next_after(minute - timedelta(minutes=1))
            return nxt is not None and nxt == minute.replace(second=0, microsecond=0)
        # In UTC: wall-clock arithmetic would leave a repeated hour.
        at = minute.astimezone(UTC).replace(second=0, microsecond=0)
        nxt = self.next_after((at - timedelta(minutes=1)).astimezone(minute.tzinfo))
        return nxt is not None and nxt.astimezone(UTC) == at


def _changes_offset(day: datetime, zone: tzinfo) -> bool:
    """Whether the zone's UTC offset changes during this (naive) local day."""
    first = day.replace(tzinfo=zone).utcoffset()
    last = day.replace(hour=23, minute=59, tzinfo=zone, fold=1).utcoffset()
    return first != last or day.replace(tzinfo=zone, fold=1).utcoffset() != first


def _next_day(day: datetime) -> datetime:
    """Midnight of the next calendar day, also across a DST change
    (adding 24 h to an aware local midnight could land at 23:00 or 01:00)."""
    nxt = day + timedelta(days=1, hours=3)
    return nxt.replace(hour=0, minute=0)


def parse_cron(expr: str) -> Cron:
    """Parse; ValueError says which field is wrong and why."""
    text = expr.strip()
    if text.startswith("@"):
        if text.lower() not in _SHORTHANDS:
            raise ValueError(
                f"unknown shorthand {text!r} (known: {', '.join(sorted(_SHORTHANDS))})"
            )
        text = _SHORTHANDS[text.lower()]
    parts = text.split()
    if len(parts) != 5:
        raise ValueError(
            f"{len(parts)} fields instead of 5 (minute hour day-of-month month day-of-week)"
        )
    values = [_parse_field(p, f) for p, f in zip(parts, _FIELDS, strict=True)]
    weekdays = frozenset(d % 7 for d in values[4])
    cron = Cron(
        expr=expr,
        minutes=values[0],
        hours=values[1],
        days=values[2],
        months=values[3],
        weekdays=weekdays,
        days_restricted=not parts[2].startswith("*"),
        weekdays_restricted=not parts[4].startswith("*"),
        fixed_time=not (parts[0].startswith("*") or parts[1].startswith("*")),
    )
    if cron.next_after(datetime(2000, 1, 1)) is None:
        raise ValueError("it never fires (no such day, e.g. 31 in a month that has 30)")
    return cron


def _parse_field(text: str, f: _Field) -> frozenset[int]:
    out: set[int] = set()
    for item in text.split(","):
        if not item:
            raise ValueError(f"{f.name}: empty list element in {text!r}")
        body, _, step_text = item.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f"{f.name}: step {step_text!r} is not a positive number")
            step = int(step_text)
        if body == "*":
            low, high = f.low, f.high
            if f.name == "day of week":
                high = 6  # '*' is each day once, not Sunday twice
        elif "-" in body:
            a, _, b = body.partition("-")
            low, high = _value(a, f), _value(b, f)
            if low > high:
                raise ValueError(f"{f.name}: range {body!r} runs backwards")
        else:
            low = _value(body, f)
            high = f.high if step_text else low
        out.update(range(low, high + 1, step))
    return frozenset(out)


def _value(text: str, f: _Field) -> int:
    word = text.lower()
    if f.names and word in f.names:
        return f.names.index(word) + f.names_from
    if not text.isdigit():
        hint = f" or a name ({', '.join(f.names)})" if f.names else ""
        raise ValueError(f"{f.name}: {text!r} is not a number{hint}")
    n = int(text)
    if not f.low <= n <= f.high:
        raise ValueError(f"{f.name}: {n} is outside {f.low}-{f.high}")
    return n
