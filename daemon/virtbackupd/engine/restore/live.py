"""Live restore: a new domain runs from a backup at once, and its disks
move out of the repository while it runs.

Each disk of the new domain is a fresh qcow2 image in the operator's
folder whose backing file is the backup's own image in the repository
(and, through it, the backup's chain). The domain starts on those
overlays in the time libvirt takes to start any domain; guest writes land
in the overlays. QEMU's block stream (libvirt's block pull) then copies
every byte the overlay does not hold yet from the chain into it, while
the guest runs; when it ends, QEMU drops the backing file and the image
stands alone. The pulls run one at a time (three at once crash QEMU 7.2:
core.live_move), and a disk counts as moved only once its content, read
through QEMU, was checked against the backup's piece hashes
(engine.restore.live_check); the guest's writes since the start are recorded by a
checkpoint made before QEMU first opens the images and are left out.

While a disk still reads the chain, the backup is *held* (a hold file in
the repository, adapters.repository.Hold): prune and chain merges leave
every file of the chain untouched. Whoever settles the holds (the daemon
every few seconds, `status` and `prune` before they report or act) starts
the next pull when none runs (also after the domain or the host
restarted: the overlay keeps what was moved, so a new pull only copies
the rest), checks the disks whose pull ended, notices a crash of the new
domain (reported in `status` and the journal, kept in the hold), and
releases the hold only once every disk was checked
(engine.restore.live_settle).

QEMU runs as an unprivileged user (libvirt-qemu) and must read the chain:
the repository folders on the way are opened for traversal (o+x, never
listing) for the time of the move, and libvirt gives the images to QEMU's
user, as it does with any backing file. Both are taken back when the hold
is released (engine.restore.live_access).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import structlog

from virtbackupd.adapters import host_folders, qemu_img
from virtbackupd.adapters.libvirt_conn import DomainRef, Libvirt
from virtbackupd.adapters.qcow2_reader import check_backing_names
from virtbackupd.adapters.repository import Repository
from virtbackupd.config.daemon import DaemonConfig
from virtbackupd.core.checkpoint_xml import Checkpoint, CheckpointDisk, CheckpointDiskMode
from virtbackupd.core.live_move import GUEST_WRITES_CHECKPOINT
from virtbackupd.core.repository_format.holds import Hold, HoldKind
from virtbackupd.core.repository_format.names import disk_file
from virtbackupd.core.restored_domain import RestoredImage
from virtbackupd.engine.restore.context import running_user
from virtbackupd.engine.restore.define import (
    Defined,
    NewDomain,
    SavedDefinition,
    define_planned,
    plan_definition,
)
from virtbackupd.engine.restore.live_access import close, open_for_qemu, release
from virtbackupd.engine.restore.live_settle import (
    DiskMove,
    MoveState,
    first_pull,
    image_of,
    settle_one,
)
from virtbackupd.errors import RestoreError, VirtBackupError

# What callers of a live restore use, wherever it is defined.
__all__ = [
    "DiskMove",
    "LiveRestore",
    "MoveState",
    "image_of",
    "release",
    "settle",
    "start_live_restore",
]

log = structlog.get_logger("virtbackupd.live_restore")


@dataclass(frozen=True)
class LiveRestore:
    """What a live restore is asked for."""

    folder: Path  # the backup's folder in the repository
    disks: tuple[str, ...]
    to: Path  # the operator's folder: the new domain's images go there
    name: str  # the new domain's
    saved: SavedDefinition
    rate: int = 0  # bytes per second each pull may copy (0: no limit)
    force: bool = False  # replace a domain of that name, images in `to`


async def start_live_restore(
    lv: Libvirt, repo: Repository, req: LiveRestore
) -> tuple[Defined, Hold]:
    """Create the overlays in `req.to`, define `req.name` on them, start it
    and the move. The caller holds the domain's lock and has checked the
    chain. On failure everything made here is taken back."""
    for d in req.disks:
        # Before qemu-img create (and later QEMU) opens what the images name.
        await asyncio.to_thread(check_backing_names, req.folder / disk_file(d))
    # 0711 whatever the umask: QEMU reaches the images.
    host_folders.make_passable(req.to, trusted=False)
    images = {d: req.to / disk_file(d) for d in req.disks}
    existing = [str(p) for p in images.values() if p.exists()]
    if existing and not req.force:
        raise RestoreError(f"{', '.join(existing)} exists; give --force to replace it")
    await _refuse_running_users(lv, req.name, set(images.values()))
    # What can be known before anything is made is refused now.
    wanted = NewDomain(
        req.name, {d: RestoredImage(p, "qcow2") for d, p in images.items()}, req.to, req.force
    )
    planned = await plan_definition(lv, req.saved, wanted)
    made: list[Path] = []
    opened: list[Path] = []
    ref: DomainRef | None = None
    try:
        await _make_overlays(req.folder, images, made)
        opened = open_for_qemu(repo, req.folder)
        defined = await define_planned(lv, req.saved, planned)
        ref = defined.ref
        await _redefine_guest_writes(lv, ref, req.disks)
        hold = await _start_move(lv, repo, req, ref, opened)
    except BaseException:
        with contextlib.suppress(VirtBackupError):
            if ref is not None:
                await lv.destroy(ref)
                await lv.undefine(ref)
        for p in made:
            p.unlink(missing_ok=True)
        close(repo, opened, [])
        raise
    log.info(
        "live restore started",
        domain=req.name,
        uuid=ref.uuid,
        backup_id=req.folder.name,
        disks=list(req.disks),
    )
    return defined, hold


async def _make_overlays(folder: Path, images: Mapping[str, Path], made: list[Path]) -> None:
    """Each disk's new image, backed by the backup's; what is made so far
    is in `made` (for the caller to take back on failure)."""
    for disk, image in images.items():
        partial = image.with_name(f".{image.name}.partial")
        await qemu_img.create(partial, backing=str(folder / disk_file(disk)))
        made.append(partial)
        # Records the guest's writes from QEMU's first open on (core.live_move).
        await qemu_img.bitmap(partial, GUEST_WRITES_CHECKPOINT, add=True)
        partial.rename(image)
        made[-1] = image


async def _start_move(
    lv: Libvirt, repo: Repository, req: LiveRestore, ref: DomainRef, opened: Sequence[Path]
) -> Hold:
    """Hold the backup, start the new domain and its first pull."""
    hold = Hold(
        id=f"live-{secrets.token_hex(6)}",
        kind=HoldKind.LIVE_RESTORE,
        domain_uuid=req.folder.parent.name,
        backup_id=req.folder.name,
        created=datetime.now(UTC),
        detail=f"live restore of domain {req.name} into {req.to}",
        new_domain=ref.uuid,
        disks=tuple(req.disks),
        directory=str(req.to),
        rate=req.rate,
        opened=tuple(str(p) for p in opened),
        checkpoint=GUEST_WRITES_CHECKPOINT,
    )
    repo.add_hold(hold)
    try:
        await lv.start(ref)
        # The first pull only: the others follow one at a time (settle).
        await first_pull(lv, ref, req.disks[0], req.rate)
        # Seen by the settlers: a pull of this run that ends unfinished failed.
        hold = replace(hold, pulling=req.disks[0], pull_run=await lv.run_id(ref))
        repo.add_hold(hold)
    except BaseException:
        repo.drop_hold(hold)
        raise
    return hold


async def _redefine_guest_writes(lv: Libvirt, ref: DomainRef, disks: Sequence[str]) -> None:
    """Tell libvirt about the bitmap in each new image: a checkpoint,
    redefined (libvirt makes none for a domain that does not run), so that
    a pull-mode backup job can export the guest's writes since the start."""
    xml = Checkpoint(
        name=GUEST_WRITES_CHECKPOINT,
        creation_time=int(datetime.now(UTC).timestamp()),
        disks=tuple(
            CheckpointDisk(d, CheckpointDiskMode.BITMAP, bitmap=GUEST_WRITES_CHECKPOINT)
            for d in disks
        ),
        domain_xml=await lv.xml(ref, inactive=True),
    ).to_xml()
    await lv.redefine_checkpoint(ref, xml)


