"""Scratch space of online backups: where QEMU's copy-before-write filter
keeps the old contents of blocks the guest overwrites during a backup.

QEMU 7.2 fails the *guest's* write (ENOSPC) when the scratch file cannot
grow, and libvirt 9.0 offers no way to make it break the backup instead
(QEMU's `on-cbw-error` is not set or settable through libvirt). So no
scratch file may ever need to grow: before the backup begins, each disk's
scratch image is created by us with all of its space reserved on the file
system (a qcow2 with `preallocation=falloc`, as large as the disk), and
libvirt is told to use it as it is (REUSE_EXTERNAL). Whatever the guest
writes, copy-before-write only fills space that is already the file's. When
the file system cannot hold the reservation, the backup is refused before
anything is done to the guest (docs/operations.md, "What virtbackupd does
to your VMs").
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from virtbackupd.adapters import host_folders, qemu_img
from virtbackupd.errors import ProcessError, ScratchSpaceError

MiB = 1 << 20

# Extended L2 entries let a preallocated cluster stay *unallocated* per
# subcluster: reads of blocks the guest has not overwritten fall through to
# the disk (libvirt gives the scratch node the disk as its backing). Without
# them a preallocated cluster reads as zeroes and the export would be wrong.
SCRATCH_OPTIONS = ("preallocation=falloc", "extended_l2=on")


@dataclass(frozen=True)
class Space:
    folder: Path
    free: int
    size: int

    def describe(self) -> str:
        return f"{_mib(self.free)} MiB free of {_mib(self.size)} MiB in {self.folder}"


@dataclass(frozen=True)
class ScratchFile:
    """One disk's scratch image: where, and how large the disk is."""

    disk: str
    path: Path
    disk_size: int  # the disk's virtual size: what copy-before-write may copy at most


def _mib(n: int) -> str:
    """Whole MiB, rounded up (a need shown as 0 MiB would read as none)."""
    return str(-(-n // MiB))


def measure(folder: Path) -> Space:
    st = os.statvfs(folder)
    return Space(folder, st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize)


def check_room(needs: Mapping[str, int], space: Space, domain: str) -> None:
    """Refuse when the scratch file system cannot hold every disk's
    reservation (`needs`: disk -> bytes its scratch image takes)."""
    total = sum(needs.values())
    if total <= space.free:
        return
    each = ", ".join(f"{d} {_mib(n)} MiB" for d, n in needs.items())
    raise ScratchSpaceError(
        f"scratch space: an online backup of {domain} reserves {_mib(total)} MiB before it "
        f"begins ({each}: the size of each disk, what the guest could overwrite during the "
        f"backup), but there are {space.describe()}; set scratch_dir to a file system with "
        "that much room, or back the domain up while it is shut off (needs no scratch space)"
    )


async def reserve(
    files: Mapping[str, ScratchFile],
    folder: Path,
    domain: str,
    qemu_user: tuple[int, int] | None,
) -> int:
    """Create every scratch image with its space reserved; returns the bytes
    reserved. The check first gives the numbers; the creation itself is the
    guarantee (another writer may take the room in between: then the
    reservation fails here, before the backup begins, never later).
    `folder`: scratch_dir, named in the messages.

    The job's scratch folder (each file's parent, made by :func:`prepare`)
    is root's, 0700, while qemu-img runs as root in it: QEMU's user could
    otherwise plant a link at a file's name and have root write an image
    through it. Each file is handed to QEMU once made, the folder last."""
    jobs = {f.path.parent for f in files.values()} if qemu_user is not None else set()
    for job in jobs:
        # Ours again (by descriptor; a link is refused) before anything is
        # made in it: an earlier attempt (a full after a refused
        # incremental) handed it to QEMU.
        host_folders.set_owner(job, (0, 0), 0o700)
    for f in files.values():  # an earlier attempt's
        f.path.unlink(missing_ok=True)
    needs = {
        d: await qemu_img.measure_preallocated(f.disk_size, SCRATCH_OPTIONS)
        for d, f in files.items()
    }
    space = measure(folder)
    check_room(needs, space, domain)
    for d, f in files.items():
        try:
            await qemu_img.create(f.path, f.disk_size, options=SCRATCH_OPTIONS)
        except ProcessError as exc:
            f.path.unlink(missing_ok=True)
            raise ScratchSpaceError(
                f"scratch space: cannot reserve {_mib(needs[d])} MiB for disk {d} of {domain} "
                f"({measure(folder).describe()}): {exc.message}; scratch_dir "
                "must be a file system with room for the disks and fallocate (ext4, xfs, tmpfs)"
            ) from exc
        if qemu_user is not None:
            # libvirt relabels it too; ours so that QEMU may write it even
            # where libvirt's dynamic_ownership is off.
            host_folders.set_owner(f.path, qemu_user)
    for job in jobs:
        host_folders.set_owner(job, qemu_user)
    return sum(needs.values())


def prepare(folder: Path, qemu_user: tuple[int, int] | None) -> None:
    """Create a job's scratch folder (root's, 0700: :func:`reserve` hands
    it to QEMU once the files are made). QEMU runs as its own user
    (libvirt-qemu): every folder above must let it through (o+x)."""
    # Ours: passing through, no listing (the unit's UMask=0077 would make a
    # new folder 0700).
    host_folders.make_folder(folder.parent, 0o711, parents_mode=0o711, reset=True)
    if qemu_user is not None and qemu_user[0] != 0:
        for parent in [folder.parent, *folder.parent.parents]:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                raise ScratchSpaceError(
                    f"scratch_dir {folder.parent}: QEMU (uid {qemu_user[0]}) cannot reach it, "
                    f"because {parent} is mode {mode & 0o7777:04o}; give that folder o+x "
                    "(0711: passing through, no listing) or choose another scratch_dir"
                )
    # Root's until reserve() has made the scratch files in it and hands it over.
    host_folders.make_folder(folder, exist_ok=False)


#: What libvirt (qemu.conf `remember_owner`, on by default) sets on a file
#: it labels for QEMU and removes when it gives the label back.
LIBVIRT_LABEL_XATTR = "trusted.libvirt.security."


async def release(folder: Path, timeout: float = 10.0) -> None:
    """Remove a job's scratch folder once libvirt has given its files their
    labels back. libvirt 9.0 says a pull job has ended (no job, no block
    job) while it still tears down the last disk's: it detaches the scratch
    file and only then restores its owner. A file removed before that makes
    libvirtd log "unable to stat ….scratch" and "Unable to restore security
    label" (seen on a live restore's check after its domain was killed; a
    run measured the last disk's label given back after abortJob returned).
    The sign it is done is its remembered-owner attributes going away;
    without them (remember_owner off, no xattrs) there is nothing to wait
    for. After `timeout` (libvirtd gone) the folder is removed anyway."""
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Polled: nothing of libvirt's says when (no event, no job left).
        while _labelled(folder) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _labelled(folder: Path) -> bool:
    """Whether libvirt still holds a label on a file in `folder`."""
    try:
        files = list(folder.iterdir())
    except OSError:
        return False
    for f in files:
        try:
            names = os.listxattr(f, follow_symlinks=False)
        except OSError:
            continue
        if any(n.startswith(LIBVIRT_LABEL_XATTR) for n in names):
            return True
    return False
