"""A prune's journal: its plan, written before anything changes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from virtbackupd.core import extents
from virtbackupd.core.extents import Range
from virtbackupd.core.merge_plan import Consolidate, Op, Rebase, Remove
from virtbackupd.core.repository_format.codec import Fields, RepositoryFormatError
from virtbackupd.core.repository_format.names import is_plain_name
from virtbackupd.core.repository_format.versions import JOURNAL_FORMAT, RECORD_VERSION


@dataclass(frozen=True)
class PruneJournal:
    """A prune's plan, written before anything changes (engine.upkeep.prune)."""

    ops: tuple[Op, ...]
    checkpoints: Mapping[str, str | None] = field(default_factory=dict)  # removed id -> its cp

    @property
    def removing(self) -> frozenset[str]:
        return frozenset(op.id for op in self.ops if isinstance(op, Remove))

    def to_json(self) -> dict[str, object]:
        return {
            "format": JOURNAL_FORMAT,
            "format_version": RECORD_VERSION,
            "ops": [_op_json(op) for op in self.ops],
            "checkpoints": dict(self.checkpoints),
        }

    @classmethod
    def from_json(cls, data: object, path: Path) -> PruneJournal:
        f = Fields(data, path)
        version = f.integer("format_version", default=1)
        if version > RECORD_VERSION:
            raise RepositoryFormatError(
                path,
                f"prune journal format {version} is newer than this virtbackupd reads "
                f"({RECORD_VERSION})",
            )
        cps = f.sub("checkpoints", default={})
        return cls(
            tuple(_op(o) for o in f.items("ops")),
            {k: cps.opt_text(k) for k in cps.names()},
        )


def _ranges_by_disk(ranges: Mapping[str, Sequence[Range]]) -> dict[str, object]:
    return {disk: extents.ranges_to_json(r) for disk, r in ranges.items()}


def _op_json(op: Op) -> dict[str, object]:
    if isinstance(op, Rebase):
        return {
            "op": "rebase",
            "child": op.child,
            "parent": op.parent,
            "absorbed": op.absorbed,
            "ranges": _ranges_by_disk(op.ranges),
        }
    if isinstance(op, Consolidate):
        return {
            "op": "consolidate",
            "heir": op.heir,
            "into": op.into,
            "ranges": _ranges_by_disk(op.ranges),
        }
    return {"op": "remove", "id": op.id}


def _op(f: Fields) -> Op:
    # Every id names a folder the journal's replay renames, rewrites or
    # deletes, as root: backup ids only, never a path.
    kind = f.text("op")
    if kind == "remove":
        return Remove(f.backup_id("id"))
    by_disk = f.sub("ranges")
    ranges = {disk: by_disk.ranges(disk) for disk in by_disk.names()}
    for disk in ranges:
        if not is_plain_name(disk):
            raise f.error("ranges", f"{disk[:40]!r} is not a disk name")
    if kind == "rebase":
        return Rebase(f.backup_id("child"), f.backup_id("parent"), f.backup_id("absorbed"), ranges)
    if kind == "consolidate":
        return Consolidate(f.backup_id("heir"), f.backup_id("into"), ranges)
    raise f.error("op", f"unknown operation {kind!r}")
