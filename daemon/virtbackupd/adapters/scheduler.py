"""APScheduler (3.x): the only module that imports it.

APScheduler is only the timer here: when a job fires next is asked of
:mod:`virtbackupd.core.cron` (crontab(5) semantics) through
:class:`CrontabTrigger`, which also adds the jitter, spreading the
backups of many domains with the same schedule over `jitter` seconds.
What was missed while the daemon was down is decided from the state
store (see :mod:`virtbackupd.daemon.decisions`), not from APScheduler's
memory. Cron expressions are read in the zone given (the daemon's
`schedule.timezone`, by default the host's local time); APScheduler gets
aware datetimes, so its own zone does not matter.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger

from virtbackupd.core.cron import Cron, parse_cron

#: Seconds of random delay added to each scheduled run (docs/configuration.md).
JITTER_S = 30


class CrontabTrigger(BaseTrigger):  # type: ignore[misc]
    """Fires at the expression's minutes, each run delayed by a random
    0..jitter seconds."""

    def __init__(
        self,
        cron: Cron,
        jitter: float,
        rng: random.Random | None = None,
        zone: tzinfo = UTC,
    ) -> None:
        self.cron = cron
        self.jitter = jitter
        self.zone = zone
        self._rng = rng or random.Random()  # noqa: S311 (spreading load, not security)

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        # The previous fire time carries its jitter; the minute it belongs
        # to is what counts (next_after is strictly after that minute).
        base = previous_fire_time if previous_fire_time is not None else now
        nxt = self.cron.next_after(base.astimezone(self.zone))
        if nxt is None:
            return None
        return nxt + timedelta(seconds=self._rng.uniform(0, self.jitter))

    def __str__(self) -> str:
        return f"crontab[{self.cron.expr}]"


class Schedules:
    """The daemon's cron jobs; `sync` makes them exactly the given set.
    Usable before `start` (status asks for next runs at any time)."""

    def __init__(
        self, fire: Callable[[str, str], None], jitter: float = JITTER_S, zone: tzinfo = UTC
    ) -> None:
        self._fire = fire
        self._jitter = jitter
        self.zone = zone
        self._scheduler = AsyncIOScheduler(timezone="UTC")
        self._jobs: dict[str, Cron] = {}  # job id -> cron

    def start(self) -> None:
        self._scheduler.start()

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def set_zone(self, zone: tzinfo) -> None:
        """Read the expressions in `zone` from now on (a reload changed
        `schedule.timezone`): every job is made again at the next `sync`."""
        if zone == self.zone:
            return
        self.zone = zone
        for job_id in list(self._jobs):
            self._scheduler.remove_job(job_id)
            del self._jobs[job_id]

    def sync(self, wanted: Mapping[tuple[str, str], str]) -> None:
        """`wanted`: (domain uuid, level) -> cron expression (validated)."""
        ids = {f"{uuid}:{level}": (uuid, level, cron) for (uuid, level), cron in wanted.items()}
        for job_id in set(self._jobs) - set(ids):
            self._scheduler.remove_job(job_id)
            del self._jobs[job_id]
        for job_id, (uuid, level, expr) in ids.items():
            current = self._jobs.get(job_id)
            if current is not None and current.expr == expr:
                continue
            if current is not None:
                self._scheduler.remove_job(job_id)
            cron = parse_cron(expr)
            kwargs: dict[str, Any] = {
                "args": (uuid, level, job_id),
                "id": job_id,
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": None,
            }
            # A coroutine job: APScheduler runs it on the event loop. A plain
            # function would run in a thread pool, and `fire` must not touch
            # the daemon's asyncio state from another thread.
            self._scheduler.add_job(
                self._run, CrontabTrigger(cron, self._jitter, zone=self.zone), **kwargs
            )
            self._jobs[job_id] = cron

    async def _run(self, uuid: str, level: str, _job_id: str) -> None:
        self._fire(uuid, level)

    def next_run(self, uuid: str, level: str, now: datetime | None = None) -> datetime | None:
        """When the schedule fires next (before its jitter), in the
        schedules' zone, from the cron itself: valid whether or not the
        scheduler has started."""
        cron = self._jobs.get(f"{uuid}:{level}")
        if cron is None:
            return None
        return cron.next_after((now or datetime.now(UTC)).astimezone(self.zone))
