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
(engine.live_check); the guest's writes since the start are recorded by a
checkpoint made before QEMU first opens the images and are left out.

While a disk still reads the chain, the backup is *held* (a hold file in
the repository, adapters.repository.Hold): prune and chain merges leave
every file of the chain untouched. Whoever settles the holds (the daemon
every few seconds, `status` and `prune` before they report or act) starts
the next pull when none runs (also after the domain or the host
restarted: the overlay keeps what was moved, so a new pull only copies
the rest), checks the disks whose pull ended, notices a crash of the new
domain (reported in `status` and the journal, kept in the hold), and
releases the hold only once every disk was checked.

QEMU runs as an unprivileged user (libvirt-qemu) and must read the chain:
the repository folders on the way are opened for traversal (o+x, never
listing) for the time of the move, and libvirt gives the images to QEMU's
user, as it does with any backing file. Both are taken back when the hold
is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import stat
from collections.abc import Iterator, Sequence
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
from virtbackupd.core.live_move import (
    GUEST_WRITES_CHECKPOINT,
    PULL_ATTEMPTS,
    DiskFacts,
    PullVerdict,
    Step,
    next_step,
    pull_verdict,
)
from virtbackupd.core.repository_format.holds import Hold, HoldKind
from virtbackupd.core.repository_format.names import disk_file
from virtbackupd.core.repository_format.versions import Operation
from virtbackupd.core.restored_domain import RestoredImage
from virtbackupd.engine import live_check
from virtbackupd.engine.define import Defined, SavedDefinition, define_planned, plan_definition
from virtbackupd.engine.restore import running_user
from virtbackupd.errors import (
    DomainNotFoundError,
    LibvirtError,
    RestoreError,
    UntrustedFolderError,
    VirtBackupError,
)

log = structlog.get_logger("virtbackupd.live_restore")


@dataclass(frozen=True)
class DiskMove:
    disk: str
    image: Path
    moved: bool  # pulled AND checked against the backup: only then
    done: int = 0  # bytes, while the pull runs
    total: int = 0
    pulled: bool = False  # the pull ended; the check may still be ahead


@dataclass(frozen=True)
class MoveState:
    hold: Hold
    domain: str  # the new domain's name ("?" once it is gone)
    state: str  # moving | stopped | checking | waiting | crashed | damaged | finished | gone
    disks: tuple[DiskMove, ...]

    def as_json(self) -> dict[str, object]:
        return {
            "domain": self.domain,
            "uuid": self.hold.new_domain,
            "from_domain": self.hold.domain_uuid,
            "backup": self.hold.backup_id,
            "directory": self.hold.directory,
            "state": self.state,
            "trouble": self.hold.trouble,
            "disks": [
                {
                    "disk": d.disk,
                    "moved": d.moved,
                    "pulled": d.pulled,
                    "done": d.done,
                    "total": d.total,
                }
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
    for d in disks:
        # Before qemu-img create (and later QEMU) opens what the images name.
        await asyncio.to_thread(check_backing_names, folder / disk_file(d))
    # 0711 whatever the umask: QEMU reaches the images.
    host_folders.make_passable(to, trusted=False)
    images = {d: to / disk_file(d) for d in disks}
    existing = [str(p) for p in images.values() if p.exists()]
    if existing and not force:
        raise RestoreError(f"{', '.join(existing)} exists; give --force to replace it")
    await _refuse_running_users(lv, name, set(images.values()))
    # What can be known before anything is made is refused now.
    planned = await plan_definition(
        lv, saved, name, {d: RestoredImage(p, "qcow2") for d, p in images.items()}, to, force
    )
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
            # Records the guest's writes from QEMU's first open on (core.live_move).
            await qemu_img.bitmap(partial, GUEST_WRITES_CHECKPOINT, add=True)
            partial.rename(image)
            made[-1] = image
        opened = _open_for_qemu(repo, folder)
        defined = await define_planned(lv, saved, planned)
        ref = defined.ref
        await _redefine_guest_writes(lv, ref, disks)
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
            checkpoint=GUEST_WRITES_CHECKPOINT,
        )
        repo.add_hold(hold)
        try:
            await lv.start(ref)
            # The first pull only: the others follow one at a time (settle).
            await _first_pull(lv, ref, disks[0], rate)
            # Seen by the settlers: a pull of this run that ends unfinished failed.
            hold = replace(hold, pulling=disks[0], pull_run=await lv.run_id(ref))
            repo.add_hold(hold)
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
        "live restore started", domain=name, uuid=ref.uuid, backup_id=backup_id, disks=list(disks)
    )
    return defined, hold


