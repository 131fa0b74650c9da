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
from virtbackupd.config.policy import LoadedPolicies
from virtbackupd.core.policy import policy_for
from virtbackupd.core.records import BackupRecord, BackupStatus, RunningJob
from virtbackupd.daemon.status_file import DaemonStatus, EnforcedFile
from virtbackupd.errors import ConfigError


@dataclass
class DomainRow:
    domain: str
    uuid: str
    policy: str | None  # the daemon's (what it enforces) when it runs, else the files'
    defined: bool | None  # libvirt (or the daemon) knows the domain now; None: not known
    last_good: str | None = None
    last_good_age_s: int | None = None
    chain_length: int = 0
    last_failure: dict[str, str] | None = None  # {"at", "reason", "backup_id"?}
    # The newest complete backup, when its folders cannot be restored: "ID: why".
    newest_unrestorable: str | None = None
    next_runs: dict[str, str] = field(default_factory=dict)
    queued: str | None = None
    retrying: str | None = None
    # Its policy file as it is on disk now, when that is not what governs
    # it: changed since the daemon loaded it, or rejected (file:line: why).
    policy_on_disk: str | None = None

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _chain_length(last: BackupRecord, by_id: dict[str, BackupRecord]) -> int:
    n, cur = 0, last
    while cur.parent is not None and cur.parent in by_id and n < 10_000:
        n, cur = n + 1, by_id[cur.parent]
    return n


def policy_file_notes(
    enforced: dict[str, EnforcedFile] | None,
    on_disk: dict[str, str],
    rejected: dict[str, str],
) -> dict[str, str]:
    """What each policy file on disk says against what governs: file ->
    note, for files that need one. `enforced`: what the running daemon
    read (None: no daemon, the files on disk are all there is);
    `on_disk`: file -> SHA-256 now; `rejected`: file -> why it does not
    load now (file:line: what is wrong)."""
    notes: dict[str, str] = {}
    if enforced is None:
        for f, why in rejected.items():
            notes[f] = f"rejected: {why}"
        return notes
    for f in sorted(set(enforced) | set(on_disk)):
        then, now = enforced.get(f), on_disk.get(f)
        if then is not None and now is None:
            notes[f] = "removed from disk; the daemon enforces it until it is reloaded"
        elif then is None:
            notes[f] = (
                f"rejected on disk ({rejected[f]}); new since the daemon loaded its policies"
                if f in rejected
                else "new on disk; not enforced until the daemon is reloaded (SIGHUP)"
            )
        elif f in rejected:
            kept = (
                "the daemon enforces the version it loaded"
                if then.loaded
                else ("the daemon skips the domains it names")
            )
            notes[f] = f"rejected on disk: {rejected[f]}; {kept}"
        elif then.sha256 != now:
            notes[f] = (
                "changed on disk since the daemon loaded it; not enforced until the daemon "
                "is reloaded (SIGHUP)"
            )
    return notes


# C901: one row per domain from five sources; each branch is a documented column rule
# PLR0913: the table's inputs, each read by another adapter; a pure function of them
def build_rows(  # noqa: C901,PLR0913 (see above)
    now: datetime,
    backups: Sequence[BackupRecord],
    on_disk: LoadedPolicies,
    libvirt_domains: Sequence[tuple[str, str]] | None,
    daemon: DaemonStatus | None,
    unrestorable: Callable[[BackupRecord], str | None] = lambda _: None,
    file_notes: dict[str, str] | None = None,
) -> tuple[list[DomainRow], list[str]]:
    """Rows for governed domains and domains with backups; and the names
    of unmanaged domains. Pure: every input is passed in (`unrestorable`:
    why a complete backup's folders cannot be restored, or None; asked of
    the newest backups only, until one can). The last good backup is the
    newest that can be restored. A domain the running daemon knows shows
    the policy the daemon enforces; others the policy the files on disk
    give (a file that does not load and may govern it is named). With
    neither the daemon nor libvirt there, whether a domain is defined is
    not known (None), never "no longer defined"."""
    notes = file_notes or {}
    known: dict[str, str] = {}  # uuid -> name, defined now
    if daemon is not None:
        known.update({u: d.name for u, d in daemon.domains.items()})
    if libvirt_domains is not None:
        known.update({u: n for n, u in libvirt_domains})
    sure = daemon is not None or libvirt_domains is not None
    by_domain: dict[str, list[BackupRecord]] = {}
    for b in backups:
        by_domain.setdefault(b.domain_uuid, []).append(b)
    rows: dict[str, DomainRow] = {}
    unmanaged = []
    for uuid in sorted(set(known) | set(by_domain)):
        history = by_domain.get(uuid, [])
        name = known.get(uuid) or history[-1].domain_name
        state = daemon.domains.get(uuid) if daemon is not None else None
        refusal: str | None = None
        if state is not None:
            source = state.policy
        else:
            try:
                found = policy_for(name, uuid, on_disk.policies)
            except ConfigError:
                found = None  # overlapping policies: `policy check` names them
            source = str(found.source) if found else None
            refusal = on_disk.refusal(name, uuid)
        if source is None and refusal is None and not history:
            unmanaged.append(name)
            continue
        row = DomainRow(name, uuid, source, (uuid in known) if sure else None)
        if source is not None and source in notes:
            row.policy_on_disk = notes[source]
        elif refusal is not None:
            row.policy_on_disk = refusal
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


