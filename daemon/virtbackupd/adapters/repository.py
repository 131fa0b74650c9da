"""The backup repository on disk: the only module that reads or writes its
format (docs/repository-format.md specifies it for readers without this
project; schemas/ holds its JSON schemas).

    <root>/<domain uuid>/<backup id>/
        <disk>.qcow2       full: standalone; incremental: overlay whose backing
                           file is ../<parent id>/<disk>.qcow2 (relative)
        <disk>.pieces      the hash of every piece the digest covers
        manifest.json      ids, level, checkpoint, parent, disks, digests
        domain.xml         the domain's (inactive) XML at backup time
        checkpoint.xml     libvirt's checkpoint XML, for redefinition
    <root>/<domain uuid>/<backup id>.partial/   a backup being written
    <root>/<domain uuid>/.undo/<backup id>.json  what a running backup must undo
    <root>/<domain uuid>/.attempts/<backup id>.json  a failed attempt
    <root>/<domain uuid>/.prune-journal.json    a prune in progress
    <root>/.repository.json                     which repository this is (its id)

The folders are the truth; state.db is a catalogue of them. A backup
counts once its folder is renamed from ``.partial`` to its id (every file
fsynced first): that rename is the commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import struct
import unicodedata
import uuid as uuidlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

import structlog

from virtbackupd.adapters import host_folders
from virtbackupd.core import extents
from virtbackupd.core.extents import Kind, LazyRanges, Piece, Range
from virtbackupd.core.merge_plan import Consolidate, Op, Rebase, Remove
from virtbackupd.core.policy import Level
from virtbackupd.core.records import BackupRecord, BackupStatus, DiskRecord, LeftOutDisk
from virtbackupd.errors import InputError, VirtBackupError

MANIFEST = "manifest.json"
PRUNE_JOURNAL = ".prune-journal.json"
UNDO_DIR = ".undo"
ATTEMPTS_DIR = ".attempts"
HOLDS_DIR = ".holds"
IDENTITY = ".repository.json"
IDENTITY_FORMAT = "virtbackupd-repository"
BACKUP_FORMAT = "virtbackupd-backup"
FORMAT_VERSION = 2  # 2: <disk>.pieces beside every image
READABLE_VERSIONS = (1, 2)
_V1_FORMAT = "virtbackupd-backup/1"  # format 1 wrote the version into the name
KEPT_ATTEMPTS = 50  # failed attempts remembered per domain

StepHook = Callable[[str], None]  # called after each durable step (tests crash there)
_T = TypeVar("_T")
_E = TypeVar("_E", bound=StrEnum)


class RepositoryFormatError(VirtBackupError):
    """A repository file this version cannot read: damaged, or newer."""

    path: Path  # always a file's (the root's context field allows text too)

    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


#: What an operator does with a refused journal or undo log: its steps
#: rename and delete folders as root, so nothing of it is ever done, and
#: only a human can tell a damaged file of ours from a planted one.
REFUSED_ADVICE = "inspect it and move it out of the repository"


log = structlog.get_logger("virtbackupd.repository")


# --- names -------------------------------------------------------------------------------


# What new_backup_id makes (and, without the milliseconds, what early
# versions made): a name that can never climb out of a folder.
BACKUP_ID = re.compile(r"[0-9]{8}T[0-9]{6}(\.[0-9]{3})?Z-[0-9a-f]{4}")


def is_backup_id(text: str) -> bool:
    return BACKUP_ID.fullmatch(text) is not None


def is_plain_name(text: str) -> bool:
    """A file name inside its own folder: no separator, not hidden (our
    own bookkeeping starts with a dot), not empty."""
    return (
        0 < len(text) <= 255 and "/" not in text and "\x00" not in text and not text.startswith(".")
    )


def is_unsafe_char(c: str) -> bool:
    """A character that moves a terminal rather than showing itself: C0,
    DEL, C1, and Unicode format characters (bidi overrides such as
    U+202E reorder what follows them on the screen)."""
    code = ord(c)
    return code < 32 or 127 <= code < 160 or unicodedata.category(c) == "Cf"


def escaped(text: str) -> str:
    """`text` with every unsafe character written as ``\\xNN`` or
    ``\\uNNNN``: a repository's free text (an attempt's error, a reason)
    shown the same by every command, never as a terminal escape."""
    return "".join(
        (f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}") if is_unsafe_char(c) else c
        for c in text
    )


def new_backup_id(now: datetime) -> str:
    """Unique, and sorting as the backups were taken (to the millisecond):
    ``20261123T201500.123Z-3f2a``."""
    return f"{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z-{secrets.token_hex(2)}"


def disk_file(disk: str) -> str:
    return f"{disk}.qcow2"


def pieces_file(disk: str) -> str:
    return f"{disk}.pieces"


def backing_of(parent_id: str, disk: str) -> str:
    """Backing path of an incremental, relative to the overlay's folder."""
    return f"../{parent_id}/{disk_file(disk)}"


