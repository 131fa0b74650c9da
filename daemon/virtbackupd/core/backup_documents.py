"""From a backup plan to the two documents libvirt's backupBegin takes.

Which disks take part, and why the others do not, is decided here (pure);
every exclusion carries a reason the operator will read in the plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from virtbackupd.core.backup_xml import (
    Backup,
    BackupDisk,
    BackupMode,
    DiskBackupMode,
    Server,
    Store,
    StoreType,
    Transport,
)
from virtbackupd.core.checkpoint_xml import (
    Checkpoint,
    CheckpointDisk,
    CheckpointDiskMode,
    check_checkpoint_name,
)
from virtbackupd.core.domain_xml import DomainDisk
from virtbackupd.errors import PlanError

#: Every checkpoint the project creates starts with this, and the project
#: never deletes or redefines a checkpoint without it.
CHECKPOINT_PREFIX = "virtbackupd-"


def is_own_checkpoint(name: str) -> bool:
    return name.startswith(CHECKPOINT_PREFIX)


def checkpoint_name(stamp: str) -> str:
    """``virtbackupd-<stamp>``; `stamp` is usually a backup id such as
    ``20261123T194600Z-3f2a``."""
    return check_checkpoint_name(CHECKPOINT_PREFIX + stamp, "checkpoint name")


class RawDisks(StrEnum):
    SKIP = "skip"
    FULL = "full"


@dataclass(frozen=True)
class DiskChoice:
    """What happens to one domain disk in this backup, and why."""

    target: str
    included: bool
    reason: str
    backupmode: DiskBackupMode | None = None  # for included disks
    checkpoint: bool = False  # whether the new checkpoint tracks it (bitmap)
    removable: bool = False  # cdrom/floppy: never a disk "left out"
    by_policy: bool = False  # the policy chose this fate (exclude, include, raw): no surprise


@dataclass(frozen=True)
class BackupRequest:
    """The plan's decisions that shape the XML."""

    checkpoint: str  # name of the checkpoint to create
    incremental_from: str | None  # parent checkpoint, None for a full backup
    socket_path: str  # the NBD server's Unix socket
    scratch_dir: str
    include: frozenset[str] = frozenset()  # empty: every eligible disk
    exclude: frozenset[str] = frozenset()
    raw: RawDisks = RawDisks.FULL


@dataclass(frozen=True)
class BackupDocuments:
    backup: Backup
    checkpoint: Checkpoint
    choices: tuple[DiskChoice, ...]

    @property
    def included(self) -> tuple[DiskChoice, ...]:
        return tuple(c for c in self.choices if c.included)

    def scratch_path(self, target: str) -> str:
        """The scratch file the backup XML names for an included disk."""
        for d in self.backup.disks:
            if d.name == target and d.store is not None:
                return d.store.path
        raise KeyError(target)


def _ineligible(disk: DomainDisk) -> str | None:
    """Why a disk cannot take part in any backup, or None."""
    if disk.device != "disk":
        return f"device is a {disk.device}"
    if disk.source is None:
        return "no medium/source"
    if disk.source_type not in ("file", "block"):
        return f"{disk.source_type} disks are not supported"
    if disk.readonly:
        return "read-only disk"
    if disk.shareable:
        return "shareable disk (another guest may write it)"
    return None


