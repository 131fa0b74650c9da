"""A backup's manifest: its ids, level, checkpoint, parent, disks and
their digests, as a typed value and its JSON form."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from virtbackupd.core import extents
from virtbackupd.core.extents import LazyRanges, Range
from virtbackupd.core.policy import Level
from virtbackupd.core.records import BackupRecord, BackupStatus, DiskRecord, LeftOutDisk
from virtbackupd.core.repository_format.codec import Fields, RepositoryFormatError
from virtbackupd.core.repository_format.documents import DOCUMENTS
from virtbackupd.core.repository_format.names import (
    MAX_NAME_CHARS,
    backing_of,
    escaped,
    pieces_file,
)
from virtbackupd.core.repository_format.versions import (
    BACKUP_FORMAT,
    FORMAT_VERSION,
    V1_FORMAT,
    Operation,
    check_manifest_version,
)


@dataclass(frozen=True)
class Manifest:
    """manifest.json of one backup folder."""

    id: str
    domain_name: str
    domain_uuid: str
    level: Level
    reason: str
    checkpoint: str | None
    parent: str | None  # the backup this one's images are overlays on
    parent_checkpoint: str | None
    started: datetime
    finished: datetime
    disks: tuple[DiskRecord, ...]
    left_out: tuple[LeftOutDisk, ...] = ()
    absorbed: tuple[str, ...] = ()  # backups merged into this one by prunes
    version: int = FORMAT_VERSION
    # SHA-256 of the folder's text documents (domain.xml, checkpoint.xml),
    # checked before they are used; empty in manifests written before it.
    documents: Mapping[str, str] = field(default_factory=dict)

    @property
    def standalone(self) -> bool:
        return self.parent is None

    def disk(self, name: str) -> DiskRecord | None:
        return next((d for d in self.disks if d.disk == name), None)

    def check_version(self, path: Path, operation: Operation) -> None:
        """Raise RepositoryFormatError unless this virtbackupd may do
        `operation` on a backup of this manifest's format version."""
        check_manifest_version(path, self.version, operation)

    def to_json(self) -> dict[str, object]:
        return {
            "format": BACKUP_FORMAT,
            "format_version": FORMAT_VERSION,
            "id": self.id,
            "domain": {"name": self.domain_name, "uuid": self.domain_uuid},
            "level": self.level.value,
            "reason": self.reason,
            "checkpoint": self.checkpoint,
            "parent": self.parent,
            "parent_checkpoint": self.parent_checkpoint,
            "started": self.started.isoformat(),
            "finished": self.finished.isoformat(),
            "disks": [_disk_json(d) for d in self.disks],
            "left_out": [{"name": d.disk, "reason": d.reason} for d in self.left_out],
            "absorbed": list(self.absorbed),
            "documents": dict(self.documents),
        }

    @classmethod
    def from_json(
        cls, data: object, path: Path, lazy_ranges: Sequence[str] | None = None
    ) -> Manifest:
        """`lazy_ranges` (the range lists codec.cut_ranges took out of the
        text, maybe none): each disk's range list is parsed and checked when
        first read (a listing reads none), not now."""
        f = Fields(data, path)
        fmt = f.text("format")
        if fmt == V1_FORMAT:
            version = 1
        elif fmt == BACKUP_FORMAT:
            version = f.integer("format_version")
        else:
            raise RepositoryFormatError(path, f"format is {fmt!r}, not {BACKUP_FORMAT!r}")
        check_manifest_version(path, version, Operation.READ)
        domain = f.sub("domain")
        return cls(
            id=f.backup_id("id"),
            domain_name=domain.line("name", MAX_NAME_CHARS),
            domain_uuid=domain.uuid("uuid"),
            level=f.enum("level", Level),
            reason=escaped(f.text("reason", default="")),
            checkpoint=f.opt_text("checkpoint"),
            parent=f.opt_backup_id("parent"),
            parent_checkpoint=f.opt_text("parent_checkpoint"),
            started=f.time("started"),
            finished=f.time("finished"),
            disks=tuple(_disk(d, version, lazy_ranges) for d in f.items("disks")),
            left_out=tuple(
                LeftOutDisk(x.text("name"), escaped(x.text("reason")))
                for x in f.items("left_out", [])
            ),
            absorbed=tuple(f.backup_ids("absorbed")),
            version=version,
            documents=_documents(f),
        )

    def as_record(self, folder: Path) -> BackupRecord:
        """The catalogue's row for this committed backup."""
        return BackupRecord(
            id=self.id,
            domain_uuid=self.domain_uuid,
            domain_name=self.domain_name,
            level=self.level,
            status=BackupStatus.COMPLETE,
            checkpoint=self.checkpoint,
            parent=self.parent,
            started=self.started,
            finished=self.finished,
            bytes_read=sum(d.bytes_read for d in self.disks),
            bytes_written=sum(d.bytes_written for d in self.disks),
            path=str(folder),
            disks=self.disks,
            left_out=self.left_out,
        )