# --- the manifest ------------------------------------------------------------------------


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
            "disks": [
                {
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
                for d in self.disks
            ],
            "left_out": [{"name": d.disk, "reason": d.reason} for d in self.left_out],
            "absorbed": list(self.absorbed),
            "documents": dict(self.documents),
        }

    @classmethod
    def from_json(
        cls, data: object, path: Path, lazy_ranges: Sequence[str] | None = None
    ) -> Manifest:
        """`lazy_ranges` (the range lists _cut_ranges took out of the text,
        maybe none): each disk's range list is parsed and checked when
        first read (a listing reads none), not now."""
        f = _Fields(data, path, "")
        fmt = f.text("format")
        if fmt == _V1_FORMAT:
            version = 1
        elif fmt == BACKUP_FORMAT:
            version = f.integer("format_version")
        else:
            raise RepositoryFormatError(path, f"format is {fmt!r}, not {BACKUP_FORMAT!r}")
        if version > FORMAT_VERSION:
            raise RepositoryFormatError(
                path,
                f"written in repository format {version}, newer than this virtbackupd reads "
                f"(up to {FORMAT_VERSION}); upgrade virtbackupd to read it",
            )
        if version not in READABLE_VERSIONS:
            raise RepositoryFormatError(path, f"unknown repository format {version}")
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


def _documents(f: _Fields) -> dict[str, str]:
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


def _disk(f: _Fields, version: int, cuts: Sequence[str] | None) -> DiskRecord:
    """`cuts`: read lazily; the range lists that the read left as text
    (see _cut_ranges), which this disk's "ranges" may point into."""
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


# --- the folder's text documents --------------------------------------------------------

DOMAIN_XML = "domain.xml"
CHECKPOINT_XML = "checkpoint.xml"
DOCUMENTS = (DOMAIN_XML, CHECKPOINT_XML)


class DocumentDigestError(RepositoryFormatError, InputError):
    """A backup's domain.xml or checkpoint.xml is not what was written at
    backup time: it was edited (or damaged) since."""


def document_digests(texts: Mapping[str, str]) -> dict[str, str]:
    """The manifest's ``documents``: SHA-256 of each text file as written."""
    return {name: hashlib.sha256(text.encode()).hexdigest() for name, text in texts.items()}


class Trust(StrEnum):
    VERIFIED = "verified"  # matches the digest in its manifest
    UNRECORDED = "unrecorded"  # the manifest predates digests: nothing to check
    EDITED = "edited"  # does not match; read only because the caller accepts that


@dataclass(frozen=True)
class Document:
    """A text file of a backup folder, read for use."""

    path: Path
    text: str
    trust: Trust


def read_document(
    folder: Path, manifest: Manifest, name: str, *, accept_edited: bool = False
) -> Document:
    """`name` (domain.xml or checkpoint.xml) of the backup in `folder`,
    checked against the manifest's digest: one that does not match raises
    DocumentDigestError unless `accept_edited`."""
    path = folder / name
    data = _read_bounded(path, MAX_DOCUMENT_BYTES)
    digest = manifest.documents.get(name)
    if digest is None:
        trust = Trust.UNRECORDED
    elif hashlib.sha256(data).hexdigest() == digest:
        trust = Trust.VERIFIED
    elif accept_edited:
        trust = Trust.EDITED
    else:
        raise DocumentDigestError(
            path,
            f"does not match the SHA-256 recorded for it in {MANIFEST} "
            "(edited or damaged since the backup)",
        )
    return Document(path, _decode(path, data), trust)


#: A domain or checkpoint XML of a few hundred devices is a few hundred KiB.
MAX_DOCUMENT_BYTES = 8 * 1024 * 1024


def _read_bounded(path: Path, limit: int) -> bytes:
    """A regular file of at most `limit` bytes, not through a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise RepositoryFormatError(path, f"cannot read: {exc.strerror or exc}") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        # Checked before fdopen, which refuses a folder naming only the fd.
        os.close(fd)
        raise RepositoryFormatError(path, "is not a regular file")
    with os.fdopen(fd, "rb") as f:
        # Asked for what is there (plus one: it grew), not for `limit`:
        # a read of `limit` bytes allocates that much first, 64 MiB for
        # every small JSON file a listing reads.
        data = f.read(min(st.st_size, limit) + 1)
    if len(data) > limit:
        raise RepositoryFormatError(path, f"is larger than {limit} bytes")
    return data


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise RepositoryFormatError(path, f"is not UTF-8 (byte {exc.start})") from exc


# --- piece hashes ------------------------------------------------------------------------


_HEAD = struct.Struct(">QQc")


def parse_pieces(data: bytes, path: Path) -> list[Piece]:
    """A ``.pieces`` file: the digest's records (core.extents.piece_record)
    back to back, in offset order; its SHA-256 is the recorded digest."""
    out: list[Piece] = []
    pos = 0
    while pos < len(data):
        if pos + _HEAD.size > len(data):
            raise RepositoryFormatError(path, f"truncated record at byte {pos}")
        offset, length, tag = _HEAD.unpack_from(data, pos)
        pos += _HEAD.size
        if tag == b"D":
            content = data[pos : pos + 16]
            if len(content) != 16:
                raise RepositoryFormatError(path, f"truncated hash at byte {pos}")
            pos += 16
            out.append(Piece(offset, length, Kind.DATA, content))
        elif tag == b"Z":
            out.append(Piece(offset, length, Kind.ZERO))
        else:
            raise RepositoryFormatError(path, f"unknown record kind {tag!r} at byte {pos}")
    return out


def read_pieces(folder: Path, disk: DiskRecord) -> list[Piece]:
    """The disk's piece hashes, checked against its recorded digest."""
    if disk.pieces is None:
        raise RepositoryFormatError(folder / MANIFEST, f"disk {disk.disk} has no piece file")
    path = folder / disk.pieces
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RepositoryFormatError(path, f"cannot read: {exc.strerror or exc}") from exc
    if hashlib.sha256(data).hexdigest() != disk.digest:
        raise RepositoryFormatError(path, "does not match the disk's recorded digest")
    return parse_pieces(data, path)


# --- the prune journal -------------------------------------------------------------------

