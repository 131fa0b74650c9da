"""Letting QEMU's user read a live restore's chain, and taking it back.

QEMU runs as an unprivileged user (libvirt-qemu) and must read the chain:
the repository folders on the way are opened for traversal (o+x, never
listing) for the time of the move, and libvirt gives the images to QEMU's
user, as it does with any backing file. Both are taken back when the hold
is released, except what another live restore still needs.
"""

from __future__ import annotations

import contextlib
import stat
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from virtbackupd.adapters import host_folders
from virtbackupd.adapters.repository import Repository
from virtbackupd.core.repository_format.holds import Hold, HoldKind
from virtbackupd.core.repository_format.versions import Operation
from virtbackupd.errors import RestoreError, UntrustedFolderError


def release(repo: Repository, hold: Hold) -> None:
    # As stored now: another release may have handed folders to it.
    hold = next((h for h in repo.holds(hold.domain_uuid) if h.id == hold.id), hold)
    folder = repo.final_dir(hold.domain_uuid, hold.backup_id)
    chain = [b.folder for b in repo.chain(folder)] if folder.is_dir() else []
    repo.drop_hold(hold)
    close(repo, [Path(p) for p in hold.opened], chain)


def _chain_dirs(repo: Repository, folder: Path) -> list[Path]:
    """The folders QEMU passes through to read `folder`'s chain, outermost
    first."""
    chain = repo.chain(folder, Operation.RESTORE)
    dirs = [repo.root, folder.parent]
    return [*dirs, *(b.folder for b in chain)]


def open_for_qemu(repo: Repository, folder: Path) -> list[Path]:
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


def close(repo: Repository, opened: Sequence[Path], chain: Sequence[Path]) -> None:
    """Take back what `open_for_qemu` opened and give the chain's images
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