async def _refuse_running_users(lv: Libvirt, name: str, images: set[Path]) -> None:
    """Before any file is made: a running domain NAME, or one running on an
    image this restore would replace, is refused (--force replaces only
    what nothing runs on)."""
    if await lv.exists(name) and await lv.is_running(await lv.domain(name)):
        raise RestoreError(f"domain {name!r} is running; shut it off to replace it")
    user = await running_user(lv, images)
    if user is not None:
        raise RestoreError(f"{user[1]} is a disk of running domain {user[0]}")


async def settle(lv: Libvirt, repo: Repository, config: DaemonConfig) -> list[MoveState]:
    """Look at every live restore of the repository: start the next pull
    when none runs, check the disks whose pull ended, notice a crash,
    release the holds whose disks were all checked (or whose domain is
    gone). Two settlers (the daemon, `status`) take turns per hold."""
    out = []
    for hold in repo.holds():
        if hold.kind is HoldKind.LIVE_RESTORE:
            with _turn(config.runtime_dir, hold) as mine:
                out.append(await settle_one(lv, repo, hold, config, act=mine))
    return out


@contextlib.contextmanager
def _turn(runtime_dir: Path, hold: Hold) -> Iterator[bool]:
    """Whether this settler may act on `hold` (another one may be starting
    a pull or checking right now: it then only reports)."""
    host_folders.make_passable(runtime_dir)
    fd = os.open(
        runtime_dir / f"{hold.id}.lock",
        os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
    )
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
