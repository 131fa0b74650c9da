"""The folders of one backup job: the partial folder in the repository
(the backup until its commit), the job's runtime folder (QEMU's NBD
socket, our qemu-nbd helpers) and, online, QEMU's scratch folder. Each is
in the undo log before it is made."""

from __future__ import annotations

from pathlib import Path

from virtbackupd.adapters import host_folders
from virtbackupd.core.domain_xml import DomainInfo
from virtbackupd.core.repository_format.undo import UndoKind
from virtbackupd.engine import scratch
from virtbackupd.engine.backup.context import JobContext
from virtbackupd.errors import VirtBackupError


def prepare(job: JobContext, info: DomainInfo) -> None:
    job.note(UndoKind.PARTIAL, job.partial_dir)
    job.note(UndoKind.JOB_DIR, job.job_dir)
    if job.running:
        job.note(UndoKind.JOB_DIR, job.scratch_dir)
    job.repo.create_partial(job.ref.uuid, job.backup_id)
    make_job_folder(job.job_dir, job.config.runtime_dir, info.qemu_user, qemu_passes=job.running)
    if job.running:
        # QEMU creates its copy-before-write scratch files in here.
        scratch.prepare(job.scratch_dir, info.qemu_user)


def make_job_folder(
    job_dir: Path, runtime_dir: Path, qemu_user: tuple[int, int] | None, *, qemu_passes: bool
) -> None:
    """Create a job's folder (`runtime_dir`/jobs/<id>), QEMU's own: it
    makes the NBD socket in there. A link planted on the way or in its
    place is refused, never followed. `qemu_passes`: an online backup,
    whose QEMU (often not root) must traverse to it, not list it."""
    # QEMU (often not root) must traverse to its job folder, not list it.
    host_folders.make_folder(job_dir.parent, 0o711, parents_mode=0o711, reset=True)
    if qemu_passes and qemu_user is not None and qemu_user[0] != 0:
        blocked = host_folders.unpassable(job_dir.parent)
        if blocked is not None:
            raise VirtBackupError(
                f"runtime_dir {runtime_dir}: QEMU (uid {qemu_user[0]}) "
                f"cannot reach its job folder, because {blocked} is mode "
                f"{blocked.stat().st_mode & 0o7777:04o}; give that folder o+x "
                "(0711: passing through, no listing)"
            )
    # QEMU creates the NBD socket in here (so its own).
    host_folders.make_folder(job_dir, owner=qemu_user, exist_ok=False)
