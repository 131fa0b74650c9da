"""The daemon's decisions as pure functions: what a libvirt event means,
what an event or a missed run asks for, how queued requests merge, and
what becomes of a request whose domain is busy. No clock reads, no libvirt, no store: the service
passes in what it knows and carries the answer out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from enum import StrEnum

from virtbackupd.adapters.libvirt_events import EventKind
from virtbackupd.core.cron import parse_cron
from virtbackupd.core.policy import EventAction, Level, Policy
from virtbackupd.core.records import BackupRecord, BackupStatus


class Trigger(StrEnum):
    """What a libvirt event means to the daemon."""

    CONNECTED = "connected"  # (re)connected to libvirtd: resynchronise
    DISCONNECTED = "disconnected"
    DEFINED = "defined"  # resynchronise; ``events.on_define``
    UNDEFINED = "undefined"  # resynchronise
    STOPPED = "stopped"  # clean: shutdown or destroy; QEMU closed its images
    CRASHED = "crashed"  # QEMU died: bitmaps may be inconsistent
    OTHER = "other"  # nothing to do


#: The details of a STOPPED event that make it a clean stop; "crashed" and
#: "failed" are QEMU dying; a save, a migration or a revert to a snapshot
#: is neither (the domain goes on elsewhere or later).
CLEAN_STOPS = frozenset({"shutdown", "destroyed"})
DIED = frozenset({"crashed", "failed"})
_BY_KIND = {
    EventKind.CONNECTED: Trigger.CONNECTED,
    EventKind.DISCONNECTED: Trigger.DISCONNECTED,
    EventKind.DEFINED: Trigger.DEFINED,
    EventKind.UNDEFINED: Trigger.UNDEFINED,
    EventKind.CRASHED: Trigger.CRASHED,
}


def trigger_of(kind: EventKind, detail: str) -> Trigger:
    """What an event (its kind and libvirt's detail) means to the daemon."""
    if kind is EventKind.STOPPED:
        if detail in CLEAN_STOPS:
            return Trigger.STOPPED
        return Trigger.CRASHED if detail in DIED else Trigger.OTHER
    return _BY_KIND.get(kind, Trigger.OTHER)


def merge(pending: Level | None, new: Level) -> Level:
    """One request per domain waits in the queue: a full asked at any
    point wins over an incremental (a full also serves the incremental's
    purpose; the reverse is not true)."""
    if pending is Level.FULL or new is Level.FULL:
        return Level.FULL
    return Level.INCREMENTAL


def event_request(trigger: Trigger, policy: Policy | None, has_backups: bool) -> Level | None:
    """The backup an event asks for, or None.

    - defined: ``events.on_define``, only for a domain with no backup yet
      (a redefinition of a known domain is an edit, not a new VM);
    - stopped cleanly: ``events.on_shutdown`` (taken offline, consistent).
    """
    if policy is None:
        return None
    if trigger is Trigger.DEFINED:
        action = policy.on_define if not has_backups else EventAction.NONE
    elif trigger is Trigger.STOPPED:
        action = policy.on_shutdown
    else:
        return None
    return None if action is EventAction.NONE else Level(action.value)


def schedules_of(policy: Policy) -> dict[str, str]:
    """The policy's backup schedules: level name -> cron expression."""
    out = {}
    if policy.full_schedule is not None:
        out[Level.FULL.value] = policy.full_schedule
    if policy.incremental_schedule is not None:
        out[Level.INCREMENTAL.value] = policy.incremental_schedule
    return out


def missed_request(
    schedules: Mapping[str, str],
    history: Sequence[BackupRecord],
    now: datetime,
    zone: tzinfo = UTC,
) -> Level | None:
    """At daemon start: the one backup to catch up, if a schedule fired
    while the daemon was down. A level's schedule counts as missed when it
    fired after the start of the domain's last complete backup that serves
    it (any backup serves an incremental schedule, only a full serves the
    full one). A domain never backed up is not caught up here: its
    schedule (or ``on_define``) takes the first backup. Several missed
    runs are caught up once. The cron expressions are read in `zone`."""
    complete = [b for b in history if b.status is BackupStatus.COMPLETE]
    if not complete:
        return None
    wanted: Level | None = None
    for level_name, expr in schedules.items():
        level = Level(level_name)
        serving = [b for b in complete if level is Level.INCREMENTAL or b.level is Level.FULL]
        last = max(b.started for b in serving) if serving else min(b.started for b in complete)
        if parse_cron(expr).fired_between(last.astimezone(zone), now.astimezone(zone)):
            wanted = level if wanted is None else merge(wanted, level)
    return wanted


def scheduled_request(
    fired: Level,
    minute: datetime,
    schedules: Mapping[str, str],
    already: tuple[datetime, Level] | None,
    zone: tzinfo = UTC,
) -> Level | None:
    """The backup a schedule firing for `minute` asks for, given what was
    already asked for this domain (`already`: the minute and level of the
    last scheduled request). When the full and the incremental schedule
    fire in the same minute (each with its own jitter), one full serves
    both: the incremental asks for the full, and whichever fires second
    asks for nothing. The cron expressions are read in `zone` (a full at
    02:30 moved to 03:00 by a spring-forward still meets an hourly
    incremental at 03:00)."""
    level = fired
    full = schedules.get(Level.FULL.value)
    if (
        level is Level.INCREMENTAL
        and full is not None
        and parse_cron(full).fires_at(minute.astimezone(zone))
    ):
        level = Level.FULL
    if already is not None and already[0] == minute and merge(already[1], level) is already[1]:
        return None
    return level


@dataclass(frozen=True)
class Outcome:
    """How one run of a request ended, for the log and `status`."""

    ok: bool
    retry: bool = False  # busy: the same request runs again later
    reason: str = ""


def outcome_of(error: BaseException | None) -> Outcome:
    """Classify how a backup attempt ended. Busy domains are retried;
    every other failure is final for this request (the schedule or the
    next event asks again) and is shown with its reason."""
    from virtbackupd.errors import BackupBusyError, DomainNotFoundError

    if error is None:
        return Outcome(ok=True)
    if isinstance(error, BackupBusyError):
        return Outcome(ok=False, retry=True, reason=str(error))
    if isinstance(error, DomainNotFoundError):
        return Outcome(ok=False, reason=f"the domain is gone: {error}")
    return Outcome(ok=False, reason=str(error) or type(error).__name__)