@dataclass(frozen=True)
class Reach:
    """What `status` could not reach, and so does not know."""

    libvirt_uri: str
    libvirt_error: str | None = None  # asked libvirt itself (no daemon) and it failed
    daemon_unknown: str | None = None  # a status file that cannot be read: why
    policy_notes: dict[str, str] = field(default_factory=dict)


def render(
    daemon: DaemonStatus | None,
    rows: Sequence[DomainRow],
    unmanaged: Sequence[str],
    running: Sequence[RunningJob],
    as_json: bool,
    reach: Reach | None = None,
) -> str:
    reach = reach or Reach(daemon.libvirt_uri if daemon else "")
    if as_json:
        return _as_json(daemon, rows, unmanaged, running, reach)
    lines = _reach_lines(daemon, reach)
    for f, note in sorted(reach.policy_notes.items()):
        lines.append(f"policy file {f}: {note}")
    zone = daemon.schedule_timezone if daemon is not None else "UTC"
    for r in rows:
        lines += _domain_lines(r, zone)
    lines += [_running_line(j) for j in running]
    if unmanaged:
        lines.append(f"unmanaged (no policy): {', '.join(unmanaged)}")
    return "\n".join(lines)


def _as_json(
    daemon: DaemonStatus | None,
    rows: Sequence[DomainRow],
    unmanaged: Sequence[str],
    running: Sequence[RunningJob],
    reach: Reach,
) -> str:
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
            "daemon_unknown": reach.daemon_unknown,
            "libvirt": {
                "uri": reach.libvirt_uri,
                "reachable": daemon.libvirt_connected
                if daemon is not None
                else reach.libvirt_error is None,
                "error": reach.libvirt_error,
            },
            "policy_files": dict(reach.policy_notes),
            "domains": [r.as_json() for r in rows],
            "unmanaged": list(unmanaged),
            "running": [j.as_json() for j in running],
        },
        indent=2,
    )


def _reach_lines(daemon: DaemonStatus | None, reach: Reach) -> list[str]:
    """The daemon (or why it is not known), and libvirt when it was asked
    directly and did not answer."""
    lines = []
    if daemon is None and reach.daemon_unknown is not None:
        lines.append(
            f"daemon: NOT known: {reach.daemon_unknown}; whether a daemon runs, and what it "
            "schedules, is not known"
        )
    elif daemon is None:
        lines.append("daemon: not running; nothing is scheduled")
    else:
        reach_text = (
            "reachable"
            if daemon.libvirt_connected
            else "NOT reachable (domains as the daemon last saw them)"
        )
        queued = sum(1 for d in daemon.domains.values() if d.queued)
        lines.append(
            f"daemon: pid {daemon.pid}, up since {daemon.started}, libvirt "
            f"{daemon.libvirt_uri} {reach_text}, {len(daemon.running)} of its own running, "
            f"{queued} queued, "
            f"schedules in {daemon.schedule_timezone}"
        )
    if daemon is None and reach.libvirt_error is not None:
        lines.append(
            f"libvirt: {reach.libvirt_uri} NOT reachable ({reach.libvirt_error}); which "
            "domains are defined, and which are unmanaged, is not known: the domains below "
            "are those the catalogue has backups of"
        )
    return lines


def _domain_lines(r: DomainRow, zone: str) -> list[str]:
    """One domain's lines; `zone`: the one its next runs are told in."""
    lines = []
    head = r.domain + (" (no longer defined)" if r.defined is False else "")
    if r.policy is None and r.policy_on_disk is not None:
        # The file and line are on the "policy file" line above.
        lines.append(
            f"{head}: policy - (a policy file that may govern it does not load; "
            "nothing runs for it until that file is fixed)"
        )
    else:
        lines.append(f"{head}: policy {r.policy or '- (none governs it now)'}")
    if r.policy is not None and r.policy_on_disk is not None:
        lines.append(f"  policy file on disk: {r.policy_on_disk}")
    if r.last_good is not None and r.last_good_age_s is not None:
        lines.append(
            f"  last good: {r.last_good}, {duration(r.last_good_age_s)} ago, chain {r.chain_length}"
        )
    else:
        lines.append("  last good: never backed up")
    if r.newest_unrestorable is not None:
        lines.append(f"  newest backup not restorable: {r.newest_unrestorable}")
    if r.last_failure is not None:
        lines.append(f"  last failure: {r.last_failure['at']}: {r.last_failure['reason']}")
    if r.next_runs:
        nxt = ", ".join(f"{k} {_at(v, zone)}" for k, v in sorted(r.next_runs.items()))
        lines.append(f"  next: {nxt}")
    if r.queued:
        lines.append(f"  queued: {r.queued}")
    if r.retrying:
        lines.append(f"  waiting (busy, retried): {r.retrying}")
    return lines


def _running_line(j: RunningJob) -> str:
    if j.interrupted:
        return (
            f"interrupted: {j.domain} {j.backup_id} ({j.level.value}): its process died; "
            f"`virtbackup cancel {j.domain}` cleans it up (so does its next backup)"
        )
    return progress_text(
        f"running: {j.domain} {j.backup_id} ({j.level.value})",
        j.done,
        j.total,
        j.rate,
        j.eta_s,
    )


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
