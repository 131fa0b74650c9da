"""The host kernel's side of showing a guest filesystem: read-only loop
devices over a byte range of a file, read-only mounts that never replay a
journal, and what is mounted where (/proc/self/mountinfo)."""

from __future__ import annotations

from pathlib import Path

from virtbackupd.adapters.qemu_img import run_tool
from virtbackupd.errors import ProcessError

#: Mount options per filesystem type: read-only, and no journal replay
#: (the device is read-only anyway; these keep the kernel from trying).
MOUNT_OPTIONS = {
    "ext2": "ro,noload",
    "ext3": "ro,noload",
    "ext4": "ro,noload",
    "xfs": "ro,norecovery,nouuid",  # nouuid: two backups of one fs at once
    "vfat": "ro",
    "exfat": "ro",
    "btrfs": "ro,rescue=nologreplay",
}


async def attach(file: Path, offset: int, size: int) -> str:
    """A read-only loop device over `size` bytes of `file` from `offset`."""
    out = await run_tool(
        [
            "losetup",
            "--find",
            "--show",
            "--read-only",
            "--offset",
            str(offset),
            "--sizelimit",
            str(size),
            str(file),
        ],
        f"losetup {file}",
    )
    return out.strip()


def loops_backed_under(top: Path) -> list[str]:
    """The loop devices whose backing file is below `top` (what a killed
    check left attached to its exports)."""
    root = str(top.resolve())
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            path = backing.read_text().strip().removesuffix(" (deleted)")
        except OSError:
            continue
        if path == root or path.startswith(root + "/"):
            found.append(f"/dev/{backing.parent.parent.name}")
    return sorted(found)


async def detach(device: str) -> None:
    try:
        await run_tool(["losetup", "--detach", device], f"losetup --detach {device}")
    except ProcessError:
        if Path(f"/sys/block/{Path(device).name}/loop").exists():
            raise  # still attached: say so


def kernel_has(fstype: str) -> bool:
    for line in Path("/proc/filesystems").read_text().splitlines():
        if line.split() and line.split()[-1] == fstype:
            return True
    return False


async def mount(device: str, fstype: str, target: Path) -> None:
    if fstype == "vfat" and not kernel_has("vfat"):
        # A kernel built without FAT (cloud kernels): fusefat reads it in
        # user space, read-only; the process ends with its unmount.
        await run_tool(["fusefat", "-o", "ro", device, str(target)], f"fusefat {device}")
        return
    await run_tool(
        ["mount", "-t", fstype, "-o", MOUNT_OPTIONS[fstype], device, str(target)],
        f"mount {device} ({fstype}) on {target}",
    )


async def mount_tmpfs(target: Path) -> None:
    """A small tmpfs to hold the mount point folders: nothing is created
    in the operator's own filesystem below MOUNTPOINT. Root's alone (0700):
    the guest's files carry the guest's user ids, which may be other
    people's on this host."""
    await run_tool(
        ["mount", "-t", "tmpfs", "-o", "mode=0700,size=1m", "virtbackup", str(target)],
        f"mount tmpfs on {target}",
    )


async def remount_read_only(target: Path) -> None:
    await run_tool(["mount", "-o", "remount,ro", str(target)], f"remount {target} read-only")


async def unmount(target: Path) -> None:
    await run_tool(["umount", str(target)], f"umount {target}")


def mounts_under(top: Path) -> list[Path]:
    """Mount points at or below `top`, deepest first."""
    top = top.resolve()
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        point = Path(fields[4].replace("\\040", " "))
        if point == top or top in point.parents:
            found.append(point)
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def is_mount_point(path: Path) -> bool:
    return path.resolve() in mounts_under(path)[-1:]