async def _first_pull(lv: Libvirt, ref: DomainRef, disk: str, rate: int) -> None:
    """The hold exists before the domain starts: a daemon's round may see
    it running and start this very pull first, or the restore may start it
    just after the round looked (both seen under load)."""
    try:
        await lv.block_pull(ref, disk, rate)
    except LibvirtError:
        if await lv.block_job(ref, disk) is None:
            raise


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
                out.append(await _settle_one(lv, repo, hold, config, act=mine))
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


async def _settle_one(
    lv: Libvirt, repo: Repository, hold: Hold, config: DaemonConfig, act: bool
) -> MoveState:
    hold = next((h for h in repo.holds(hold.domain_uuid) if h.id == hold.id), hold)
    assert hold.new_domain is not None
    try:
        ref = await lv.domain(hold.new_domain)
    except DomainNotFoundError:
        log.warning(
            "live restore: its domain is gone; hold released",
            uuid=hold.new_domain,
            backup_id=hold.backup_id,
        )
        if act:
            release(repo, hold)
        return MoveState(hold, "?", "gone", ())
    if not await lv.is_running(ref):
        return await _stopped(lv, repo, hold, ref, act)
    backed = await lv.disks_with_backing(ref)
    jobs = {d: await lv.block_job(ref, d) for d in hold.disks}
    facts = [DiskFacts(d, d in hold.verified, d in backed, jobs[d] is not None) for d in hold.disks]
    nxt = next_step(facts)
    run = await lv.run_id(ref)
    state = "moving"
    if nxt.step is Step.PULL:
        disk = nxt.disks[0]
        if act:
            hold = await _pull_ended(lv, repo, hold, ref, disk, run)
        # Counted per disk and QEMU run: a retried pull that then finished
        # leaves `pulling` on its disk, and the next disk starts afresh.
        same = hold.pull_run == run and hold.pulling in (None, disk)
        failures = hold.pull_failures if same else 0
        since = (
            None
            if hold.pull_failed_at is None
            else (datetime.now(UTC) - hold.pull_failed_at).total_seconds()
        )
        verdict = pull_verdict(failures, since)
        if verdict is PullVerdict.STOP:
            state = "stopped"
        elif act and verdict is PullVerdict.PULL:
            log.info("live restore: pull started", domain=ref.name, disk=disk)
            await _first_pull(lv, ref, disk, hold.rate)  # the restore may have just started it
            jobs[disk] = await lv.block_job(ref, disk)
            hold = replace(
                hold,
                pulling=disk,
                pull_run=run,
                pull_failures=failures,
                trouble=_without_pull_trouble(hold),
            )
            repo.add_hold(hold)
    elif act and nxt.step is Step.CHECK and hold.failed_run != run:
        hold = await _check(lv, repo, hold, ref, nxt.disks, config, run)
    if act and set(hold.disks) <= set(hold.verified):
        # QEMU rewrote each image's header when its pull ended, but keeps
        # the new data's qcow2 metadata in memory until a flush: a kill
        # then loses it all (measured: a SIGKILL a second after a finished
        # pull left the image reading as zeroes). Only a flushed disk
        # stands alone; then the backup may go.
        await lv.flush_by_pause(ref)
        await _forget_guest_writes(lv, ref, hold)
        log.info(
            "live restore finished: every disk moved and checked against the backup",
            domain=ref.name,
            backup_id=hold.backup_id,
            disks=list(hold.disks),
        )
        release(repo, hold)
        state = "finished"
    elif nxt.step is Step.CHECK:
        state = "damaged" if hold.failed_run == run else "checking"
    moves = tuple(
        DiskMove(
            d,
            image_of(hold, d),
            d in hold.verified,
            *(jobs[d] or (0, 0)),
            pulled=d not in backed,
        )
        for d in hold.disks
    )
    return MoveState(hold, ref.name, state, moves)