JOURNAL_FORMAT = "virtbackupd-prune-journal"


@dataclass(frozen=True)
class PruneJournal:
    """A prune's plan, written before anything changes (engine.prune)."""

    ops: tuple[Op, ...]
    checkpoints: Mapping[str, str | None] = field(default_factory=dict)  # removed id -> its cp

    @property
    def removing(self) -> frozenset[str]:
        return frozenset(op.id for op in self.ops if isinstance(op, Remove))

    def to_json(self) -> dict[str, object]:
        return {
            "format": JOURNAL_FORMAT,
            "format_version": 1,
            "ops": [_op_json(op) for op in self.ops],
            "checkpoints": dict(self.checkpoints),
        }

    @classmethod
    def from_json(cls, data: object, path: Path) -> PruneJournal:
        f = _Fields(data, path, "")
        version = f.integer("format_version", default=1)
        if version > 1:
            raise RepositoryFormatError(
                path, f"prune journal format {version} is newer than this virtbackupd reads (1)"
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


def _op(f: _Fields) -> Op:
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


# --- the undo log of a running backup ----------------------------------------------------

UNDO_FORMAT = "virtbackupd-undo"


class UndoKind(StrEnum):
    """What a backup did that a failure must take back (last first)."""

    PARTIAL = "partial"  # the <id>.partial folder
    JOB_DIR = "job_dir"  # a runtime folder (NBD sockets) or scratch folder
    LIBVIRT_JOB = "libvirt_job"  # a pull-mode job whose NBD socket is `path`
    CHECKPOINT = "checkpoint"  # a libvirt checkpoint named `name`
    BITMAP = "bitmap"  # a bitmap `name` added to the image `path` (offline)


@dataclass(frozen=True)
class UndoStep:
    kind: UndoKind
    path: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class UndoLog:
    """Written before each step it lists is taken, fsynced: whoever finds
    it (the job on failure, or the next job after this process died) takes
    the steps back in reverse order. Dropped once the backup committed."""

    backup_id: str
    domain_name: str
    domain_uuid: str
    level: Level
    started: datetime
    steps: tuple[UndoStep, ...] = ()
    parent: str | None = None  # the backup it was to build on

    def to_json(self) -> dict[str, object]:
        return {
            "format": UNDO_FORMAT,
            "format_version": 1,
            "backup_id": self.backup_id,
            "domain": {"name": self.domain_name, "uuid": self.domain_uuid},
            "level": self.level.value,
            "parent": self.parent,
            "started": self.started.isoformat(),
            "steps": [
                {
                    k: v
                    for k, v in (("do", s.kind.value), ("path", s.path), ("name", s.name))
                    if v is not None
                }
                for s in self.steps
            ],
        }

    @classmethod
    def from_json(cls, data: object, path: Path) -> UndoLog:
        f = _Fields(data, path, "")
        if f.integer("format_version") > 1:
            raise RepositoryFormatError(path, "undo log format is newer than this version reads")
        domain = f.sub("domain")
        backup_id = f.backup_id("backup_id")
        steps = tuple(
            UndoStep(s.enum("do", UndoKind), s.opt_text("path"), s.opt_text("name"))
            for s in f.items("steps")
        )
        for i, step in enumerate(steps):
            # Taking these back deletes the folder, as root: only the
            # backup's own partial and job folders, named by its id, ever.
            wanted = {UndoKind.PARTIAL: f"{backup_id}.partial", UndoKind.JOB_DIR: backup_id}
            name = wanted.get(step.kind)
            if name is None:
                continue
            where = Path(step.path or "")
            # <domain>/.undo/<id>.json: the partial folder is in <domain>.
            beside = where.parent == path.parent.parent or step.kind is not UndoKind.PARTIAL
            if not where.is_absolute() or ".." in where.parts or where.name != name or not beside:
                raise f.error(
                    f"steps[{i}].path",
                    f"{str(step.path)[:80]!r} is not this backup's own {step.kind.value} folder "
                    f"(an absolute path ending in {name})",
                )
        return cls(
            backup_id=backup_id,
            domain_name=domain.line("name", MAX_NAME_CHARS),
            domain_uuid=domain.uuid("uuid"),
            level=f.enum("level", Level),
            started=f.time("started"),
            steps=steps,
            parent=f.opt_backup_id("parent"),
        )


# --- failed attempts ---------------------------------------------------------------------

ATTEMPT_FORMAT = "virtbackupd-attempt"
MAX_NAME_CHARS = 255  # a libvirt domain name is far shorter in practice
MAX_ERROR_CHARS = 16 * 1024  # what an attempt's error may say


@dataclass(frozen=True)
class FailedAttempt:
    """A backup that did not complete: kept in the repository so that a
    rebuilt catalogue still shows it."""

    backup_id: str
    domain_name: str
    domain_uuid: str
    level: Level
    started: datetime
    finished: datetime
    error: str
    parent: str | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "format": ATTEMPT_FORMAT,
            "format_version": 1,
            "backup_id": self.backup_id,
            "domain": {"name": self.domain_name, "uuid": self.domain_uuid},
            "level": self.level.value,
            "started": self.started.isoformat(),
            "finished": self.finished.isoformat(),
            # Cut to what a reader takes (MAX_ERROR_CHARS): a long tool
            # output must not make the record unreadable.
            "error": self.error[:MAX_ERROR_CHARS],
            "parent": self.parent,
        }

    @classmethod
    def from_json(cls, data: object, path: Path) -> FailedAttempt:
        """Read from ``<root>/<domain uuid>/.attempts/<backup id>.json``: a
        rebuilt catalogue records it as a backup row, so its id must be
        the file's own name, its domain the folder it is in, its parent a
        backup id, its texts short single lines."""
        f = _Fields(data, path, "")
        fmt = f.text("format")
        if fmt != ATTEMPT_FORMAT:
            raise f.error("format", f"{fmt[:40]!r} is not {ATTEMPT_FORMAT!r}")
        if f.integer("format_version") > 1:
            raise f.error("format_version", "newer than this virtbackupd reads (1)")
        backup_id = f.backup_id("backup_id")
        if backup_id != path.stem:
            raise f.error("backup_id", f"{backup_id!r} is not the file's own name {path.stem!r}")
        domain = f.sub("domain")
        uuid = domain.uuid("uuid")
        if uuid != path.parent.parent.name:
            raise domain.error(
                "uuid", f"{uuid!r} is not the domain folder it is in ({path.parent.parent.name})"
            )
        return cls(
            backup_id,
            domain.line("name", MAX_NAME_CHARS),
            uuid,
            f.enum("level", Level),
            f.time("started"),
            f.time("finished"),
            escaped(f.bounded_text("error", MAX_ERROR_CHARS)),
            f.opt_backup_id("parent"),
        )

    def as_record(self) -> BackupRecord:
        return BackupRecord(
            id=self.backup_id,
            domain_uuid=self.domain_uuid,
            domain_name=self.domain_name,
            level=self.level,
            status=BackupStatus.FAILED,
            checkpoint=None,
            parent=self.parent,
            started=self.started,
            finished=self.finished,
            error=self.error,
        )


