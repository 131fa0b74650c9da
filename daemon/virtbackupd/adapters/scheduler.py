"""APScheduler (3.x): the only module that imports it.

One job per (domain, level), cron triggers in UTC with random jitter. What
was missed while the daemon was down is decided from the state store
(:func:`missed_since`), not from APScheduler's memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger


def validate_cron(expr: str) -> None:
    """Raise ValueError naming what is wrong with a 5-field cron expression."""
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"{len(fields)} fields instead of 5")
    CronTrigger.from_crontab(expr, timezone="UTC")


def missed_since(expr: str, since: datetime, now: datetime) -> bool:
    """Whether `expr` fired at least once after `since` and up to `now`."""
    trigger = CronTrigger.from_crontab(expr, timezone="UTC")
    nxt = trigger.get_next_fire_time(None, since)
    return nxt is not None and since < nxt <= now


class Schedules:
    """The daemon's cron jobs; `sync` makes them exactly the given set."""

    def __init__(self, fire: Callable[[str, str], None], jitter: int = 30) -> None:
        self._fire = fire
        self._jitter = jitter
        self._scheduler = AsyncIOScheduler(timezone="UTC")
        self._jobs: dict[str, str] = {}  # job id -> cron

    def start(self) -> None:
        self._scheduler.start()

    def shutdown(self) -> None:
        self._scheduler.shutdown(wait=False)

    def sync(self, wanted: Mapping[tuple[str, str], str]) -> None:
        """`wanted`: (domain uuid, level) -> cron expression."""
        ids = {f"{uuid}:{level}": (uuid, level, cron) for (uuid, level), cron in wanted.items()}
        for job_id in set(self._jobs) - set(ids):
            self._scheduler.remove_job(job_id)
            del self._jobs[job_id]
        for job_id, (uuid, level, cron) in ids.items():
            if self._jobs.get(job_id) == cron:
                continue
            if job_id in self._jobs:
                self._scheduler.remove_job(job_id)
            self._scheduler.add_job(
                self._fire,
                CronTrigger.from_crontab(cron, timezone="UTC"),
                args=(uuid, level),
                id=job_id,
                jitter=self._jitter,
                coalesce=True,
                max_instances=1,
                misfire_grace_time=None,
            )
            self._jobs[job_id] = cron

    def next_run(self, uuid: str, level: str) -> datetime | None:
        job = self._scheduler.get_job(f"{uuid}:{level}")
        return job.next_run_time if job is not None else None