def _disk_json(d: DiskRecord) -> dict[str, object]:
    return {
        "name": d.disk,
        "file": d.path,
        "pieces": d.pieces,
        "virtual_size": d.virtual_size,
        "bytes_read": d.bytes_read,
        "bytes_written": d.bytes_written,
        "bytes_zeroed": d.bytes_zeroed,
        "digest": d.digest,
        "grid": d.grid,
        "ranges": extents.ranges_to_json(d.ranges),
        # Absent only where the manifest was read without it.
        **({} if d.standalone is None else {"standalone": d.standalone}),
    }


def _documents(f: Fields) -> dict[str, str]:
    docs = f.sub("documents", default={})
    out = {}
    for name in docs.names():
        if name not in DOCUMENTS:
            raise docs.error(name, f"not one of {', '.join(DOCUMENTS)}")
        digest = docs.text(name)
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise docs.error(name, f"{digest[:80]!r} is not a SHA-256 in hex")
        out[name] = digest
    return out


def _disk(f: Fields, version: int, cuts: Sequence[str] | None) -> DiskRecord:
    """`cuts`: read lazily; the range lists that the read left as text
    (see codec.cut_ranges), which this disk's "ranges" may point into."""
    size = f.integer("virtual_size", minimum=1)

    def checked(ranges: tuple[Range, ...]) -> tuple[Range, ...]:
        # In order, not overlapping, inside the disk: a reader trusts them.
        end = 0
        for r in ranges:
            if r.offset < end or r.length <= 0 or r.end > size:
                raise f.error(
                    "ranges", f"{r.offset}+{r.length} is out of order, empty or beyond the disk"
                )
            end = r.end
        return ranges

    def from_text(text: str) -> tuple[Range, ...]:
        try:
            return checked(tuple(extents.ranges_from_json(json.loads(text))))
        except (ValueError, TypeError) as exc:
            raise f.error("ranges", f"bad range list ({str(exc)[:120]})") from exc

    ranges: Sequence[Range]
    cut = f.data.get("ranges")
    if cuts is None:
        ranges = checked(f.ranges("ranges"))
    elif type(cut) is int and 0 <= cut < len(cuts):
        text = cuts[cut]
        ranges = LazyRanges(lambda: from_text(text))
    else:
        ranges = LazyRanges(lambda: checked(f.ranges("ranges")))
    return DiskRecord(
        disk=f.plain_name("name"),
        path=f.plain_name("file"),
        virtual_size=size,
        bytes_read=f.integer("bytes_read", minimum=0),
        bytes_written=f.integer("bytes_written", minimum=0),
        bytes_zeroed=f.integer("bytes_zeroed", minimum=0),
        digest=f.text("digest"),
        grid=f.grid("grid"),
        ranges=ranges,
        pieces=f.plain_name("pieces") if version >= 2 else None,
        standalone=f.opt_bool("standalone"),
    )


def allowed_backings(manifest: Manifest, disk: DiskRecord) -> tuple[str | None, ...]:
    """The backing files the format allows the image of `disk` (None:
    standalone). A manifest says so per disk (`standalone`); one written
    before that field existed allows a standalone image inside an
    incremental where the disk was copied whole (older virtbackupd wrote a
    raw or block-device disk's full copy, and a disk new since the parent,
    that way): its ranges cover the disk, so its view is the same on any
    backing file."""
    if manifest.parent is None or disk.standalone:
        return (None,)
    overlay = backing_of(manifest.parent, disk.disk)
    if disk.standalone is None and extents.covers(disk.ranges, disk.virtual_size):
        return (overlay, None)
    return (overlay,)


def next_pieces_name(disk: DiskRecord) -> str:
    """A fresh name for a rewritten piece file (a crash while a manifest is
    rewritten must leave the old piece file, which its old manifest names,
    as it was)."""
    stem = disk.disk
    current = disk.pieces or pieces_file(stem)
    middle = current[len(stem) + 1 : -len(".pieces")]
    n = int(middle) + 1 if middle.isdigit() else 1
    return f"{stem}.{n}.pieces"


def with_pieces(manifest: Manifest, disk: str, record: DiskRecord) -> Manifest:
    return replace(manifest, disks=tuple(record if d.disk == disk else d for d in manifest.disks))