# --- holds: backups something still reads -------------------------------------------------

HOLD_FORMAT = "virtbackupd-hold"


class HoldKind(StrEnum):
    LIVE_RESTORE = "live-restore"  # a domain runs from the backup while its disks move
    MOUNT = "mount"  # the backup's filesystems are mounted read-only


@dataclass(frozen=True)
class Hold:
    """A backup (and so its whole chain) that something outside the
    repository reads: prune and chain merges leave every file of the chain
    untouched while the hold exists. `detail` says what holds it, for the
    operator; the other fields let whoever finds the hold tell whether it
    still stands (the domain and its disks; the mount point and helper)."""

    id: str
    kind: HoldKind
    domain_uuid: str
    backup_id: str
    created: datetime
    detail: str
    new_domain: str | None = None  # live restore: the UUID of the domain running from it
    disks: tuple[str, ...] = ()  # live restore: its images being moved; mount: the disks
    directory: str | None = None  # live restore: DIR; mount: the mount point
    helper_pid: int | None = None  # mount: the qemu-storage-daemon exporting the disks
    state_dir: str | None = None  # mount: runtime folder of its exports
    devices: tuple[str, ...] = ()  # mount: the read-only loop devices
    rate: int = 0  # live restore: the move's bandwidth limit, bytes/s (0: none)
    opened: tuple[str, ...] = ()  # live restore: folders opened for QEMU's user (o+x)
    checkpoint: str | None = None  # live restore: the checkpoint recording the guest's writes
    verified: tuple[str, ...] = ()  # live restore: disks moved and checked against the backup
    trouble: str | None = None  # live restore: a crash or a failed check, for the operator
    failed_run: int | None = None  # live restore: libvirt's id of the QEMU a check failed in
    # live restore: the disk whose pull was started last, in which QEMU run,
    # how many of its pulls ended unfinished there, and when the last did
    pulling: str | None = None
    pull_run: int | None = None
    pull_failures: int = 0
    pull_failed_at: datetime | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "format": HOLD_FORMAT,
            "format_version": 1,
            "id": self.id,
            "kind": self.kind.value,
            "domain_uuid": self.domain_uuid,
            "backup_id": self.backup_id,
            "created": self.created.isoformat(),
            "detail": self.detail,
            "new_domain": self.new_domain,
            "disks": list(self.disks),
            "directory": self.directory,
            "helper_pid": self.helper_pid,
            "state_dir": self.state_dir,
            "devices": list(self.devices),
            "rate": self.rate,
            "opened": list(self.opened),
            "checkpoint": self.checkpoint,
            "verified": list(self.verified),
            "trouble": self.trouble,
            "failed_run": self.failed_run,
            "pulling": self.pulling,
            "pull_run": self.pull_run,
            "pull_failures": self.pull_failures,
            "pull_failed_at": None
            if self.pull_failed_at is None
            else self.pull_failed_at.isoformat(),
        }

    @classmethod
    def from_json(cls, data: object, path: Path) -> Hold:
        f = _Fields(data, path, "")
        if f.integer("format_version") > 1:
            raise RepositoryFormatError(path, "hold format is newer than this version reads")
        # What a hold names is acted on as root when it is released
        # (loop devices detached, a state folder deleted, folders' modes
        # restored): only what ours can name.
        root = path.parent.parent.parent  # <root>/<uuid>/.holds/<id>.json
        for i, dev in enumerate(f.texts("devices")):
            if re.fullmatch(r"/dev/loop[0-9]+", dev) is None:
                raise f.error(f"devices[{i}]", f"{dev[:40]!r} is not a loop device")
        for i, opened in enumerate(f.texts("opened")):
            where = Path(opened)
            if ".." in where.parts or not (where == root or where.is_relative_to(root)):
                raise f.error(f"opened[{i}]", f"{opened[:80]!r} is not a folder of this repository")
        state = f.opt_text("state_dir")
        if state is not None:
            where = Path(state)
            if not where.is_absolute() or ".." in where.parts or where.parent.name != "mounts":
                raise f.error("state_dir", f"{state[:80]!r} is not a mount's runtime folder")
        return cls(
            id=f.text("id"),
            kind=f.enum("kind", HoldKind),
            domain_uuid=f.uuid("domain_uuid"),
            backup_id=f.backup_id("backup_id"),
            created=f.time("created"),
            detail=f.text("detail"),
            new_domain=f.opt_text("new_domain"),
            disks=tuple(f.texts("disks")),
            directory=f.opt_text("directory"),
            helper_pid=f.opt_integer("helper_pid"),
            state_dir=f.opt_text("state_dir"),
            devices=tuple(f.texts("devices")),
            rate=f.integer("rate", 0),
            opened=tuple(f.texts("opened")),
            checkpoint=f.opt_text("checkpoint"),
            verified=tuple(f.texts("verified")),
            trouble=f.opt_text("trouble"),
            failed_run=f.opt_integer("failed_run"),
            pulling=f.opt_text("pulling"),
            pull_run=f.opt_integer("pull_run"),
            pull_failures=f.integer("pull_failures", 0),
            pull_failed_at=f.time("pull_failed_at") if f.opt_text("pull_failed_at") else None,
        )


