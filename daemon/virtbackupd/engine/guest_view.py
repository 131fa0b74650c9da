"""A backup's guest filesystems, seen from the host without a guest:
`virtbackup mount` (read-only, file by file) and `verify --filesystems`
(each filesystem's own read-only check).

Layers, each read-only on its own: qemu-storage-daemon opens the backup's
qcow2 chain read-only and exports each disk as a file (writable=off); a
read-only loop device shows one filesystem's byte range of that file
(partitions and LVM volumes are located by reading their tables, never
by the host's partition scanning or device-mapper); the mount options
forbid journal replay. Nothing can write to the backup, and the host's own
volume groups are never looked at.

A mount outlives the command: its helper's pid, loop devices and mount
point are kept in a hold in the repository (prune leaves the backup's
chain alone meanwhile), and `umount` (or whoever settles holds, once the
mount is gone) releases them."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import structlog

from virtbackupd.adapters import (
    disk_probes,
    fuse_export,
    host_folders,
    kernel_mounts,
    nbd_folders,
    procfs,
)
from virtbackupd.adapters.qcow2_reader import check_backing_names
from virtbackupd.adapters.repository import Repository
from virtbackupd.core.repository_format.holds import Hold, HoldKind
from virtbackupd.core.repository_format.names import disk_file
from virtbackupd.core.volumes import Region, VolumeReadError, logical_volumes, partitions
from virtbackupd.errors import InputError, ProcessError, VirtBackupError

log = structlog.get_logger("virtbackupd.guest_view")

FSCHECK = "fscheck"  # below the runtime dir: one folder per running check


@dataclass(frozen=True)
class Volume:
    region: Region
    fstype: str | None  # what blkid found there, None for nothing known
    device: str | None = None  # its read-only loop device, once attached


@dataclass
class GuestView:
    state_dir: Path
    pid: int | None = None
    devices: list[str] = field(default_factory=list)
    volumes: list[Volume] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what is not shown, and why


async def open_view(
    folder: Path,
    disks: Sequence[str],
    state_dir: Path,
    fs_only: set[str],
    *,
    detached: bool = True,
) -> GuestView:
    """Export `disks` of the backup in `folder` and attach a read-only loop
    device to every volume whose type is in `fs_only`. Not `detached`: the
    exports die with us, and `state_dir` records us as its owner so that
    the next command cleans up after us (:func:`sweep_checks`)."""
    for d in disks:
        # Before qemu-storage-daemon opens what the images name (a host
        # file, a FIFO) or follows a link in place of an image.
        await asyncio.to_thread(check_backing_names, folder / disk_file(d))
    host_folders.make_folder(state_dir, exist_ok=False)
    if not detached:
        nbd_folders.claim(state_dir)
    view = GuestView(state_dir)
    try:
        images = {d: folder / disk_file(d) for d in disks}
        view.pid = await fuse_export.start(images, state_dir, detached=detached)
        for disk in disks:
            await _find_volumes(view, disk)
        for n, v in enumerate(view.volumes):
            if v.fstype in fs_only:
                file = fuse_export.export_file(state_dir, v.region.disk)
                dev = await kernel_mounts.attach(file, v.region.offset, v.region.size)
                view.devices.append(dev)
                view.volumes[n] = replace(v, device=dev)
    except BaseException:
        await close_view(view.pid, view.devices, state_dir)
        raise
    return view


async def _find_volumes(view: GuestView, disk: str) -> None:
    file = fuse_export.export_file(view.state_dir, disk)
    size = file.stat().st_size
    try:
        regions = partitions(disk, await disk_probes.partition_table(file), size)
    except VolumeReadError as exc:
        view.notes.append(str(exc))
        regions = []
    for r in regions or [Region(disk, "", 0, size)]:
        kind = await disk_probes.content_type(file, r.offset, r.size)
        if kind != "LVM2_member":
            view.volumes.append(Volume(r, kind))
            continue
        pv = await kernel_mounts.attach(file, r.offset, r.size)
        try:
            report = await disk_probes.lvm_report(pv)
            lvs, skipped = logical_volumes(r, report.segments_json, report.pe_start)
        except (ProcessError, VolumeReadError) as exc:
            view.notes.append(f"{r.label}: LVM volumes not read: {exc}")
            continue
        finally:
            await kernel_mounts.detach(pv)
        view.notes.extend(skipped)
        for lv in lvs:
            view.volumes.append(
                Volume(lv, await disk_probes.content_type(file, lv.offset, lv.size))
            )


async def close_view(pid: int | None, devices: Sequence[str], state_dir: Path) -> None:
    """Detach the loop devices, stop the exports, remove the state folder."""
    problems = []
    for dev in reversed(devices):
        try:
            await kernel_mounts.detach(dev)
        except VirtBackupError as exc:
            problems.append(str(exc))
    await fuse_export.stop(pid)
    for left in kernel_mounts.mounts_under(state_dir) if state_dir.exists() else []:
        try:  # an export the helper did not end (it was killed)
            await kernel_mounts.unmount(left)
        except VirtBackupError as exc:
            problems.append(str(exc))
    if not problems:
        try:
            shutil.rmtree(state_dir)
        except FileNotFoundError:
            pass
        except OSError as exc:
            problems.append(f"{state_dir}: {exc.strerror or exc}")
    if problems:
        raise VirtBackupError("; ".join(problems))


# --- virtbackup mount / umount ---------------------------------------------------------


@dataclass(frozen=True)
class Mounted:
    label: str  # vda/part1
    fstype: str
    path: Path


@dataclass(frozen=True)
class MountResult:
    hold: Hold
    mounted: tuple[Mounted, ...]
    notes: tuple[str, ...]


async def mount_backup(
    repo: Repository,
    folder: Path,
    disks: Sequence[str],
    mountpoint: Path,
    runtime_dir: Path,
) -> MountResult:
    """Show the backup's filesystems below `mountpoint` (an empty folder):
    `<disk>/part<N>/`, `<disk>/` for a filesystem on the whole disk, and
    `<disk>[/part<N>]/<vg>/<lv>/` for LVM volumes. The caller holds the
    domain's lock until this returns."""
    mountpoint = mountpoint.absolute()
    _check_mountpoint(mountpoint)
    hold_id = f"mount-{secrets.token_hex(6)}"
    state_dir = runtime_dir / "mounts" / hold_id
    host_folders.make_folder(runtime_dir / "mounts")
    hold = Hold(
        id=hold_id,
        kind=HoldKind.MOUNT,
        domain_uuid=folder.parent.name,
        backup_id=folder.name,
        created=datetime.now(UTC),
        detail=f"mounted on {mountpoint}",
        disks=tuple(disks),
        directory=str(mountpoint),
        state_dir=str(state_dir),
    )
    repo.add_hold(hold)
    view = GuestView(state_dir)
    try:
        view = await open_view(folder, disks, state_dir, set(kernel_mounts.MOUNT_OPTIONS))
        hold = replace(hold, helper_pid=view.pid, devices=tuple(view.devices))
        repo.add_hold(hold)
        notes = list(view.notes)
        mounted = await _mount_volumes(view, disks, mountpoint, notes)
        if not mounted:
            # A hold on nothing to look at would keep prune off the chain
            # until someone thinks of `umount`: undone below, and said so.
            _nothing_mounted(hold.backup_id, notes)
    except BaseException:
        with contextlib.suppress(VirtBackupError):
            await _unmount_all(mountpoint)
        with contextlib.suppress(VirtBackupError):
            await close_view(view.pid, view.devices, state_dir)
        repo.drop_hold(hold)
        raise
    log.info(
        "backup mounted",
        domain_uuid=hold.domain_uuid,
        backup_id=hold.backup_id,
        mountpoint=str(mountpoint),
        volumes=len(mounted),
    )
    return MountResult(hold, tuple(mounted), tuple(notes))


