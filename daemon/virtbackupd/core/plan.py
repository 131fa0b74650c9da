"""Planning one backup: full or incremental from which checkpoint, which
disks, and why. Pure: everything it needs is passed in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from virtbackupd.core.backup_documents import (
    BackupRequest,
    DiskChoice,
    choose_disks,
    is_own_checkpoint,
)
from virtbackupd.core.domain_xml import DomainDisk
from virtbackupd.core.policy import Level, Policy
from virtbackupd.core.records import BackupRecord, BackupStatus, CheckpointRecord, LeftOutDisk
from virtbackupd.errors import PlanError


@dataclass(frozen=True)
class CheckpointView:
    """What libvirt (and the images) say about the domain's checkpoints."""

    known: frozenset[str]  # checkpoint names libvirt has metadata for
    broken: frozenset[str] = frozenset()  # bitmaps missing or inconsistent
    # removed because `restore --in-place` wrote over the disks they described
    overwritten: frozenset[str] = frozenset()
    bitmaps: Mapping[str, frozenset[str]] = field(default_factory=dict)  # disk -> bitmap names


@dataclass(frozen=True)
class Plan:
    level: Level
    reason: str
    checkpoint: str  # the new checkpoint
    parent_backup: str | None  # backup id the incremental builds on
    parent_checkpoint: str | None
    choices: tuple[DiskChoice, ...]
    delete_checkpoints: tuple[str, ...] = ()  # broken ones of ours, to remove first
    redefine: tuple[CheckpointRecord, ...] = ()  # stored ones libvirt lost, oldest first

    @property
    def disks(self) -> tuple[str, ...]:
        return tuple(c.target for c in self.choices if c.included)

    @property
    def left_out(self) -> tuple[LeftOutDisk, ...]:
        return tuple(
            LeftOutDisk(c.target, c.reason)
            for c in self.choices
            if not c.included and not c.removable
        )


# PLR0913: all keyword-only: the facts a plan is decided from, each from another source
def plan_backup(  # noqa: PLR0913 (see above)
    *,
    checkpoint: str,
    disks: Sequence[DomainDisk],
    policy: Policy,
    history: Sequence[BackupRecord],
    stored_checkpoints: Sequence[CheckpointRecord],
    view: CheckpointView,
    want: Level | None = None,
    sizes: Mapping[str, int] | None = None,
    repository: str | None = None,
    last_unrestorable: str | None = None,
) -> Plan:
    """Decide the backup. `history` is this domain's backups, oldest first;
    `sizes` the virtual size of each disk now; `repository` the folder the
    policy's backups go to (a parent elsewhere cannot be a backing file);
    `last_unrestorable` why the last complete backup's folders cannot be
    restored (its manifest, or one below it, unreadable): an incremental
    on it could not be restored either."""
    broken_own = tuple(sorted(n for n in view.broken if is_own_checkpoint(n)))
    complete = [b for b in history if b.status is BackupStatus.COMPLETE]
    last = complete[-1] if complete else None

    def full(reason: str) -> Plan:
        return _with_disks(
            Plan(Level.FULL, reason, checkpoint, None, None, (), broken_own), disks, policy
        )

    if want is Level.FULL:
        return full("full backup requested")
    why = _why_not_on_last(last, view, policy, repository, last_unrestorable)
    if why is not None:
        return full(why)
    # _why_not_on_last said why had there been no last backup or checkpoint.
    assert last is not None
    assert last.checkpoint is not None
    parent = last.checkpoint
    # A chain longer than max_incrementals is not a reason for a full read
    # of the domain: pruning merges it shorter (core.merge_plan).
    incremental = _with_disks(
        Plan(
            Level.INCREMENTAL,
            f"changes since {parent} (backup {last.id})",
            checkpoint,
            last.id,
            parent,
            (),
            broken_own,
        ),
        disks,
        policy,
    )
    why, grown = _size_changes(incremental, last, sizes or {})
    if why is not None:
        return full(why)
    if grown:
        # Sound: QEMU grew the checkpoint's bitmap with the disk, and the new
        # area reads as zeroes through an overlay larger than its backing file.
        incremental = _replace(
            incremental, reason=f"{incremental.reason}; {', '.join(grown)}: overlay of the new size"
        )
    why = _missing_bitmap(incremental, view)
    if why is not None:
        return full(why)
    if parent not in view.known:
        stored = {cp.name: cp for cp in stored_checkpoints}
        chain = _lineage(parent, stored)
        if chain is None:
            return full(f"checkpoint {parent} is unknown to libvirt and not in the store")
        missing = tuple(cp for cp in chain if cp.name not in view.known)
        return _replace(
            incremental,
            reason=f"{incremental.reason}; redefining {len(missing)} checkpoint(s) libvirt lost",
            redefine=missing,
        )
    return incremental


