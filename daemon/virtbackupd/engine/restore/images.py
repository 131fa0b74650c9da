"""Restoring a backup's disks as standalone images in a folder.

Every image is written beside its destination as ``.<name>.partial``,
fsynced and only then renamed into place: a failed or interrupted restore
never leaves a file that looks like a finished one, and never damages
what was there.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import structlog

from virtbackupd.adapters import host_folders
from virtbackupd.adapters.qcow2_writer import new_image
from virtbackupd.adapters.raw_writer import new_raw_image
from virtbackupd.adapters.repository import fsync_path
from virtbackupd.engine.datapath.copy import CopyOptions, CopyResult, Source, ZeroMode, copy_disk
from virtbackupd.engine.restore.chain import NOTHING_RESTORED, copy_checked, load_chain
from virtbackupd.engine.restore.context import FORMATS, RestoreContext, RestoredDisk
from virtbackupd.errors import DefineRefusedError, InputError, RestoreError

log = structlog.get_logger("virtbackupd.restore")


async def restore_image(ctx: RestoreContext, disk: str, target: Path, fmt: str) -> RestoredDisk:
    """A standalone, sparse `fmt` image of what `disk` of the backup in
    `ctx.folder` shows, checked against every layer's recorded pieces as it
    is copied (no pass of its own), written and fsynced beside `target` as
    ``.<name>.partial``: :func:`publish` renames it once every disk of the
    restore is written (all or nothing)."""
    if fmt not in FORMATS:
        raise RestoreError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    chain = await load_chain(ctx.folder, disk, ctx.runtime_dir, ctx.allow_damaged)
    size = chain.size
    progress = ctx.progress_of(disk)
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        # Written in our own process, as backups are (docs/data-path.md).
        # Through the page cache: measured faster for restores than direct
        # writes (adapters.image_files).
        opener = (
            new_image(partial, size, direct=False)
            if fmt == "qcow2"
            else new_raw_image(partial, size, direct=False)
        )
        async with opener as writer:

            async def copy(sources: Sequence[Source], options: CopyOptions) -> CopyResult:
                return await copy_disk(sources, [writer], options=options, progress=progress)

            result, damage = await copy_checked(chain, copy, ZeroMode.SKIP, ctx.allow_damaged)
        fsync_path(partial)
        host_folders.set_owner(partial, mode=0o600)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return RestoredDisk(disk, target, fmt, result, damage, partial)


async def write_all(
    ctx: RestoreContext, jobs: Sequence[tuple[str, Path, str]]
) -> list[RestoredDisk]:
    """Every (disk, target, format) written first, then all renamed into
    place: a refused or failed restore leaves none of its images, and
    replaces nothing that was there."""
    written: list[RestoredDisk] = []
    try:
        for disk, target, fmt in jobs:
            written.append(await restore_image(ctx, disk, target, fmt))
    except BaseException:
        discard(written)
        raise
    return written


def discard(written: Sequence[RestoredDisk]) -> None:
    """Remove the images written but not yet renamed into place."""
    for r in written:
        if r.partial is not None:
            r.partial.unlink(missing_ok=True)


def publish(r: RestoredDisk, like: os.stat_result | None = None) -> None:
    """Rename a written image into place (with `like`'s owner and mode)."""
    assert r.partial is not None
    if like is not None:  # keep the image's owner and mode for libvirt/QEMU
        host_folders.set_owner(r.partial, (like.st_uid, like.st_gid), like.st_mode & 0o7777)
    r.partial.rename(r.path)
    fsync_path(r.path.parent)


def check_target_folder(to: Path) -> None:
    """Refuse, before anything is read or written, a --to that cannot hold
    the restored images: a file, or a place under /proc, /sys or /dev."""
    real = to.resolve()
    if host_folders.on_pseudo_fs(real):
        raise InputError(f"--to {to}: not a folder for images (a kernel pseudo file system)")
    if real.exists() and not real.is_dir():
        raise InputError(
            f"--to {to}: not a folder (restore writes one image per disk into a folder)"
        )
    # A folder to be made below a file can never be: input, not a failure.
    above = next((p for p in real.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise InputError(f"--to {to}: {above} is not a folder, so no folder can be made below it")


async def restore_to_dir(
    ctx: RestoreContext,
    to: Path,
    fmt: str,
    *,
    force: bool = False,
    before_publish: Callable[[Sequence[RestoredDisk]], Awaitable[None]] | None = None,
) -> list[RestoredDisk]:
    """``<to>/<disk>.<fmt>`` for each disk of the backup in `ctx.folder`.
    `before_publish` runs once every image is written, before any is
    renamed into place (`--define` defines the domain there): if it
    fails, the written images are removed and nothing is replaced."""
    check_target_folder(to)
    targets = {d: to / f"{d}.{fmt}" for d in ctx.disks}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not force:
        raise RestoreError(f"{', '.join(existing)} exists; give --force to replace it")
    # 0711: QEMU (another user) must reach the images of a --define'd
    # domain; the images themselves are 0600 until libvirt labels them.
    try:
        # 0711 whatever the umask: QEMU reaches the images.
        host_folders.make_passable(to, trusted=False)
    except OSError as exc:
        raise RestoreError(f"--to {to}: cannot create the folder: {exc.strerror}") from exc
    jobs = [(disk, target, fmt) for disk, target in targets.items()]
    out = await write_all(ctx, jobs)
    try:
        if before_publish is not None:
            await before_publish(out)
    except BaseException as exc:
        discard(out)
        if isinstance(exc, DefineRefusedError):
            raise DefineRefusedError(
                f"{exc}; the images this restore wrote were removed, {NOTHING_RESTORED}"
            ) from exc
        raise
    for r in out:
        publish(r)
        log.info("disk restored", disk=r.disk, path=str(r.path), bytes=r.result.bytes_written)
    return out