# --- the repository ----------------------------------------------------------------------


@dataclass(frozen=True)
class StoredBackup:
    folder: Path
    manifest: Manifest


class Repository:
    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def of_domain(cls, domain_dir: Path) -> Repository:
        """The repository a domain folder (``<root>/<uuid>``) is in."""
        return cls(domain_dir.parent)

    @classmethod
    def of_backup(cls, folder: Path) -> Repository:
        """The repository a backup folder (``<root>/<uuid>/<id>``) is in."""
        return cls(folder.parent.parent)

    def domain_dir(self, uuid: str) -> Path:
        return self.root / uuid

    # --- identity ---

    def identity(self) -> str | None:
        """The repository's id (a UUID in ``.repository.json``), None if it
        has none yet. A catalogue records it to know which repository it
        describes (engine.catalogue.check_identity)."""
        path = self.root / IDENTITY
        data = _read_json(path, missing_ok=True)
        if data is None:
            return None
        f = _Fields(data, path, "")
        fmt = f.text("format")
        if fmt != IDENTITY_FORMAT:
            raise f.error("format", f"{fmt[:40]!r} is not {IDENTITY_FORMAT!r}")
        if f.integer("format_version") > 1:
            raise f.error("format_version", "newer than this virtbackupd reads (1)")
        return f.uuid("id")

    def make_identity(self) -> str:
        """The repository's id, given one first if it has none (an existing
        root only). Two processes doing this at once agree: the file is
        written aside and linked into place, which fails if one is there."""
        have = self.identity()
        if have is not None:
            return have
        path = self.root / IDENTITY
        tmp = self.root / f"{IDENTITY}.{secrets.token_hex(4)}.tmp"
        text = _json_text(
            {"format": IDENTITY_FORMAT, "format_version": 1, "id": str(uuidlib.uuid4())}
        )
        _write_synced(tmp, text)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process was first: its id stands
        finally:
            tmp.unlink()
        fsync_path(self.root)
        made = self.identity()
        assert made is not None
        return made

    def holds_backups(self) -> bool:
        """Whether any domain folder is here (an empty or missing root is a
        repository not yet written, or a share not mounted)."""
        return bool(self.domain_dirs())

    def final_dir(self, uuid: str, backup_id: str) -> Path:
        return self.domain_dir(uuid) / backup_id

    def partial_dir(self, uuid: str, backup_id: str) -> Path:
        return self.domain_dir(uuid) / f"{backup_id}.partial"

    def domain_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def create_partial(self, uuid: str, backup_id: str) -> Path:
        # 0700 whatever the umask, folders above backup_root included; a
        # link planted on the way is refused, not followed.
        partial = self.partial_dir(uuid, backup_id)
        host_folders.make_folder(partial, exist_ok=False)
        return partial

    def discard(self, uuid: str, backup_id: str) -> None:
        shutil.rmtree(self.partial_dir(uuid, backup_id), ignore_errors=True)

    def commit(
        self,
        manifest: Manifest,
        texts: Mapping[str, str],
        pieces: Mapping[str, bytes],
        step: StepHook | None = None,
    ) -> Path:
        """Write the metadata files, fsync everything, rename into place:
        the rename is the commit (a crash before it leaves a ``.partial``
        folder, after it a complete backup)."""
        hook = step or _no_step
        uuid = manifest.domain_uuid
        partial = self.partial_dir(uuid, manifest.id)
        for d in manifest.disks:
            if d.pieces is not None:
                _write_synced(partial / d.pieces, pieces[d.disk])
        files = {**texts, MANIFEST: _json_text(manifest.to_json())}
        for name, text in files.items():
            _write_synced(partial / name, text.encode())
        for d in manifest.disks:
            path = partial / d.path
            host_folders.set_owner(path, mode=0o600)
            fsync_path(path)
        fsync_path(partial)
        hook("metadata written")
        final = self.final_dir(uuid, manifest.id)
        partial.rename(final)
        fsync_path(final.parent)
        hook("renamed")
        return final

    def stale_partials(self) -> list[Path]:
        """Leftovers of backups that crashed before their rename."""
        if not self.root.is_dir():
            return []
        return sorted(self.root.glob("*/*.partial"))

    # --- backups ---

    def backups(
        self, uuid: str, problems: list[str] | None = None, *, hidden: bool = False
    ) -> list[StoredBackup]:
        """The committed backups of one domain, oldest first (ids sort by
        time). Those an unfinished prune is removing are left out unless
        `hidden`. An unreadable manifest raises, or, given `problems`, is
        reported there and skipped."""
        domain_dir = self.domain_dir(uuid)
        if not domain_dir.is_dir():
            return []
        gone = set() if hidden else self.being_removed(uuid)
        out = []
        for folder in sorted(domain_dir.iterdir()):
            if not _is_backup_folder(folder) or folder.name in gone:
                continue
            try:
                out.append(StoredBackup(folder, read_manifest(folder)))
            except VirtBackupError as exc:
                if problems is None:
                    raise
                problems.append(str(exc))
        return out

    def backup(self, uuid: str, backup_id: str) -> StoredBackup:
        folder = self.final_dir(uuid, backup_id)
        return StoredBackup(folder, read_manifest(folder))

    def chain(self, folder: Path) -> list[StoredBackup]:
        """The backup in `folder` and every backup it restores through,
        newest first (its parent, the parent's parent, ... the standalone)."""
        out = [StoredBackup(folder, read_manifest(folder))]
        while (parent := out[-1].manifest.parent) is not None:
            if any(b.manifest.id == parent for b in out):
                raise RepositoryFormatError(folder / MANIFEST, f"the chain loops at {parent}")
            out.append(StoredBackup(folder.parent / parent, read_manifest(folder.parent / parent)))
        return out

    def count_backup_folders(self) -> int:
        """Committed backup folders, without reading them: a cheap check
        that a repository is not empty."""
        if not self.root.is_dir():
            return 0
        return sum(1 for _ in self.root.glob(f"*/*/{MANIFEST}"))

    # --- the prune journal ---

    def journal(self, uuid: str) -> PruneJournal | None:
        """The domain's unfinished prune, if any. One that cannot be read
        is refused (RepositoryFormatError saying what to do): the domain's
        prunes wait on it; everything else goes on."""
        path = self.domain_dir(uuid) / PRUNE_JOURNAL
        try:
            data = _read_json(path, missing_ok=True)
            return None if data is None else PruneJournal.from_json(data, path)
        except RepositoryFormatError as exc:
            raise RepositoryFormatError(
                exc.path,
                f"{exc.problem}; prune journal refused, nothing of it is done: {REFUSED_ADVICE} "
                "(this domain's prune, verify and restore wait until then)",
            ) from exc

    def write_journal(self, uuid: str, journal: PruneJournal) -> None:
        _replace_synced(self.domain_dir(uuid) / PRUNE_JOURNAL, _json_text(journal.to_json()))

    def drop_journal(self, uuid: str) -> None:
        (self.domain_dir(uuid) / PRUNE_JOURNAL).unlink(missing_ok=True)
        fsync_path(self.domain_dir(uuid))

    def being_removed(self, uuid: str) -> frozenset[str]:
        """Backups an unfinished prune is taking out: no longer restore points."""
        journal = self.journal(uuid)
        return journal.removing if journal is not None else frozenset()

    # --- undo logs ---

    def write_undo(self, log: UndoLog) -> None:
        folder = self.domain_dir(log.domain_uuid) / UNDO_DIR
        if not folder.is_dir():
            host_folders.make_folder(folder)
            fsync_path(folder.parent)
        _replace_synced(folder / f"{log.backup_id}.json", _json_text(log.to_json()))

    def undo_logs(self, uuid: str) -> list[UndoLog]:
        folder = self.domain_dir(uuid) / UNDO_DIR
        out = []
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                data = _read_json(path, missing_ok=True)
                if data is not None:
                    out.append(UndoLog.from_json(data, path))
            except RepositoryFormatError as exc:
                # Never acted on (its steps delete folders as root), never
                # in the way of anything else: named, and left for a human.
                log.error(
                    "undo log refused; nothing of it is taken back",
                    error=f"{exc}; {REFUSED_ADVICE} (with what it names, if its backup ran)",
                )
        return out

    def drop_undo(self, uuid: str, backup_id: str) -> None:
        path = self.domain_dir(uuid) / UNDO_DIR / f"{backup_id}.json"
        if path.exists():
            path.unlink()
            fsync_path(path.parent)

    # --- holds ---

    def add_hold(self, hold: Hold) -> None:
        folder = self.domain_dir(hold.domain_uuid) / HOLDS_DIR
        host_folders.make_folder(folder)
        _replace_synced(folder / f"{hold.id}.json", _json_text(hold.to_json()))

    def holds(self, uuid: str | None = None) -> list[Hold]:
        """The holds of one domain, or of every domain in the repository."""
        dirs = [self.domain_dir(uuid)] if uuid is not None else self.domain_dirs()
        out = []
        for d in dirs:
            folder = d / HOLDS_DIR
            for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
                try:
                    data = _read_json(path, missing_ok=True)
                    if data is not None:
                        out.append(Hold.from_json(data, path))
                except RepositoryFormatError as exc:
                    log.error("hold refused; nothing of it is acted on", error=str(exc))
        return out

    def drop_hold(self, hold: Hold) -> None:
        path = self.domain_dir(hold.domain_uuid) / HOLDS_DIR / f"{hold.id}.json"
        if path.exists():
            path.unlink()
            fsync_path(path.parent)

    def held(self, uuid: str) -> dict[str, list[Hold]]:
        """Backup id -> the holds on it, for every backup of `uuid` that a
        hold reads: the held backups and every backup their chains go
        through (an overlay reads its parents)."""
        out: dict[str, list[Hold]] = {}
        holds = self.holds(uuid)
        if not holds:
            return out
        parent = {b.manifest.id: b.manifest.parent for b in self.backups(uuid)}
        for h in holds:
            at: str | None = h.backup_id
            while at is not None and at in parent:
                out.setdefault(at, []).append(h)
                at = parent[at]
        return out

    # --- failed attempts ---

    def record_attempt(self, attempt: FailedAttempt) -> None:
        folder = self.domain_dir(attempt.domain_uuid) / ATTEMPTS_DIR
        host_folders.make_folder(folder)
        _replace_synced(folder / f"{attempt.backup_id}.json", _json_text(attempt.to_json()))
        for old in sorted(folder.glob("*.json"))[:-KEPT_ATTEMPTS]:
            old.unlink(missing_ok=True)

    def attempts(self, uuid: str, problems: list[str] | None = None) -> list[FailedAttempt]:
        folder = self.domain_dir(uuid) / ATTEMPTS_DIR
        out = []
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                data = _read_json(path, missing_ok=True)
                if data is not None:
                    out.append(FailedAttempt.from_json(data, path))
            except VirtBackupError as exc:
                if problems is None:
                    raise
                problems.append(str(exc))
        return out


