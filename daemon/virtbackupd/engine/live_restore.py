"""Live restore: a new domain runs from a backup at once, and its disks
move out of the repository while it runs.

Each disk of the new domain is a fresh qcow2 image in the operator's
folder whose backing file is the backup's own image in the repository
(and, through it, the backup's chain). The domain starts on those
overlays in the time libvirt takes to start any domain; guest writes land
in the overlays. QEMU's block stream (libvirt's block pull) then copies
every byte the overlay does not hold yet from the chain into it, while
the guest runs; when it ends, QEMU drops the backing file and the image
stands alone.

While a disk still reads the chain, the backup is *held* (a hold file in
the repository, adapters.repository.Hold): prune and chain merges leave
every file of the chain untouched. Whoever settles the holds (the daemon
every few seconds, `status` and `prune` before they report or act) starts
the pull again when it is not running (after the domain or the host
restarted: the overlay keeps what was moved, so a new pull only copies
the rest) and releases the hold once every disk stands alone.

QEMU runs as an unprivileged user (libvirt-qemu) and must read the chain:
the repository folders on the way are opened for traversal (o+x, never
listing) for the time of the move, and libvirt gives the images to QEMU's
user, as it does with any backing file. Both are taken back when the hold
is released.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import structlog

from virtbackupd.adapters import qemu_img
from virtbackupd.adapters.libvirt_conn import DomainRef, Libvirt
from virtbackupd.adapters.repository import (
    Hold,
    HoldKind,
    Repository,
    disk_file,
)
from virtbackupd.core.restored_domain import RestoredImage
from virtbackupd.engine.define import Defined, SavedDefinition, define_on_images
from virtbackupd.engine.restore import running_user
from virtbackupd.errors import DomainNotFoundError, RestoreError, VirtBackupError

log = structlog.get_logger("virtbackupd.live_restore")


@dataclass(frozen=True)
class DiskMove:
    disk: str
    image: Path
    moved: bool
    done: int = 0  # bytes, while the pull runs
    total: int = 0


@dataclass(frozen=True)
class MoveState:
    hold: Hold
    domain: str  # the new domain's name ("?" once it is gone)
    state: str  # moving | waiting | finished | gone
    disks: tuple[DiskMove, ...]

    def as_json(self) -> dict[str, object]:
        return {
            "domain": self.domain,
            "uuid": self.hold.new_domain,
            "from_domain": self.hold.domain_uuid,
            "backup": self.hold.backup_id,
            "directory": self.hold.directory,
            "state": self.state,
            "disks": [
                {"disk": d.disk, "moved": d.moved, "done": d.done, "total": d.total}
                for d in self.disks
            ],
        }


def image_of(hold: Hold, disk: str) -> Path:
    assert hold.directory is not None
    return Path(hold.directory) / disk_file(disk)


async def start_live_restore(
    lv: Libvirt,
    repo: Repository,
    folder: Path,
    disks: Sequence[str],
    to: Path,
    name: str,
    saved: SavedDefinition,
    *,
    rate: int = 0,
    force: bool = False,
) -> tuple[Defined, Hold]:
    """Create the overlays in `to`, define `name` on them, start it and the
    move. The caller holds the domain's lock and has checked the chain.
    On failure everything made here is taken back."""
    to.mkdir(parents=True, exist_ok=True, mode=0o711)
    images = {d: to / disk_file(d) for d in disks}
    existing = [str(p) for p in images.values() if p.exists()]
    if existing and not force:
        raise RestoreError(f"{', '.join(existing)} exists; give --force to replace it")
    await _refuse_running_users(lv, name, set(images.values()))
    domain_uuid = folder.parent.name
    backup_id = folder.name
    made: list[Path] = []
    opened: list[Path] = []
    ref: DomainRef | None = None
    try:
        for disk, image in images.items():
            partial = image.with_name(f".{image.name}.partial")
            await qemu_img.create(partial, backing=str(folder / disk_file(disk)))
            made.append(partial)
            partial.rename(image)
            made[-1] = image
        opened = _open_for_qemu(repo, folder)
        defined = await define_on_images(
            lv, saved, name, {d: RestoredImage(p, "qcow2") for d, p in images.items()}, force
        )
        ref = defined.ref
        hold = Hold(
            id=f"live-{secrets.token_hex(6)}",
            kind=HoldKind.LIVE_RESTORE,
            domain_uuid=domain_uuid,
            backup_id=backup_id,
            created=datetime.now(UTC),
            detail=f"live restore of domain {name} into {to}",
            new_domain=ref.uuid,
            disks=tuple(disks),
            directory=str(to),
            rate=rate,
            opened=tuple(str(p) for p in opened),
        )
        repo.add_hold(hold)
        try:
            await lv.start(ref)
            for disk in disks:
                await lv.block_pull(ref, disk, rate)
        except BaseException:
            repo.drop_hold(hold)
            raise
    except BaseException:
        with contextlib.suppress(VirtBackupError):
            if ref is not None:
                await lv.destroy(ref)
                await lv.undefine(ref)
        for p in made:
            p.unlink(missing_ok=True)
        _close(repo, opened, [])
        raise
    log.info(
        "live restore started", domain=name, uuid=ref.uuid, backup=backup_id, disks=list(disks)
    )
    return defined, hold


async def _refuse_running_users(lv: Libvirt, name: str, images: set[Path]) -> None:
    """Before any file is made: a running domain NAME, or one running on an
    image this restore would replace, is refused (--force replaces only
    what nothing runs on)."""
    if await lv.exists(name) and await lv.is_running(await lv.domain(name)):
        raise RestoreError(f"domain {name!r} is running; shut it off to replace it")
    user = await running_user(lv, images)
    if user is not None:
        raise RestoreError(f"{user[1]} is a disk of running domain {user[0]}")


async def settle(lv: Libvirt, repo: Repository) -> list[MoveState]:
    """Look at every live restore of the repository: resume a pull that is
    not running, release the holds whose domain stands alone (or is gone)."""
    out = []
    for hold in repo.holds():
        if hold.kind is HoldKind.LIVE_RESTORE:
            out.append(await _settle_one(lv, repo, hold))
    return out


async def _settle_one(lv: Libvirt, repo: Repository, hold: Hold) -> MoveState:
    assert hold.new_domain is not None
    try:
        ref = await lv.domain(hold.new_domain)
    except DomainNotFoundError:
        log.warning(
            "live restore: its domain is gone; hold released",
            uuid=hold.new_domain,
            backup=hold.backup_id,
        )
        release(repo, hold)
        return MoveState(hold, "?", "gone", ())
    running = await lv.is_running(ref)
    moves = []
    for disk in hold.disks:
        image = image_of(hold, disk)
        info = await qemu_img.info(image)
        if info.backing_filename is None:
            moves.append(DiskMove(disk, image, True))
            continue
        job = await lv.block_job(ref, disk) if running else None
        if job is None and running:
            log.info("live restore: pull (re)started", domain=ref.name, disk=disk)
            await lv.block_pull(ref, disk, hold.rate)
            job = await lv.block_job(ref, disk)
        done, total = job if job is not None else (0, 0)
        moves.append(DiskMove(disk, image, False, done, total))
    if all(m.moved for m in moves):
        log.info("live restore finished: its disks stand alone", domain=ref.name)
        release(repo, hold)
        return MoveState(hold, ref.name, "finished", tuple(moves))
    return MoveState(hold, ref.name, "moving" if running else "waiting", tuple(moves))


def release(repo: Repository, hold: Hold) -> None:
    # As stored now: another release may have handed folders to it.
    hold = next((h for h in repo.holds(hold.domain_uuid) if h.id == hold.id), hold)
    folder = repo.final_dir(hold.domain_uuid, hold.backup_id)
    chain = [b.folder for b in repo.chain(folder)] if folder.is_dir() else []
    repo.drop_hold(hold)
    _close(repo, [Path(p) for p in hold.opened], chain)


# --- letting QEMU's user read the chain ------------------------------------------------


def _chain_dirs(repo: Repository, folder: Path) -> list[Path]:
    """The folders QEMU passes through to read `folder`'s chain, outermost
    first."""
    chain = repo.chain(folder)
    dirs = [repo.root, folder.parent]
    return [*dirs, *(b.folder for b in chain)]


def _open_for_qemu(repo: Repository, folder: Path) -> list[Path]:
    for above in reversed(repo.root.absolute().parents):
        if stat.S_IMODE(above.stat().st_mode) & 0o001 == 0:
            raise RestoreError(
                f"QEMU runs as an unprivileged user and must reach the backup's images, but "
                f"{above} (above the repository {repo.root}) is closed to other users "
                f"(mode {stat.S_IMODE(above.stat().st_mode):04o}); allow traversal "
                f"(chmod o+x {above}) or restore without --live"
            )
    opened = []
    for d in _chain_dirs(repo, folder):
        mode = stat.S_IMODE(d.stat().st_mode)
        if mode & 0o011 != 0o011:
            d.chmod(mode | 0o011)
            opened.append(d)
    return opened


def _close(repo: Repository, opened: Sequence[Path], chain: Sequence[Path]) -> None:
    """Take back what `_open_for_qemu` opened and give the chain's images
    (`chain`: backup folders) back to root, except what another live
    restore still needs: a folder it needs is handed to its hold (so that
    the last one to finish closes it)."""
    still: set[Path] = set()
    for h in repo.holds():
        if h.kind is not HoldKind.LIVE_RESTORE:
            continue
        folder = repo.final_dir(h.domain_uuid, h.backup_id)
        needs = set(_chain_dirs(repo, folder)) if folder.is_dir() else set()
        needs.update(Path(p) for p in h.opened)
        taken = [d for d in opened if d in needs and str(d) not in h.opened]
        if taken:
            repo.add_hold(replace(h, opened=(*h.opened, *map(str, taken))))
            opened = [d for d in opened if d not in taken]
        still.update(needs)
    for d in reversed(opened):
        if d not in still and d.is_dir():
            d.chmod(stat.S_IMODE(d.stat().st_mode) & ~0o011)
    for folder in chain:
        if folder in still:
            continue
        for image in folder.glob("*.qcow2"):  # libvirt gave them to QEMU's user
            with contextlib.suppress(OSError):
                os.chown(image, 0, 0)
                image.chmod(0o600)
