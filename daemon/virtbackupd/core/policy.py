"""Backup policies as typed values, and which policy governs a domain."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from virtbackupd.core.backup_documents import RawDisks
from virtbackupd.errors import ConfigError


class Level(StrEnum):
    FULL = "full"
    INCREMENTAL = "incremental"


class EventAction(StrEnum):
    NONE = "none"
    INCREMENTAL = "incremental"
    FULL = "full"


class Quiesce(StrEnum):
    AUTO = "auto"  # freeze through the guest agent when it answers; warn otherwise
    ALWAYS = "always"  # fail when the guest agent cannot freeze
    NEVER = "never"


@dataclass(frozen=True)
class Retention:
    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0

    @property
    def keeps_everything(self) -> bool:
        return not any(
            (
                self.keep_last,
                self.keep_hourly,
                self.keep_daily,
                self.keep_weekly,
                self.keep_monthly,
                self.keep_yearly,
            )
        )


@dataclass(frozen=True)
class Policy:
    """One policy file."""

    source: Path
    domains: tuple[str, ...] = ()  # names or fnmatch globs
    uuids: tuple[str, ...] = ()
    exclude_domains: tuple[str, ...] = ()
    include_disks: frozenset[str] = frozenset()
    exclude_disks: frozenset[str] = frozenset()
    raw: RawDisks = RawDisks.FULL  # a disk silently left out is found at restore time
    full_schedule: str | None = None  # cron
    incremental_schedule: str | None = None  # cron
    verify_schedule: str | None = None  # cron: `virtbackup verify` of the domain's backups
    # cron: `verify --filesystems` of the domain's newest backup
    verify_filesystems_schedule: str | None = None
    max_incrementals: int = 30
    retention: Retention = field(default_factory=Retention)
    on_shutdown: EventAction = EventAction.NONE
    on_define: EventAction = EventAction.NONE
    quiesce: Quiesce = Quiesce.AUTO
    bandwidth: int | None = None  # bytes per second
    target: Path | None = None  # overrides the daemon's backup_root

    def matches(self, name: str, uuid: str) -> bool:
        if any(fnmatch.fnmatchcase(name, pat) for pat in self.exclude_domains):
            return False
        return uuid.lower() in self.uuids or any(
            fnmatch.fnmatchcase(name, pat) for pat in self.domains
        )


@dataclass(frozen=True)
class Rejected:
    """A policy file that does not load, with what of it could still be
    read: the domain patterns and UUIDs it names, or None when even those
    cannot be read (then it may govern any domain)."""

    source: Path
    problem: str  # its first error, as the operator sees it (file:line: ...)
    domains: tuple[str, ...] | None
    uuids: tuple[str, ...] | None

    def may_govern(self, name: str, uuid: str, governed: bool) -> bool:
        """Whether this file may be the one meant for the domain. When its
        names cannot be read, it may be meant for any domain that no
        loaded policy governs; a domain a loaded policy governs keeps it
        (were the file fixed, it would either leave the domain to that
        policy or clash with it, never govern it alone).
        exclude_domains is not trusted from a broken file: it could be
        the broken part, and wrongly excluding is the silent failure."""
        if self.domains is None or self.uuids is None:
            return not governed
        return uuid.lower() in self.uuids or any(
            fnmatch.fnmatchcase(name, pat) for pat in self.domains
        )

    def refusal(self, name: str) -> str:
        return (
            f"{self.problem} -- this policy file may govern domain '{name}' and does not load; "
            "fix it (virtbackup policy check) or move it out of the policy folder: "
            "nothing runs under a policy that may not be the one meant"
        )


def policy_for(name: str, uuid: str, policies: Sequence[Policy]) -> Policy | None:
    """The one policy governing a domain, None if none does; two is an error
    (the operator must say which one wins)."""
    found = [p for p in policies if p.matches(name, uuid)]
    if len(found) > 1:
        files = ", ".join(str(p.source) for p in found)
        raise ConfigError(f"domain '{name}' ({uuid}) is matched by more than one policy: {files}")
    return found[0] if found else None


@dataclass(frozen=True)
class Coverage:
    """How a set of policies meets the domains libvirt has."""

    errors: tuple[str, ...]  # a domain governed by more than one policy
    warnings: tuple[str, ...]  # a pattern or UUID that matches no domain
    governed: dict[str, Policy]  # domain uuid -> its policy
    unmanaged: tuple[str, ...]  # names of domains no policy governs


def coverage(policies: Sequence[Policy], domains: Sequence[tuple[str, str]]) -> Coverage:
    """`domains`: (name, uuid) of every domain libvirt has. Overlaps are
    errors (the daemon skips such a domain); patterns matching nothing
    are warnings (a typo, or a VM not defined yet)."""
    errors, warnings, unmanaged = [], [], []
    governed: dict[str, Policy] = {}
    for name, uuid in domains:
        found = [p for p in policies if p.matches(name, uuid)]
        if len(found) > 1:
            files = " and ".join(str(p.source) for p in found)
            errors.append(
                f"domain '{name}' is matched by {files}; one domain must be governed by one "
                "policy (narrow a pattern, or use exclude_domains)"
            )
        elif found:
            governed[uuid] = found[0]
        else:
            unmanaged.append(name)
    for p in policies:
        for pattern in p.domains:
            if not any(fnmatch.fnmatchcase(name, pattern) for name, _ in domains):
                warnings.append(f"{p.source}: domains: '{pattern}' matches no domain libvirt has")
        for u in p.uuids:
            if not any(uuid.lower() == u for _, uuid in domains):
                warnings.append(f"{p.source}: uuids: {u} is no domain libvirt has")
    return Coverage(tuple(errors), tuple(warnings), governed, tuple(sorted(unmanaged)))
