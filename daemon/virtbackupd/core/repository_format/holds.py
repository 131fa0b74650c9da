"""Holds: backups something outside the repository still reads (a live
restore, a mount), which prune and chain merges must leave untouched."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path

from virtbackupd.core.repository_format.codec import Fields, RepositoryFormatError
from virtbackupd.core.repository_format.versions import HOLD_FORMAT, RECORD_VERSION


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
            "format_version": RECORD_VERSION,
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
    def from_json(cls, data: object, path: Path, root: Path) -> Hold:
        """`root`: the repository's own folder, the only folders a hold
        may have opened."""
        f = Fields(data, path)
        if f.integer("format_version") > RECORD_VERSION:
            raise RepositoryFormatError(path, "hold format is newer than this version reads")
        # What a hold names is acted on as root when it is released
        # (loop devices detached, a state folder deleted, folders' modes
        # restored): only what ours can name.
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