# Less than this free beside the images after a pull ended unfinished: it
# ran out of space (QEMU's ENOSPC; libvirt's block job event carries no
# reason, only that the job failed).
NO_SPACE_BYTES = 1024 * 1024
_PULL_TROUBLE = "the move of "


def _without_pull_trouble(hold: Hold) -> str | None:
    """The hold's trouble, unless it is a stopped pull's (then over)."""
    if hold.trouble is not None and hold.trouble.startswith(_PULL_TROUBLE):
        return None
    return hold.trouble


async def _pull_ended(
    lv: Libvirt, repo: Repository, hold: Hold, ref: DomainRef, disk: str, run: int
) -> Hold:
    """`disk` still reads the backup and no pull runs on it. If the pull
    last started on it in this QEMU run ended so (it failed), count it and
    say why; a pull given up for want of space is resumed once there is
    room for the rest of the disk."""
    image = image_of(hold, disk)
    free = _free_bytes(image.parent)
    if hold.pulling == disk and hold.pull_run == run:
        failures = hold.pull_failures + 1
        no_space = free < NO_SPACE_BYTES
        if no_space:
            failures = PULL_ATTEMPTS  # another attempt would fail the same way
        why = (
            f"No space left on device ({image.parent} has {free} bytes free)"
            if no_space
            else "QEMU's block pull ended before the end (libvirt gives no reason)"
        )
        hold = replace(hold, pulling=None, pull_failures=failures, pull_failed_at=datetime.now(UTC))
        if failures >= PULL_ATTEMPTS:
            todo = [d for d in hold.disks if d not in hold.verified]
            action = (
                f"free space in {image.parent}; the move resumes by itself once there is room "
                "for the rest of the disk, or at the domain's next start"
                if no_space
                else "see the domain's log in /var/log/libvirt/qemu; the move is tried again "
                "at the domain's next start"
            )
            tries = "" if no_space else f" after {failures} attempts"
            trouble = (
                f"{_PULL_TROUBLE}{disk} stopped{tries}: {why}; the domain runs on from the "
                "backup's image and nothing "
                f"is lost (disks {', '.join(todo)} keep the backup held); {action}"
            )
            hold = replace(hold, trouble=trouble)
            log.error(
                "live restore: the move stopped",
                domain=ref.name,
                backup_id=hold.backup_id,
                disk=disk,
                reason=why,
            )
        else:
            log.warning(
                "live restore: a pull ended unfinished; it is tried again",
                domain=ref.name,
                backup_id=hold.backup_id,
                disk=disk,
                reason=why,
                attempt=failures,
            )
        repo.add_hold(hold)
    elif (
        hold.pull_run == run
        and hold.pull_failures >= PULL_ATTEMPTS
        and free >= await _left_to_move(lv, ref, disk, image)
    ):
        log.info("live restore: there is room again; the move resumes", domain=ref.name, disk=disk)
        hold = replace(
            hold, pull_failures=0, pull_failed_at=None, trouble=_without_pull_trouble(hold)
        )
        repo.add_hold(hold)
    return hold