def _check_mountpoint(mountpoint: Path) -> None:
    if not mountpoint.is_dir():
        raise InputError(f"{mountpoint}: no such folder (create it, empty, to mount on)")
    if kernel_mounts.is_mount_point(mountpoint):
        raise InputError(f"{mountpoint} is already a mount point; `virtbackup umount` it first")
    if any(mountpoint.iterdir()):
        raise InputError(f"{mountpoint} is not empty; mount on an empty folder")


async def _mount_volumes(
    view: GuestView, disks: Sequence[str], mountpoint: Path, notes: list[str]
) -> list[Mounted]:
    """Mount each volume of `view` with a filesystem this host knows
    below `mountpoint` (a tmpfs, read-only once its folders are made);
    what is not mounted, and why, is added to `notes`."""
    await kernel_mounts.mount_tmpfs(mountpoint)
    mounted = []
    for disk in disks:
        (mountpoint / disk).mkdir(exist_ok=True)
    shown = []
    for v in view.volumes:
        if v.device is None or v.fstype is None:
            what = v.fstype or "no filesystem this host knows"
            notes.append(f"{v.region.label}: not mounted: {what}")
            continue
        (mountpoint / v.region.label).mkdir(parents=True, exist_ok=True)
        shown.append(v)
    await kernel_mounts.remount_read_only(mountpoint)  # the folders too
    for v in shown:
        assert v.device is not None
        assert v.fstype is not None
        target = mountpoint / v.region.label
        try:
            await kernel_mounts.mount(v.device, v.fstype, target)
        except ProcessError as exc:
            notes.append(f"{v.region.label}: not mounted: {exc}")
            continue
        mounted.append(Mounted(v.region.label, v.fstype, target))
    return mounted


def _nothing_mounted(backup_id: str, notes: Sequence[str]) -> None:
    raise VirtBackupError(
        f"backup {backup_id}: no filesystem could be mounted "
        f"({'; '.join(notes) or 'no volume found'}); nothing is left mounted or held"
    )


async def _unmount_all(mountpoint: Path) -> None:
    for point in kernel_mounts.mounts_under(mountpoint):
        await kernel_mounts.unmount(point)


