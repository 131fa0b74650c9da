"""APScheduler (3.x): the only module that imports it."""

from __future__ import annotations

from apscheduler.triggers.cron import CronTrigger


def validate_cron(expr: str) -> None:
    """Raise ValueError naming what is wrong with a 5-field cron expression."""
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"{len(fields)} fields instead of 5")
    CronTrigger.from_crontab(expr, timezone="UTC")
