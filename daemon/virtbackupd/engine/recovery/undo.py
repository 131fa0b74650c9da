"""Taking a backup back: the one implementation of "what a failed backup
leaves undone", used by the job on its failure edge and by the next job
of the domain after this process died (engine.recovery.leftovers).

A running backup writes an undo log into the repository
(``<domain>/.undo/<id>.json``, adapters.repository.UndoLog) *before*
each step it lists: the partial folder, the runtime and scratch folders,
the libvirt pull job, the new checkpoint, an offline bitmap. Replaying it
takes the steps back, last first, each one idempotent and each run even
if an earlier one failed; then the attempt is recorded as failed (in the
repository and the catalogue) and the log dropped.

A log whose backup folder exists was committed (the rename is the
commit): it is dropped and the catalogue told, never replayed.
"""

from __future__ import annotations

import asyncio
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from pathlib import Path

import structlog
from structlog.typing import FilteringBoundLogger

from virtbackupd.adapters import qemu_img
from virtbackupd.adapters.libvirt_conn import DomainRef, Libvirt
from virtbackupd.adapters.repository import Repository
from virtbackupd.adapters.store import Store
from virtbackupd.core.backup_xml import Backup
from virtbackupd.core.domain_xml import parse_domain
from virtbackupd.core.repository_format.attempts import FailedAttempt
from virtbackupd.core.repository_format.undo import UndoKind, UndoLog, UndoStep
from virtbackupd.engine import scratch, vm_starts
from virtbackupd.engine.recovery import own_checkpoints
from virtbackupd.errors import DomainStartingError, VirtBackupError

log: FilteringBoundLogger = structlog.get_logger("virtbackupd.undo")


class Images(StrEnum):
    """May a replay remove bitmaps from a shut-off domain's images?"""

    HELD = "held"  # yes: the caller holds them against a VM start (offline job)
    TAKE_HOLD = "take-hold"  # yes, holding them for it (an online job the VM's stop ended)
    # no: after a dead process, own_checkpoints.check_shut_off removes a
    # stray bitmap under the hold (before the next offline copy, at start)
    LEAVE = "leave"


class Undo:
    """The undo log of the running job: `note` a step before taking it."""

    def __init__(self, repo: Repository, first: UndoLog) -> None:
        self.repo = repo
        self.log = first
        repo.write_undo(first)

    def note(self, kind: UndoKind, path: Path | str | None = None, name: str | None = None) -> None:
        step = UndoStep(kind, str(path) if path is not None else None, name)
        self.log = replace(self.log, steps=(*self.log.steps, step))
        self.repo.write_undo(self.log)

    def committed(self) -> None:
        """The backup counts: nothing is to be undone any more."""
        self.repo.drop_undo(self.log.domain_uuid, self.log.backup_id)


async def own_job_socket(lv: Libvirt, ref: DomainRef) -> Path | None:
    """The NBD socket of the domain's running libvirt backup job, if it
    has one we can read."""
    try:
        backup = Backup.from_xml(await lv.backup_xml(ref), "running backup job", internal=True)
    except VirtBackupError:
        return None  # no backup job, or not one we can read
    if backup.server is None or backup.server.socket is None:
        return None
    return Path(backup.server.socket)


@dataclass(frozen=True)
class ReplayContext:
    """Where an undo log is taken back, and what the replay may touch."""

    # None (the domain is gone, or a repository is tidied without libvirt):
    # the libvirt steps are skipped, nothing of the domain is left to clean.
    lv: Libvirt | None
    store: Store
    repo: Repository
    ref: DomainRef | None
    # Whether bitmaps may be removed from a shut-off domain's images here.
    images: Images
    logger: FilteringBoundLogger = log