def choose_disks(disks: Sequence[DomainDisk], request: BackupRequest) -> tuple[DiskChoice, ...]:
    """Decide per disk: incremental/full with a checkpoint bitmap (qcow2),
    full without one (raw, when asked), or excluded with the reason."""
    # An include names a disk the operator wants: its absence is an error.
    # An exclude of a disk this domain does not have excludes nothing (one
    # policy serves VMs with different disks), so it is not.
    unknown = request.include - {d.target for d in disks}
    if unknown:
        raise PlanError(
            f"disks.include names disks the domain does not have: {', '.join(sorted(unknown))}"
        )
    choices = []
    for d in disks:
        why_not = _ineligible(d)
        chosen = why_not is None  # left out below by the policy's own lists
        if why_not is None and d.target in request.exclude:
            why_not = "excluded by policy"
        if why_not is None and request.include and d.target not in request.include:
            why_not = "not in the policy's include list"
        if why_not is not None:
            removable = d.device in ("cdrom", "floppy")
            choices.append(
                DiskChoice(d.target, False, why_not, removable=removable, by_policy=chosen)
            )
        elif d.driver_type == "qcow2":
            mode = DiskBackupMode.INCREMENTAL if request.incremental_from else DiskBackupMode.FULL
            why = (
                f"qcow2: changes since {request.incremental_from}"
                if request.incremental_from
                else "qcow2: full"
            )
            choices.append(DiskChoice(d.target, True, why, mode, checkpoint=True))
        elif d.driver_type == "raw" and request.raw is RawDisks.FULL:
            # Only an image file can become qcow2; a block device (an LVM
            # volume, a LUN) stays raw.
            advice = (
                "; convert it to qcow2 for incremental backups" if d.source_type == "file" else ""
            )
            choices.append(
                DiskChoice(
                    d.target,
                    True,
                    f"raw: copied in full every time (no bitmap possible{advice})",
                    DiskBackupMode.FULL,
                    by_policy=True,
                )
            )
        elif d.driver_type == "raw":
            choices.append(
                DiskChoice(
                    d.target, False, "raw disk: no bitmap possible (raw: skip)", by_policy=True
                )
            )
        else:
            choices.append(DiskChoice(d.target, False, f"format {d.driver_type} is not supported"))
    return tuple(choices)


def build_documents(disks: Sequence[DomainDisk], request: BackupRequest) -> BackupDocuments:
    """The pull-mode `<domainbackup>` and the new `<domaincheckpoint>`.

    Every domain disk is listed in both, with its fate said explicitly, so
    libvirt applies no defaults of its own.
    """
    check_checkpoint_name(request.checkpoint, "checkpoint name")
    if request.incremental_from is not None:
        check_checkpoint_name(request.incremental_from, "parent checkpoint name")
    choices = choose_disks(disks, request)
    by_target = {d.target: d for d in disks}
    if not any(c.included for c in choices):
        reasons = "; ".join(f"{c.target}: {c.reason}" for c in choices) or "the domain has no disks"
        raise PlanError(f"no disk can be backed up ({reasons})")
    bdisks = []
    cdisks = []
    for c in choices:
        if not c.included:
            bdisks.append(BackupDisk(name=c.target, backup=False))
            cdisks.append(CheckpointDisk(name=c.target, checkpoint=CheckpointDiskMode.NO))
            continue
        dd = by_target[c.target]
        incremental = c.backupmode is DiskBackupMode.INCREMENTAL
        bdisks.append(
            BackupDisk(
                name=c.target,
                backup=True,
                type=StoreType.FILE,
                backupmode=c.backupmode,
                incremental=request.incremental_from if incremental else None,
                exportname=c.target,
                exportbitmap=f"backup-{c.target}" if incremental else None,
                driver_type="qcow2",
                store=Store(path=f"{request.scratch_dir}/{request.checkpoint}.{dd.target}.scratch"),
            )
        )
        cdisks.append(
            CheckpointDisk(
                name=c.target,
                checkpoint=CheckpointDiskMode.BITMAP if c.checkpoint else CheckpointDiskMode.NO,
            )
        )
    backup = Backup(
        mode=BackupMode.PULL,
        incremental=request.incremental_from,
        server=Server(transport=Transport.UNIX, socket=request.socket_path),
        disks=tuple(bdisks),
    )
    checkpoint = Checkpoint(name=request.checkpoint, disks=tuple(cdisks))
    return BackupDocuments(backup=backup, checkpoint=checkpoint, choices=choices)
