"""A VM start wins over an offline backup: our side of the handshake with
the libvirt hook `libvirt-hooks/qemu.d/virtbackupd` (docs/lineage.md).

An offline backup holds the images of a shut-off domain (qemu-nbd, qemu-img
bitmap), and QEMU cannot take their write lock while it does. libvirt runs
the hook before QEMU opens the images; the hook marks the domain as
starting and waits until no offline backup holds them. Here an offline
backup claims the images only when no start is under way, and a running
one notices a start and ends itself (the usual clean-up), which releases
the images. The folder is fixed, whatever `runtime_dir` says, because the
hook, installed once per host, must find it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from virtbackupd.adapters import host_folders
from virtbackupd.adapters.libvirt_conn import DomainRef, Libvirt
from virtbackupd.errors import DomainStartingError

HOOK_DIR = Path("/run/virtbackupd/hook")
HOOK_INSTALLED = Path("/etc/libvirt/hooks/qemu.d/virtbackupd")

# A start marker older than this is left over from a libvirtd that died
# between "prepare" and QEMU running (the hook removes it otherwise).
STARTING_FRESH_S = 120.0


def _flock(path: Path, blocking: bool = True) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def starting(uuid: str, hook_dir: Path = HOOK_DIR) -> bool:
    """Whether libvirt is starting the domain (the hook ran "prepare" and
    QEMU does not run yet)."""
    try:
        age = time.time() - (hook_dir / f"{uuid}.starting").stat().st_mtime
    except FileNotFoundError:
        return False
    return age < STARTING_FRESH_S


@contextlib.contextmanager
def hold_images(uuid: str, name: str, hook_dir: Path = HOOK_DIR) -> Iterator[None]:
    """Hold the shut-off domain's images for an offline backup: refused
    (DomainStartingError, a busy domain: retried) while a start is under
    way; for the block, a start waits in the hook until this is left.
    Leave it only after the clean-up of the images is done."""
    host_folders.make_folder(hook_dir)
    guard = _flock(hook_dir / f"{uuid}.lock")
    try:
        if starting(uuid, hook_dir):
            raise DomainStartingError(
                f"{name} is being started; an offline backup does not take its images now "
                "(the backup is taken once it runs)",
                domain=name,
            )
        try:
            held = _flock(hook_dir / f"{uuid}.offline", blocking=False)
        except BlockingIOError:
            # Held by the hook (a start's "prepare" waits on it for a
            # moment) or by another offline job on these images: busy,
            # retried like any busy domain, never an OS error.
            raise DomainStartingError(
                f"{name}'s images are held by a VM start or another offline backup; "
                "not taking them now",
                domain=name,
            ) from None
    finally:
        os.close(guard)
    try:
        yield
    finally:
        os.close(held)


def hook_installed() -> bool:
    return HOOK_INSTALLED.is_file() and os.access(HOOK_INSTALLED, os.X_OK)


@contextlib.asynccontextmanager
async def running_or_held(lv: Libvirt, ref: DomainRef) -> AsyncIterator[bool]:
    """Whether the domain runs; if it does not, its images are held for the
    block (refused while a start is under way). A start that passed
    "prepare" just before the claim is seen: the domain then counts as
    running and nothing is held."""
    if await lv.is_running(ref):
        yield True
        return
    with contextlib.ExitStack() as images:
        images.enter_context(hold_images(ref.uuid, ref.name))
        if await lv.is_running(ref):
            images.close()
            yield True
        else:
            yield False