async def replay(ctx: ReplayContext, undo: UndoLog, reason: str, now: datetime) -> None:
    """Take back every step of `undo`, record the attempt as failed, drop
    the log. `ctx.images` says whether bitmaps may be removed from a
    shut-off domain's images here (see :class:`Images`). Without `ctx.lv`
    (the domain is gone, or a repository is tidied without libvirt) the
    libvirt steps are skipped: nothing of the domain is left to clean."""
    repo, logger = ctx.repo, ctx.logger
    for step in reversed(undo.steps):
        if step.kind in LIBVIRT_STEPS and (ctx.lv is None or ctx.ref is None):
            continue
        try:
            await asyncio.shield(_take_back(ctx, step))
        except VirtBackupError as err:
            logger.error("cleanup step failed", step=step.kind.value, error=str(err))
        except Exception as err:  # a bug: with its traceback
            logger.error("cleanup step failed", step=step.kind.value, error=repr(err), exc_info=err)
    attempt = FailedAttempt(
        undo.backup_id,
        undo.domain_name,
        undo.domain_uuid,
        undo.level,
        undo.started,
        now,
        reason,
        undo.parent,
    )
    try:
        repo.record_attempt(attempt)
    except OSError as err:
        logger.error("cannot record the failed attempt in the repository", error=str(err))
    await asyncio.shield(ctx.store.fail_backup(undo.backup_id, now, reason))
    repo.drop_undo(undo.domain_uuid, undo.backup_id)


LIBVIRT_STEPS = (UndoKind.LIBVIRT_JOB, UndoKind.CHECKPOINT, UndoKind.BITMAP)


async def _take_back(ctx: ReplayContext, step: UndoStep) -> None:
    lv, ref, images, logger = ctx.lv, ctx.ref, ctx.images, ctx.logger
    if step.kind is UndoKind.PARTIAL:
        repo_partial = Path(step.path or "")
        shutil.rmtree(repo_partial, ignore_errors=True)
    elif step.kind is UndoKind.JOB_DIR:  # the job's runtime or scratch folder
        await scratch.release(Path(step.path or ""))
    elif lv is None or ref is None:
        return
    elif step.kind is UndoKind.LIBVIRT_JOB:
        # Only our own job: its NBD socket is the one the log names.
        ours = await lv.is_running(ref) and await lv.job_active(ref)
        if ours and await own_job_socket(lv, ref) == Path(step.path or ""):
            # A step of the clean-up, not news: the backup's outcome line said it.
            logger.debug("aborting the libvirt job of a failed backup", socket=step.path)
            await lv.abort_job(ref)
    elif step.kind is UndoKind.CHECKPOINT:
        name = step.name or ""
        if name in {c.name for c in await lv.checkpoints(ref)}:
            await own_checkpoints.delete_checkpoint(lv, ref, name)
        if images is not Images.LEAVE:
            await _remove_stray_bitmap(lv, ref, name, images is Images.HELD, logger)
    elif step.kind is UndoKind.BITMAP and images is Images.HELD and step.path and step.name:
        image = Path(step.path)
        if image.exists():
            await own_checkpoints.remove_bitmap(image, step.name)


async def _remove_stray_bitmap(
    lv: Libvirt, ref: DomainRef, name: str, holding: bool, logger: FilteringBoundLogger
) -> None:
    """A shut-off domain keeps the bitmap of a deleted checkpoint (libvirt
    deletes only the metadata then). Removed while the images are held
    against a VM start; a start wins, and the next offline backup's
    shut-off check removes it."""
    if await lv.is_running(ref):
        return
    info = parse_domain(await lv.xml(ref, inactive=True), f"domain XML of {ref.name}")
    try:
        with vm_starts.hold_images(ref.uuid, ref.name) if not holding else nullcontext():
            if await lv.is_running(ref):
                return
            for image in own_checkpoints.qcow2_images(info):
                if name in await qemu_img.bitmap_names(image):
                    # QEMU that just stopped may hold the image a moment longer.
                    await own_checkpoints.remove_bitmap(image, name)
                    logger.info("removed the new bitmap", image=str(image))
    except DomainStartingError:
        logger.warning("the domain is being started; its stray bitmap stays for now")
