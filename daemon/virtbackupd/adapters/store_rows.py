"""How the state database's rows say what the core's records say: the
statements that write a backup record, and the records read back from
rows. Used by store.py alone (which runs them, on its one connection).
Timestamps are ISO 8601 UTC text; a disk's ranges are JSON, parsed only
when first read."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from sqlite3 import Row

from virtbackupd.core import extents
from virtbackupd.core.extents import LazyRanges, Range
from virtbackupd.core.policy import Level
from virtbackupd.core.records import (
    BackupRecord,
    BackupStatus,
    CheckpointRecord,
    DiskRecord,
    LeftOutDisk,
)

# One SQL statement and its arguments; a transaction runs a list of them.
Statement = tuple[str, Sequence[object]]


def ts(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value else None


def dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def req(value: str) -> datetime:
    return datetime.fromisoformat(value)


def ranges_json(ranges: Sequence[Range]) -> str:
    return json.dumps(extents.ranges_to_json(ranges))


def lazy_ranges(text: str) -> LazyRanges:
    """Listings read every backup's rows and need none of its ranges."""
    return LazyRanges(lambda: ranges_from_json_text(text))


def ranges_from_json_text(text: str) -> tuple[Range, ...]:
    return tuple(extents.ranges_from_json(json.loads(text)))


def left_out_rows(b: BackupRecord) -> list[Statement]:
    return [
        (
            "INSERT INTO left_out_disks(backup_id, disk, reason) VALUES (?, ?, ?)",
            (b.id, d.disk, d.reason),
        )
        for d in b.left_out
    ]


def domain_seen(b: BackupRecord) -> Statement:
    """The backup's domain, if the catalogue does not know it yet."""
    return (
        """INSERT INTO domains(uuid, name, first_seen, last_seen) VALUES (?, ?, ?, ?)
           ON CONFLICT(uuid) DO NOTHING""",
        (b.domain_uuid, b.domain_name, ts(b.started), ts(b.started)),
    )


def checkpoint_row(cp: CheckpointRecord) -> Statement:
    return (
        """INSERT OR REPLACE INTO checkpoints(domain_uuid, name, parent, created,
               status, xml) VALUES (?, ?, ?, ?, ?, ?)""",
        (cp.domain_uuid, cp.name, cp.parent, ts(cp.created), cp.status.value, cp.xml),
    )


def backup_row(b: BackupRecord) -> Statement:
    """The backup's row as the record says, whatever it said before."""
    return (
        # A parent the catalogue lacks is recorded as none: a failed
        # attempt's planned parent may have been pruned since, and a
        # rebuilt catalogue must take every folder the repository
        # holds (whose manifest still names its parent) rather than
        # refuse with "FOREIGN KEY constraint failed".
        """INSERT INTO backups(id, domain_uuid, domain_name, level, status, checkpoint,
               parent_id, started, finished, error, bytes_read, bytes_written, path,
               unreadable)
           VALUES (?, ?, ?, ?, ?, ?, (SELECT id FROM backups WHERE id = ?),
               ?, ?, ?, ?, ?, ?, ?)
           ON CONFLICT(id) DO UPDATE SET level = excluded.level,
               status = excluded.status, checkpoint = excluded.checkpoint,
               parent_id = excluded.parent_id, finished = excluded.finished,
               error = excluded.error, bytes_read = excluded.bytes_read,
               bytes_written = excluded.bytes_written, path = excluded.path,
               unreadable = excluded.unreadable""",
        (
            b.id,
            b.domain_uuid,
            b.domain_name,
            b.level.value,
            b.status.value,
            b.checkpoint,
            b.parent,
            ts(b.started),
            ts(b.finished),
            b.error,
            b.bytes_read,
            b.bytes_written,
            b.path,
            b.unreadable,
        ),
    )


def disk_rows(b: BackupRecord) -> list[Statement]:
    return [
        (
            """INSERT INTO backup_disks(backup_id, disk, path, virtual_size, bytes_read,
                   bytes_written, bytes_zeroed, digest, grid, ranges)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                b.id,
                d.disk,
                d.path,
                d.virtual_size,
                d.bytes_read,
                d.bytes_written,
                d.bytes_zeroed,
                d.digest,
                d.grid,
                ranges_json(d.ranges),
            ),
        )
        for d in b.disks
    ]


def backup_record(r: Row, disks: Sequence[Row], left_out: Sequence[Row]) -> BackupRecord:
    """A backup as its row, its disks' rows and its left-out disks' rows say."""
    return BackupRecord(
        id=r["id"],
        domain_uuid=r["domain_uuid"],
        domain_name=r["domain_name"],
        level=Level(r["level"]),
        status=BackupStatus(r["status"]),
        checkpoint=r["checkpoint"],
        parent=r["parent_id"],
        started=req(r["started"]),
        finished=dt(r["finished"]),
        error=r["error"],
        bytes_read=r["bytes_read"],
        bytes_written=r["bytes_written"],
        path=r["path"],
        disks=tuple(
            DiskRecord(
                d["disk"],
                d["path"],
                d["virtual_size"],
                d["bytes_read"],
                d["bytes_written"],
                d["bytes_zeroed"],
                d["digest"],
                d["grid"],
                lazy_ranges(d["ranges"]),
            )
            for d in disks
        ),
        left_out=tuple(LeftOutDisk(x["disk"], x["reason"]) for x in left_out),
        unreadable=r["unreadable"],
    )