def mount_holds(repos: Sequence[Repository]) -> list[tuple[Repository, Hold]]:
    return [(r, h) for r in repos for h in r.holds() if h.kind is HoldKind.MOUNT]


async def umount(repos: Sequence[Repository], mountpoint: Path) -> Hold:
    """Release everything `mount` made for `mountpoint`."""
    mountpoint = mountpoint.absolute()
    found = [(r, h) for r, h in mount_holds(repos) if h.directory == str(mountpoint)]
    if not found:
        raise InputError(f"{mountpoint} is not a virtbackup mount (`virtbackup status` lists them)")
    repo, hold = found[0]
    await release_mount(repo, hold)
    return hold


async def release_mount(repo: Repository, hold: Hold) -> None:
    assert hold.directory is not None
    assert hold.state_dir is not None
    await _unmount_all(Path(hold.directory))
    await close_view(hold.helper_pid, hold.devices, Path(hold.state_dir))
    repo.drop_hold(hold)
    log.info(
        "backup unmounted",
        domain_uuid=hold.domain_uuid,
        backup_id=hold.backup_id,
        mountpoint=hold.directory,
    )


def mount_alive(hold: Hold) -> bool:
    """Is the mount still there (its helper runs, or its mount point is mounted)?"""
    assert hold.directory is not None
    if hold.helper_pid is not None and fuse_export.alive(hold.helper_pid):
        return True
    return bool(kernel_mounts.mounts_under(Path(hold.directory)))


def forget_vanished_mounts(repos: Sequence[Repository]) -> None:
    """The daemon's part: drop the holds of mounts whose runtime folder is
    gone (the host restarted: /run is empty). It does not look further: it
    runs in a mount namespace of its own, without the right to unmount;
    `umount`, `status` and `prune` release the others."""
    for repo, hold in mount_holds(repos):
        if hold.state_dir is not None and not Path(hold.state_dir).exists():
            repo.drop_hold(hold)
            log.info("mount hold released: the host restarted", mountpoint=hold.directory)


async def settle_mounts(repos: Sequence[Repository]) -> None:
    """Release the holds of mounts that are gone (the host restarted)."""
    for repo, hold in mount_holds(repos):
        if not mount_alive(hold):
            with contextlib.suppress(VirtBackupError):
                await release_mount(repo, hold)


# --- verify --filesystems --------------------------------------------------------------


@dataclass(frozen=True)
class FsVerdict:
    label: str
    fstype: str | None
    ok: bool | None  # None: not checked (no checker for it, or nothing there)
    detail: str


async def check_filesystems(
    folder: Path, disks: Sequence[str], runtime_dir: Path
) -> tuple[list[FsVerdict], list[str]]:
    """Run each found filesystem's read-only check; the verdicts and what
    could not be looked at."""
    state_dir = runtime_dir / FSCHECK / secrets.token_hex(6)
    host_folders.make_folder(runtime_dir / FSCHECK)
    view = await open_view(folder, disks, state_dir, set(disk_probes.FSCK), detached=False)
    out = []
    try:
        for v in view.volumes:
            if v.device is None or v.fstype is None:
                out.append(
                    FsVerdict(v.region.label, v.fstype, None, "not checked: no checker for it")
                )
                continue
            r = await disk_probes.check_filesystem(v.device, v.fstype)
            tool = disk_probes.FSCK[v.fstype][0][0]
            detail = "clean" if r.clean else f"{tool} exit {r.exit_code}: {_gist(r.output)}"
            out.append(FsVerdict(v.region.label, v.fstype, r.clean, detail))
    finally:
        await close_view(view.pid, view.devices, state_dir)
    return out, view.notes


async def sweep_checks(runtime_dir: Path, now: Callable[[], float] = time.time) -> list[Path]:
    """Release what filesystem checks of dead processes left (their
    exports' dead FUSE mounts, loop devices, folders); the folders
    released."""
    released = []
    for state_dir in sorted((runtime_dir / FSCHECK).glob("*")):
        if not state_dir.is_dir() or not nbd_folders.owner_gone(state_dir, now()):
            continue
        pid: int | None = None
        with contextlib.suppress(OSError, ValueError):
            pid = int((state_dir / "qsd.pid").read_text().strip())
        if pid is not None and str(state_dir) not in " ".join(procfs.cmdline(pid)):
            pid = None  # not our daemon (a recycled pid): leave it alone
        try:
            await close_view(pid, kernel_mounts.loops_backed_under(state_dir), state_dir)
        except VirtBackupError as exc:
            log.warning("releasing a dead check's exports failed", folder=str(state_dir),
                        error=str(exc))  # fmt: skip
            continue
        released.append(state_dir)
    return released


def _gist(output: str, lines: int = 3) -> str:
    """The first lines of a checker's complaint, for a one-line report."""
    useful = [line.strip() for line in output.splitlines() if line.strip()]
    return " | ".join(useful[:lines]) or "(no output)"