def _no_step(_: str) -> None:
    pass


def _is_backup_folder(folder: Path) -> bool:
    return folder.is_dir() and not folder.name.endswith(".partial") and folder.name[0] != "."


def read_manifest(folder: Path, lazy_ranges: bool = False) -> Manifest:
    """`lazy_ranges`: for a listing; the disks' range lists (100 000
    entries in a fragmented backup) are neither decoded nor checked until
    something reads them."""
    path = folder / MANIFEST
    cuts: list[str] | None = [] if lazy_ranges else None
    data = _read_json(path, cuts=cuts)
    manifest = Manifest.from_json(data, path, cuts)
    # A manifest copied into another backup's folder would make that
    # backup another; its id must name the folder it is in.
    names = (manifest.id, f"{manifest.id}.partial", f".{manifest.id}.removing")
    if folder.name not in names:
        raise RepositoryFormatError(
            path, f"field id: {manifest.id!r} is not the name of its folder {folder.name!r}"
        )
    return manifest


def write_manifest(folder: Path, manifest: Manifest, pieces: Mapping[str, bytes]) -> None:
    """Replace a backup's manifest (merges rewrite it) and, first, the
    piece files it names: each atomically. A crash in between leaves the
    old manifest naming a piece file that no longer matches its digest, so
    the new piece files get new names (``<disk>.<n>.pieces``) and the old
    ones are removed only after the new manifest is in place."""
    old = read_manifest(folder) if (folder / MANIFEST).exists() else None
    for d in manifest.disks:
        if d.pieces is not None and d.disk in pieces:
            _write_synced(folder / d.pieces, pieces[d.disk])
    fsync_path(folder)
    _replace_synced(folder / MANIFEST, _json_text(manifest.to_json()))
    if old is not None:
        keep = {d.pieces for d in manifest.disks}
        for d in old.disks:
            if d.pieces is not None and d.pieces not in keep:
                (folder / d.pieces).unlink(missing_ok=True)


