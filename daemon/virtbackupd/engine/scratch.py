"""Scratch space of online backups: where QEMU's copy-before-write filter
keeps the old contents of blocks the guest overwrites during a backup.

QEMU 7.2 fails the *guest's* write (ENOSPC) when the scratch file cannot
grow, so the job must stop before that: it checks the free space before it
begins and watches it while it runs (docs/operations.md, "What virtbackupd
does to your VMs"). Aborting the libvirt job ends copy-before-write at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from virtbackupd.errors import ScratchSpaceError

MiB = 1 << 20
# Stop while this much is still free: what the guest may write between two
# looks (0.2 s) plus the abort, at a few hundred MB/s. On a small file
# system, a third of it.
RESERVE_MAX = 256 * MiB


@dataclass(frozen=True)
class Space:
    folder: Path
    free: int
    size: int

    @property
    def reserve(self) -> int:
        return min(RESERVE_MAX, self.size // 3)

    @property
    def running_out(self) -> bool:
        return self.free <= self.reserve

    def describe(self, used: int | None = None) -> str:
        text = f"{self.free // MiB} MiB free of {self.size // MiB} MiB in {self.folder}"
        if used is not None:
            text += f" (this backup's scratch files: {used // MiB} MiB)"
        return text


def measure(folder: Path) -> Space:
    st = os.statvfs(folder)
    return Space(folder, st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize)


def used_by(folder: Path) -> int:
    """Bytes the files in `folder` take on disk (scratch files are sparse)."""
    total = 0
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False):
            total += entry.stat(follow_symlinks=False).st_blocks * 512
    return total


def check_before(folder: Path, domain: str) -> Space:
    """Refuse to begin when the scratch file system is already at its
    reserve (the backup would be stopped at once)."""
    space = measure(folder)
    if space.running_out:
        raise ScratchSpaceError(
            f"scratch space: {space.describe()}; an online backup of {domain} needs room "
            f"for the old contents of blocks the guest overwrites during it (more than "
            f"{space.reserve // MiB} MiB free); free some, or set scratch_dir to a larger "
            "file system"
        )
    return space


def stopped_reason(space: Space, used: int) -> str:
    return (
        f"scratch space ran low: {space.describe(used)}; the backup was stopped before "
        "the guest's writes could fail. The next backup is unaffected; give scratch_dir "
        "more room if it recurs"
    )


def prepare(folder: Path, qemu_user: tuple[int, int] | None) -> None:
    """Create a job's scratch folder for QEMU. QEMU runs as its own user
    (libvirt-qemu): every folder above must let it through (o+x)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Ours: passing through, no listing (the unit's UMask=0077 would make a
    # new folder 0700).
    folder.parent.chmod(0o711)
    if qemu_user is not None and qemu_user[0] != 0:
        for parent in [folder.parent, *folder.parent.parents]:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                raise ScratchSpaceError(
                    f"scratch_dir {folder.parent}: QEMU (uid {qemu_user[0]}) cannot reach it, "
                    f"because {parent} is mode {mode & 0o7777:04o}; give that folder o+x "
                    "(0711: passing through, no listing) or choose another scratch_dir"
                )
    folder.mkdir(mode=0o700)
    if qemu_user is not None:
        os.chown(folder, *qemu_user)
