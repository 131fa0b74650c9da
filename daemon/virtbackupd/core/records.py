"""What the state store records, as typed values (no SQL here)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from virtbackupd.core.extents import Range
from virtbackupd.core.policy import Level


class BackupStatus(StrEnum):
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"


class CheckpointStatus(StrEnum):
    ACTIVE = "active"  # exists in libvirt, bitmaps trusted
    DELETED = "deleted"  # removed: a failed backup's, broken bitmaps, forget-checkpoints
    PRUNED = "pruned"  # its backup was pruned: removed on purpose, nothing is wrong
    OVERWRITTEN = "overwritten"  # `restore --in-place` wrote over the disks it described


@dataclass(frozen=True)
class DomainRecord:
    uuid: str
    name: str
    first_seen: datetime
    last_seen: datetime
    undefined_at: datetime | None = None


@dataclass(frozen=True)
class CheckpointRecord:
    domain_uuid: str
    name: str
    parent: str | None
    created: datetime
    status: CheckpointStatus
    xml: str  # libvirt's checkpoint XML (with <domain>), for redefinition


@dataclass(frozen=True)
class DiskRecord:
    disk: str
    path: str  # relative to the backup folder
    virtual_size: int
    bytes_read: int
    bytes_written: int
    bytes_zeroed: int
    digest: str
    grid: int
    ranges: Sequence[Range]  # what the digest covers (see core.extents; maybe LazyRanges)
    # The piece-hash file beside the image (format 2; None for backups
    # written in format 1): checked piece by piece as restores read.
    pieces: str | None = None
    # The image stands alone (True) or is an overlay on the parent's image
    # of this disk (False), as the manifest says; None: a manifest written
    # before the field existed (see repository_format.manifest.allowed_backings).
    standalone: bool | None = None


@dataclass(frozen=True)
class LeftOutDisk:
    """A disk of the domain that a backup does not hold, and why (policy,
    format, read-only...). Removable media (cdrom, floppy) are not listed."""

    disk: str
    reason: str


@dataclass(frozen=True)
class BackupRecord:
    id: str
    domain_uuid: str
    domain_name: str
    level: Level
    status: BackupStatus
    checkpoint: str | None
    parent: str | None  # backup id
    started: datetime
    finished: datetime | None = None
    error: str | None = None
    bytes_read: int = 0
    bytes_written: int = 0
    path: str | None = None  # the backup's folder
    disks: tuple[DiskRecord, ...] = ()
    left_out: tuple[LeftOutDisk, ...] = ()
    # A stand-in: the catalogue was rebuilt from a folder whose manifest it
    # could not read (this says why); the fields above are what the folder
    # alone tells (its id, domain, path), the rest is unknown.
    unreadable: str | None = None

    def as_json(self) -> dict[str, object]:
        """The stable shape of `virtbackup --json list` (documented)."""
        return {
            "id": self.id,
            "domain": self.domain_name,
            "domain_uuid": self.domain_uuid,
            "level": self.level.value,
            "status": self.status.value,
            "checkpoint": self.checkpoint,
            "parent": self.parent,
            "started": self.started.isoformat(),
            "finished": self.finished.isoformat() if self.finished else None,
            "error": self.error,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "path": self.path,
            "disks": [
                {
                    "name": d.disk,
                    "path": d.path,
                    "virtual_size": d.virtual_size,
                    "bytes_written": d.bytes_written,
                    "bytes_zeroed": d.bytes_zeroed,
                    "digest": d.digest,
                }
                for d in self.disks
            ],
            "left_out": [{"name": d.disk, "reason": d.reason} for d in self.left_out],
        }


@dataclass(frozen=True)
class RunningJob:
    """A running backup with its last published progress: `done` of
    `total` bytes (total: what the job will read, known once the disks'
    maps are walked; 0 until then), `rate` in bytes per second."""

    backup_id: str
    domain: str
    domain_uuid: str
    level: Level
    started: datetime
    done: int = 0
    total: int = 0
    rate: float = 0.0
    updated: datetime | None = None
    interrupted: bool = False  # recorded running, but its process is gone

    @property
    def eta_s(self) -> int | None:
        """Seconds left at the current rate; None while it cannot be told."""
        if self.interrupted or self.total <= 0 or self.rate <= 0 or self.done > self.total:
            return None
        return int((self.total - self.done) / self.rate)

    def as_json(self) -> dict[str, object]:
        return {
            "backup_id": self.backup_id,
            "domain": self.domain,
            "domain_uuid": self.domain_uuid,
            "level": self.level.value,
            "started": self.started.isoformat(),
            "done": self.done,
            "total": self.total,
            "rate": self.rate,
            "eta_s": self.eta_s,
            "updated": self.updated.isoformat() if self.updated else None,
            "interrupted": self.interrupted,
        }
