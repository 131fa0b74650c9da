"""Which complete backups a retention policy keeps. Pure: times in,
verdicts (with the rules that kept each one) out.

- ``keep_last N``: the N newest backups;
- ``keep_hourly/daily/weekly/monthly/yearly N``: going back from the
  newest, the newest backup of each of the N most recent hours / days / ISO
  weeks / months / years that have a backup. Periods are counted in UTC.
- A backup is kept if any rule keeps it. The newest backup is always kept:
  the next incremental builds on it.
- A policy with no rule at all keeps everything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from virtbackupd.core.policy import Retention


@dataclass(frozen=True)
class Point:
    id: str
    time: datetime


@dataclass(frozen=True)
class Verdict:
    id: str
    keep: bool
    reasons: tuple[str, ...]  # the rules that keep it; empty when pruned


def _period(fmt: str) -> Callable[[datetime], str]:
    return lambda t: t.astimezone(UTC).strftime(fmt)


def _iso_week(t: datetime) -> str:
    year, week, _ = t.astimezone(UTC).isocalendar()
    return f"{year}-W{week:02d}"


RULES: tuple[tuple[str, str, Callable[[datetime], str]], ...] = (
    ("keep_hourly", "hourly", _period("%Y-%m-%dT%H")),
    ("keep_daily", "daily", _period("%Y-%m-%d")),
    ("keep_weekly", "weekly", _iso_week),
    ("keep_monthly", "monthly", _period("%Y-%m")),
    ("keep_yearly", "yearly", _period("%Y")),
)


def decide(points: Sequence[Point], retention: Retention) -> list[Verdict]:
    """One verdict per point, in the order given."""
    newest_first = sorted(points, key=lambda p: (p.time, p.id), reverse=True)
    reasons: dict[str, list[str]] = {p.id: [] for p in points}
    if retention.keeps_everything:
        for p in points:
            reasons[p.id].append("no retention rule")
    else:
        for p in newest_first[: retention.keep_last]:
            reasons[p.id].append("last")
        for field_name, label, period_of in RULES:
            limit: int = getattr(retention, field_name)
            seen: set[str] = set()
            for p in newest_first:
                if len(seen) >= limit:
                    break
                period = period_of(p.time)
                if period not in seen:
                    seen.add(period)
                    reasons[p.id].append(f"{label} {period}")
    if newest_first and not reasons[newest_first[0].id]:
        reasons[newest_first[0].id].append("newest")
    return [Verdict(p.id, bool(reasons[p.id]), tuple(reasons[p.id])) for p in points]