def next_pieces_name(disk: DiskRecord) -> str:
    """A fresh name for a rewritten piece file (see write_manifest)."""
    stem = disk.disk
    current = disk.pieces or pieces_file(stem)
    middle = current[len(stem) + 1 : -len(".pieces")]
    n = int(middle) + 1 if middle.isdigit() else 1
    return f"{stem}.{n}.pieces"


def with_pieces(manifest: Manifest, disk: str, record: DiskRecord) -> Manifest:
    return replace(manifest, disks=tuple(record if d.disk == disk else d for d in manifest.disks))


# --- files -------------------------------------------------------------------------------


#: The largest JSON document of a repository we read: a manifest of a very
#: fragmented large disk is a few MiB.
MAX_JSON_BYTES = 64 * 1024 * 1024


# Where a manifest's range list starts, where the list of lists ends, and
# the characters one of ours is made of ([[offset, length, "kind"], ...]).
# Plain searches and one character class: a regex over the list's items
# would keep state for each of 100 000 of them.
_RANGES_KEY = re.compile(r'"ranges"\s*:\s*\[')
_LISTS_END = re.compile(r"\]\s*\]")
_RANGE_CHARS = re.compile(r'[\[\]0-9\s,"a-z-]*')


def _cut_ranges(text: str, cuts: list[str]) -> str:
    """`text` with each range list of ours replaced by its number in
    `cuts` (which gets the list's text): what a listing decodes is small.
    Only a balanced run of brackets, numbers and plain words is cut (no
    brace, no escape: nothing else can hide in it); anything else stays
    in place and is decoded as ever."""
    out: list[str] = []
    pos = 0
    for key in _RANGES_KEY.finditer(text):
        start = key.end() - 1
        if start < pos:
            continue
        end = _LISTS_END.search(text, start)
        if end is None:
            break
        segment = text[start : end.end()]
        if segment.count("[") != segment.count("]") or not _RANGE_CHARS.fullmatch(segment):
            continue
        out += [text[pos:start], str(len(cuts))]
        cuts.append(segment)
        pos = end.end()
    out.append(text[pos:])
    return "".join(out)


def _read_json(path: Path, missing_ok: bool = False, cuts: list[str] | None = None) -> object:
    """A repository's JSON file, as untrusted input: a regular file (a
    FIFO or /dev/zero would block or never end), not through a symlink,
    bounded in size and in nesting. `cuts`: take the range lists out
    (_cut_ranges)."""
    if not path.exists() and not path.is_symlink():
        if missing_ok:
            return None
        raise RepositoryFormatError(path, "missing")
    text = _decode(path, _read_bounded(path, MAX_JSON_BYTES))
    if cuts is not None:
        text = _cut_ranges(text, cuts)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise RepositoryFormatError(path, f"not valid JSON ({str(exc)[:120]})") from exc
    except RecursionError:
        raise RepositoryFormatError(path, "nested too deeply to be ours") from None