def _why_not_on_last(
    last: BackupRecord | None,
    view: CheckpointView,
    policy: Policy,
    repository: str | None,
    last_unrestorable: str | None,
) -> str | None:
    """Why no incremental can build on the last complete backup (the
    reason of the full backup instead), None if one may."""
    if last is None:
        return "no earlier complete backup"
    if last.checkpoint is None:
        return f"backup {last.id} left no checkpoint"
    if last_unrestorable is not None:
        return f"the last backup {last.id} cannot be restored ({last_unrestorable})"
    parent = last.checkpoint
    if repository is not None and last.path and not _inside(last.path, repository):
        return (
            f"the last backup {last.id} is in another repository ({last.path}): "
            f"the target is now {repository}"
        )
    if parent in view.overwritten:
        return (
            f"the disks were restored in place after checkpoint {parent} (backup {last.id}): "
            "no bitmap describes them now"
        )
    if parent in view.broken:
        return f"checkpoint {parent} has inconsistent or missing bitmaps (crash?)"
    if policy.max_incrementals == 0:
        return "chain.max_incrementals is 0: every backup is full"
    return None


def _missing_bitmap(incremental: Plan, view: CheckpointView) -> str | None:
    """A disk to back up whose image lacks the parent checkpoint's bitmap."""
    parent = incremental.parent_checkpoint
    for c in incremental.choices:
        if c.included and c.checkpoint:
            bitmaps = view.bitmaps.get(c.target)
            if bitmaps is not None and parent not in bitmaps:
                return f"disk {c.target} has no bitmap {parent}"
    return None


def _size_changes(
    incremental: Plan, last: BackupRecord, sizes: Mapping[str, int]
) -> tuple[str | None, list[str]]:
    """Why the incremental's disks cannot build on `last` (a disk new
    since, or shrunk: the reason of a full backup instead), and the disks
    that grew (an incremental follows them)."""
    previous = {d.disk: d for d in last.disks}
    grown: list[str] = []
    for c in incremental.choices:
        if c.included and c.target not in previous:
            return f"disk {c.target} is not in backup {last.id}", grown
        now = sizes.get(c.target)
        if c.included and c.checkpoint and now is not None:
            was = previous[c.target].virtual_size
            if now < was:
                # QEMU's bitmaps follow a grown disk, but nothing we can trust
                # says what a shrink kept: read the disk whole.
                return (
                    f"disk {c.target} shrank from {was} to {now} bytes since backup {last.id}",
                    grown,
                )
            if now > was:
                grown.append(f"disk {c.target} grew from {was} to {now} bytes")
    return None, grown


def nothing_to_back_up(disks: Sequence[DomainDisk], policy: Policy) -> str | None:
    """Why every backup of a domain with `disks` under `policy` would fail
    for want of a disk to back up (every disk skipped: raw under `raw:
    skip`, excluded, read-only, ...), or None when some disk would be
    backed up. What `policy check` asks before the schedule finds out."""
    try:
        _with_disks(Plan(Level.FULL, "", "check", None, None, ()), disks, policy)
    except PlanError as exc:
        return str(exc)
    return None


def _inside(path: str, folder: str) -> bool:
    p, f = path.rstrip("/"), folder.rstrip("/")
    return p.startswith(f + "/")


def _lineage(name: str, stored: Mapping[str, CheckpointRecord]) -> list[CheckpointRecord] | None:
    chain: list[CheckpointRecord] = []
    cur: str | None = name
    while cur is not None:
        cp = stored.get(cur)
        if cp is None:
            return None if not chain else chain[::-1]
        chain.append(cp)
        cur = cp.parent
        if len(chain) > 10000:
            raise PlanError(f"checkpoint lineage of {name} loops")
    return chain[::-1]


def _replace(plan: Plan, **changes: object) -> Plan:
    return replace(plan, **changes)  # type: ignore[arg-type]


def _with_disks(plan: Plan, disks: Sequence[DomainDisk], policy: Policy) -> Plan:
    request = BackupRequest(
        checkpoint=plan.checkpoint,
        incremental_from=plan.parent_checkpoint,
        socket_path="/",
        scratch_dir="/",
        include=policy.include_disks,
        exclude=policy.exclude_disks,
        raw=policy.raw,
    )
    choices = choose_disks(disks, request)
    if not any(c.included for c in choices):
        reasons = "; ".join(f"{c.target}: {c.reason}" for c in choices) or "no disks"
        raise PlanError(f"no disk can be backed up ({reasons})")
    return _replace(plan, choices=choices)
