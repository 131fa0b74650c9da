"""One round of a live restore's move: what a settler does for one hold.

Whoever settles the holds (the daemon every few seconds, `status` and
`prune` before they report or act) starts the next pull when none runs
(also after the domain or the host restarted: the overlay keeps what was
moved, so a new pull only copies the rest), checks the disks whose pull
ended (engine.restore.live_check), notices a crash of the new domain
(reported in `status` and the journal, kept in the hold), and releases the
hold only once every disk was checked.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import structlog

from virtbackupd.adapters.libvirt_conn import DomainRef, Libvirt
from virtbackupd.adapters.repository import Repository
from virtbackupd.config.daemon import DaemonConfig
from virtbackupd.core.live_move import (
    PULL_ATTEMPTS,
    DiskFacts,
    Next,
    PullVerdict,
    Step,
    next_step,
    pull_verdict,
)
from virtbackupd.core.repository_format.holds import Hold
from virtbackupd.core.repository_format.names import disk_file
from virtbackupd.engine.restore import live_check
from virtbackupd.engine.restore.live_access import release
from virtbackupd.errors import DomainNotFoundError, LibvirtError, VirtBackupError

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


async def first_pull(lv: Libvirt, ref: DomainRef, disk: str, rate: int) -> None:
    """The hold exists before the domain starts: a daemon's round may see
    it running and start this very pull first, or the restore may start it
    just after the round looked (both seen under load)."""
    try:
        await lv.block_pull(ref, disk, rate)
    except LibvirtError:
        if await lv.block_job(ref, disk) is None:
            raise


@dataclass(frozen=True)
class _Round:
    """One settler's look at one live restore whose new domain runs."""

    lv: Libvirt
    repo: Repository
    config: DaemonConfig
    ref: DomainRef
    run: int  # the id of the QEMU run looked at
    act: bool  # this settler has the hold's turn (else it only reports)


async def settle_one(
    lv: Libvirt, repo: Repository, hold: Hold, config: DaemonConfig, act: bool
) -> MoveState:
    """Look at the live restore of `hold` and, when `act`, move it on."""
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
    rd = _Round(lv, repo, config, ref, await lv.run_id(ref), act)
    hold, state = await _advance(rd, hold, nxt, jobs)
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


async def _advance(
    rd: _Round, hold: Hold, nxt: Next, jobs: dict[str, tuple[int, int] | None]
) -> tuple[Hold, str]:
    """Take the step `nxt` asks for (a pull, a check), release the hold
    once every disk was checked; the hold as it is now, and its state."""
    state = "moving"
    if nxt.step is Step.PULL:
        hold, state = await _pull_next(rd, hold, nxt.disks[0], jobs)
    elif rd.act and nxt.step is Step.CHECK and hold.failed_run != rd.run:
        hold = await _check(rd, hold, nxt.disks)
    if rd.act and set(hold.disks) <= set(hold.verified):
        await _finish(rd, hold)
        state = "finished"
    elif nxt.step is Step.CHECK:
        state = "damaged" if hold.failed_run == rd.run else "checking"
    return hold, state


async def _pull_next(
    rd: _Round, hold: Hold, disk: str, jobs: dict[str, tuple[int, int] | None]
) -> tuple[Hold, str]:
    """`disk` is the next to move and no pull runs: start one, unless the
    pulls failed too often or too recently."""
    if rd.act:
        hold = await _pull_ended(rd, hold, disk)
    # Counted per disk and QEMU run: a retried pull that then finished
    # leaves `pulling` on its disk, and the next disk starts afresh.
    same = hold.pull_run == rd.run and hold.pulling in (None, disk)
    failures = hold.pull_failures if same else 0
    since = (
        None
        if hold.pull_failed_at is None
        else (datetime.now(UTC) - hold.pull_failed_at).total_seconds()
    )
    verdict = pull_verdict(failures, since)
    if verdict is PullVerdict.STOP:
        return hold, "stopped"
    if rd.act and verdict is PullVerdict.PULL:
        log.info("live restore: pull started", domain=rd.ref.name, disk=disk)
        await first_pull(rd.lv, rd.ref, disk, hold.rate)  # the restore may have just started it
        jobs[disk] = await rd.lv.block_job(rd.ref, disk)
        hold = replace(
            hold,
            pulling=disk,
            pull_run=rd.run,
            pull_failures=failures,
            trouble=_without_pull_trouble(hold),
        )
        rd.repo.add_hold(hold)
    return hold, "moving"


async def _finish(rd: _Round, hold: Hold) -> None:
    """Every disk moved and checked: the backup may go."""
    # QEMU rewrote each image's header when its pull ended, but keeps
    # the new data's qcow2 metadata in memory until a flush: a kill
    # then loses it all (measured: a SIGKILL a second after a finished
    # pull left the image reading as zeroes). Only a flushed disk
    # stands alone; then the backup may go.
    await rd.lv.flush_by_pause(rd.ref)
    await _forget_guest_writes(rd.lv, rd.ref, hold)
    log.info(
        "live restore finished: every disk moved and checked against the backup",
        domain=rd.ref.name,
        backup_id=hold.backup_id,
        disks=list(hold.disks),
    )
    release(rd.repo, hold)


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


async def _pull_ended(rd: _Round, hold: Hold, disk: str) -> Hold:
    """`disk` still reads the backup and no pull runs on it. If the pull
    last started on it in this QEMU run ended so (it failed), count it and
    say why; a pull given up for want of space is resumed once there is
    room for the rest of the disk."""
    image = image_of(hold, disk)
    free = _free_bytes(image.parent)
    lv, ref = rd.lv, rd.ref
    if hold.pulling == disk and hold.pull_run == rd.run:
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
        rd.repo.add_hold(hold)
    elif (
        hold.pull_run == rd.run
        and hold.pull_failures >= PULL_ATTEMPTS
        and free >= await _left_to_move(lv, ref, disk, image)
    ):
        log.info("live restore: there is room again; the move resumes", domain=ref.name, disk=disk)
        hold = replace(
            hold, pull_failures=0, pull_failed_at=None, trouble=_without_pull_trouble(hold)
        )
        rd.repo.add_hold(hold)
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


async def _check(rd: _Round, hold: Hold, disks: Sequence[str]) -> Hold:
    """Check `disks` (every pull ended) and record the outcome in the hold
    (`rd.run`: the id of the QEMU checked)."""
    lv, repo, ref, config = rd.lv, rd.repo, rd.ref, rd.config
    folder = repo.final_dir(hold.domain_uuid, hold.backup_id)
    work = config.scratch_dir / f"live-{hold.id}"
    moved = live_check.MovedDisks(folder, tuple(disks), hold.checkpoint, work, config.runtime_dir)
    results = await live_check.check_moved(lv, ref, moved)
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
        failed_run = rd.run
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