def _free_bytes(folder: Path) -> int:
    """Free bytes for an unprivileged writer in `folder`; a folder that
    cannot be looked at counts as roomy (the pull then says what is wrong)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return 2**63
    return st.f_bavail * st.f_frsize


async def _left_to_move(lv: Libvirt, ref: DomainRef, disk: str, image: Path) -> int:
    """At most what the pull still writes into `image` (the disk's size
    less what the image holds; less still when the backup is sparse)."""
    capacity = await lv.disk_capacity(ref, disk)
    try:
        held = image.stat().st_blocks * 512
    except OSError:
        held = 0
    return max(0, capacity - held)


async def _stopped(
    lv: Libvirt, repo: Repository, hold: Hold, ref: DomainRef, act: bool
) -> MoveState:
    """The new domain does not run. Its QEMU may have died during or after
    the pulls: that is reported (once in the journal, kept in the hold for
    `status`), and the disks stay unverified until the domain runs again
    and the check passes."""
    ended = await lv.qemu_ended(ref)
    unverified = [d for d in hold.disks if d not in hold.verified]
    state = "waiting"
    if ended is not None and unverified:
        state = "crashed"
        if hold.trouble is None and act:
            trouble = (
                f"the new domain {ref.name} {ended} during the move "
                f"({datetime.now(UTC):%Y-%m-%d %H:%M} UTC seen); disks {', '.join(unverified)} "
                "are not released from the backup until they are checked after a start"
            )
            log.error(
                "live restore: the new domain crashed; its disks stay held",
                domain=ref.name,
                backup_id=hold.backup_id,
                disks=unverified,
                reason=ended,
            )
            hold = replace(hold, trouble=trouble)
            repo.add_hold(hold)
    moves = tuple(DiskMove(d, image_of(hold, d), d in hold.verified) for d in hold.disks)
    return MoveState(hold, ref.name, state, moves)


async def _check(
    lv: Libvirt,
    repo: Repository,
    hold: Hold,
    ref: DomainRef,
    disks: Sequence[str],
    config: DaemonConfig,
    run: int,
) -> Hold:
    """Check `disks` (every pull ended) and record the outcome in the hold
    (`run`: the id of the QEMU checked)."""
    folder = repo.final_dir(hold.domain_uuid, hold.backup_id)
    work = config.scratch_dir / f"live-{hold.id}"
    results = await live_check.check_moved(
        lv, ref, folder, disks, hold.checkpoint, work, config.runtime_dir
    )
    good = [r.disk for r in results if r.ok]
    bad = [r for r in results if not r.ok]
    for r in results:
        (log.info if r.ok else log.error)(
            "live restore: disk checked" if r.ok else "live restore: disk differs from the backup",
            domain=ref.name,
            backup_id=hold.backup_id,
            disk=r.disk,
            result=live_check.describe(r),
        )
    trouble, failed_run = hold.trouble, None
    if bad:
        trouble = "; ".join(live_check.describe(r) for r in bad) + (
            "; the backup stays held (restore again, or undefine the domain to release it)"
        )
        # What was lost stays lost while this QEMU runs: checked again
        # after the next start only, not every few seconds.
        failed_run = run
    hold = replace(hold, verified=(*hold.verified, *good), trouble=trouble, failed_run=failed_run)
    repo.add_hold(hold)
    return hold


async def _forget_guest_writes(lv: Libvirt, ref: DomainRef, hold: Hold) -> None:
    """The checkpoint (and its bitmaps) served the check only."""
    if hold.checkpoint is None:
        return
    try:
        await lv.delete_checkpoint(ref, hold.checkpoint)
    except VirtBackupError as exc:
        # An inconsistent bitmap (after a crash) may refuse the merge:
        # libvirt's record goes, the bitmap stays until a backup reuses none.
        log.warning("live restore: its checkpoint stays", domain=ref.name, error=str(exc))
        with contextlib.suppress(VirtBackupError):
            await lv.delete_checkpoint(ref, hold.checkpoint, metadata_only=True)


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
    chain = repo.chain(folder, Operation.RESTORE)
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
            host_folders.set_owner(d, mode=mode | 0o011)
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
            host_folders.set_owner(d, mode=stat.S_IMODE(d.stat().st_mode) & ~0o011)
    for folder in chain:
        if folder in still:
            continue
        for image in folder.glob("*.qcow2"):  # libvirt gave them to QEMU's user
            # (A link in an image's place is refused, not followed: left as is.)
            with contextlib.suppress(OSError, UntrustedFolderError):
                host_folders.set_owner(image, (0, 0), 0o600)