def _json_text(data: object) -> str:
    return json.dumps(data, indent=2) + "\n"


def _write_synced(path: Path, data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_synced(path: Path, text: str) -> None:
    """Write `text` beside `path`, fsync it, rename it over `path`, fsync
    the folder: readers see the old file or the new one, never a mix."""
    tmp = path.with_name(f"{path.name}.tmp")
    _write_synced(tmp, text)
    tmp.rename(path)
    fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: so that renames in it are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Fields:
    """Typed access to one JSON object of a repository file; every error
    names the file and the field."""

    def __init__(self, data: object, path: Path, where: str) -> None:
        self.path = path
        self.where = where
        if not isinstance(data, dict):
            raise RepositoryFormatError(path, f"{where or 'the document'} is not an object")
        self.data: dict[str, object] = data

    def error(self, key: str, problem: str) -> RepositoryFormatError:
        return RepositoryFormatError(self.path, f"field {self.where}{key}: {problem}")

    def names(self) -> list[str]:
        return list(self.data)

    def _get(self, key: str, kind: type[_T], default: _T | None = None) -> _T:
        if key not in self.data:
            if default is not None:
                return default
            raise self.error(key, "missing")
        value = self.data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(key, f"{value!r} is not a {kind.__name__}")
        return value

    def text(self, key: str, default: str | None = None) -> str:
        return self._get(key, str, default)

    def opt_text(self, key: str) -> str | None:
        if self.data.get(key) is None:
            return None
        return self.text(key)

    def bounded_text(self, key: str, limit: int) -> str:
        value = self.text(key)
        if len(value) > limit:
            raise self.error(key, f"{len(value)} characters, more than {limit}")
        return value

    def line(self, key: str, limit: int) -> str:
        """A name shown on one line of a listing or log: not empty, no
        control characters (a newline would forge the next line)."""
        value = self.bounded_text(key, limit)
        if not value or any(is_unsafe_char(c) for c in value):
            raise self.error(
                key,
                f"'{escaped(value[:40])}' is not a name (empty, or control or format characters)",
            )
        return value

    def integer(self, key: str, default: int | None = None, minimum: int | None = None) -> int:
        value = self._get(key, int, default)
        if minimum is not None and value < minimum:
            raise self.error(key, f"{value} is below {minimum}")
        if value >= 1 << 62:  # no disk is that large; SQLite's integers end at 2**63
            raise self.error(key, f"{value} is too large")
        return value

    def backup_id(self, key: str) -> str:
        value = self.text(key)
        if not is_backup_id(value):
            raise self.error(
                key, f"{value[:40]!r} is not a backup id (such as 20261123T201500.123Z-3f2a)"
            )
        return value

    def opt_backup_id(self, key: str) -> str | None:
        return None if self.data.get(key) is None else self.backup_id(key)

    def backup_ids(self, key: str) -> list[str]:
        values = self.texts(key)
        for v in values:
            if not is_backup_id(v):
                raise self.error(key, f"{v[:40]!r} is not a backup id")
        return values

    def plain_name(self, key: str) -> str:
        value = self.text(key)
        if not is_plain_name(value):
            raise self.error(
                key, f"{value[:60]!r} is not a plain file name inside the backup's folder"
            )
        return value

    def uuid(self, key: str) -> str:
        value = self.text(key)
        try:
            return str(uuidlib.UUID(value))
        except ValueError:
            raise self.error(key, f"{value[:40]!r} is not a UUID") from None

    def grid(self, key: str) -> int:
        value = self.integer(key)
        if value < 4096 or value & (value - 1):
            raise self.error(key, f"{value} is not a power of two of at least 4096")
        return value

    def opt_bool(self, key: str) -> bool | None:
        if self.data.get(key) is None:
            return None
        return self._get(key, bool)

    def opt_integer(self, key: str) -> int | None:
        if self.data.get(key) is None:
            return None
        return self.integer(key)

    def time(self, key: str) -> datetime:
        try:
            return datetime.fromisoformat(self.text(key))
        except ValueError as exc:
            raise self.error(key, str(exc)) from exc

    def enum(self, key: str, kind: type[_E]) -> _E:
        value = self.text(key)
        try:
            return kind(value)
        except ValueError:
            allowed = ", ".join(repr(str(m.value)) for m in kind)
            raise self.error(key, f"{value!r} is not one of {allowed}") from None

    def sub(self, key: str, default: dict[str, object] | None = None) -> _Fields:
        return _Fields(self._get(key, dict, default), self.path, f"{self.where}{key}.")

    def items(self, key: str, default: list[object] | None = None) -> Iterator[_Fields]:
        for i, item in enumerate(self._get(key, list, default)):
            yield _Fields(item, self.path, f"{self.where}{key}[{i}].")

    def texts(self, key: str) -> list[str]:
        values = self._get(key, list, [])
        if not all(isinstance(v, str) for v in values):
            raise self.error(key, "is not a list of strings")
        return [str(v) for v in values]

    def ranges(self, key: str) -> tuple[Range, ...]:
        try:
            return tuple(extents.ranges_from_json(self._get(key, list)))
        except (ValueError, TypeError) as exc:
            raise self.error(key, f"bad range list ({exc})") from exc
