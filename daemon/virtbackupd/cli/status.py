"""`virtbackup status`: the daemon, every governed domain (backed up or
not yet), unmanaged domains, and every running job with its progress
(daemon and CLI jobs alike: both publish into the state store)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from virtbackupd.cli.progress import duration, progress_text
from virtbackupd.config.daemon import parse_zone
from virtbackupd.core.policy import Policy, policy_for
from virtbackupd.core.records import BackupRecord, BackupStatus, RunningJob
from virtbackupd.daemon.status_file import DaemonStatus
from virtbackupd.errors import ConfigError


@dataclass
class DomainRow:
    domain: str
    uuid: str
    policy: str | None
    defined: bool  # libvirt (or the daemon) knows the domain now
    last_good: str | None = None
    last_good_age_s: int | None = None
    chain_length: int = 0
    last_failure: dict[str, str] | None = None  # {"at", "reason", "backup_id"?}
    # The newest complete backup, when its folders cannot be restored: "ID: why".
    newest_unrestorable: str | None = None
    next_runs: dict[str, str] = field(default_factory=dict)
    queued: str | None = None
    retrying: str | None = None

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _chain_length(last: BackupRecord, by_id: dict[str, BackupRecord]) -> int:
    n, cur = 0, last
    while cur.parent is not None and cur.parent in by_id and n < 10_000:
        n, cur = n + 1, by_id[cur.parent]
    return n


def build_rows(
    now: datetime,
    backups: Sequence[BackupRecord],
    policies: Sequence[Policy],
    libvirt_domains: Sequence[tuple[str, str]] | None,
    daemon: DaemonStatus | None,
    unrestorable: Callable[[BackupRecord], str | None] = lambda _: None,
) -> tuple[list[DomainRow], list[str]]:
    """Rows for governed domains and domains with backups; and the names
    of unmanaged domains. Pure: every input is passed in (`unrestorable`:
    why a complete backup's folders cannot be restored, or None; asked of
    the newest backups only, until one can). The last good backup is the
    newest that can be restored."""
    known: dict[str, str] = {}  # uuid -> name, defined now
    if daemon is not None:
        known.update({u: d.name for u, d in daemon.domains.items()})
    if libvirt_domains is not None:
        known.update({u: n for n, u in libvirt_domains})
    by_domain: dict[str, list[BackupRecord]] = {}
    for b in backups:
        by_domain.setdefault(b.domain_uuid, []).append(b)
    rows: dict[str, DomainRow] = {}
    unmanaged = []
    for uuid in sorted(set(known) | set(by_domain)):
        history = by_domain.get(uuid, [])
        name = known.get(uuid) or history[-1].domain_name
        try:
            policy = policy_for(name, uuid, policies)
        except ConfigError:
            policy = None  # overlapping policies: `policy check` names them
        if policy is None and not history:
            unmanaged.append(name)
            continue
        row = DomainRow(name, uuid, str(policy.source) if policy else None, uuid in known)
        good = [b for b in history if b.status is BackupStatus.COMPLETE]
        if good and (why := unrestorable(good[-1])) is not None:
            row.newest_unrestorable = f"{good[-1].id}: {why}"
        while good and unrestorable(good[-1]) is not None:
            good.pop()
        if good:
            last = good[-1]
            row.last_good = last.id
            row.last_good_age_s = int((now - (last.finished or last.started)).total_seconds())
            row.chain_length = _chain_length(last, {b.id: b for b in good})
        failed = [b for b in history if b.status is BackupStatus.FAILED]
        if failed:
            f = failed[-1]
            at = (f.finished or f.started).isoformat()
            row.last_failure = {"at": at, "reason": f.error or "", "backup_id": f.id}
        state = daemon.domains.get(uuid) if daemon is not None else None
        if state is not None:
            row.next_runs = dict(state.next_runs)
            row.queued = state.queued
            row.retrying = state.retrying
            if state.last_failure is not None:
                at, reason = state.last_failure
                if row.last_failure is None or at > row.last_failure["at"]:
                    row.last_failure = {"at": at, "reason": reason}
        rows[uuid] = row
    return list(rows.values()), sorted(unmanaged)


def render(
    daemon: DaemonStatus | None,
    rows: Sequence[DomainRow],
    unmanaged: Sequence[str],
    running: Sequence[RunningJob],
    as_json: bool,
) -> str:
    if as_json:
        return json.dumps(
            {
                "daemon": None
                if daemon is None
                else {
                    "pid": daemon.pid,
                    "up_since": daemon.started,
                    "libvirt_uri": daemon.libvirt_uri,
                    "libvirt_connected": daemon.libvirt_connected,
                    "schedule_timezone": daemon.schedule_timezone,
                    "queued": sorted(u for u, d in daemon.domains.items() if d.queued),
                },
                "domains": [r.as_json() for r in rows],
                "unmanaged": list(unmanaged),
                "running": [j.as_json() for j in running],
            },
            indent=2,
        )
    lines = []
    if daemon is None:
        lines.append("daemon: not running")
    else:
        reach = "reachable" if daemon.libvirt_connected else "NOT reachable"
        queued = sum(1 for d in daemon.domains.values() if d.queued)
        lines.append(
            f"daemon: pid {daemon.pid}, up since {daemon.started}, libvirt "
            f"{daemon.libvirt_uri} {reach}, {len(daemon.running)} running, {queued} queued, "
            f"schedules in {daemon.schedule_timezone}"
        )
    for r in rows:
        head = r.domain + ("" if r.defined else " (no longer defined)")
        lines.append(f"{head}: policy {r.policy or '- (none governs it now)'}")
        if r.last_good is not None and r.last_good_age_s is not None:
            lines.append(
                f"  last good: {r.last_good}, {duration(r.last_good_age_s)} ago, "
                f"chain {r.chain_length}"
            )
        else:
            lines.append("  last good: never backed up")
        if r.newest_unrestorable is not None:
            lines.append(f"  newest backup not restorable: {r.newest_unrestorable}")
        if r.last_failure is not None:
            lines.append(f"  last failure: {r.last_failure['at']}: {r.last_failure['reason']}")
        if r.next_runs:
            zone = daemon.schedule_timezone if daemon is not None else "UTC"
            nxt = ", ".join(f"{k} {_at(v, zone)}" for k, v in sorted(r.next_runs.items()))
            lines.append(f"  next: {nxt}")
        if r.queued:
            lines.append(f"  queued: {r.queued}")
        if r.retrying:
            lines.append(f"  waiting (busy, retried): {r.retrying}")
    for j in running:
        if j.interrupted:
            lines.append(
                f"interrupted: {j.domain} {j.backup_id} ({j.level.value}): its process died; "
                f"`virtbackup cancel {j.domain}` cleans it up (so does its next backup)"
            )
            continue
        text = progress_text(
            f"running: {j.domain} {j.backup_id} ({j.level.value})",
            j.done,
            j.total,
            j.rate,
            j.eta_s,
        )
        lines.append(text)
    if unmanaged:
        lines.append(f"unmanaged (no policy): {', '.join(unmanaged)}")
    return "\n".join(lines)


def _at(iso: str, zone: str) -> str:
    """A next run as the schedule's zone reads it: `2026-03-29 03:00 CEST`
    (the abbreviation says which side of a daylight-saving change)."""
    try:
        when = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    try:
        return when.astimezone(parse_zone(zone)).strftime("%Y-%m-%d %H:%M %Z")
    except ValueError:  # a zone without a name (/etc/localtime not a link)
        return when.strftime("%Y-%m-%d %H:%M UTC%z")
