"""The host's block devices, as far as a restore onto one must know them:
is it a block device, how large is it, and is anything using it (a
mounted file system on it or on one of its partitions, a device-mapper
or md holder, any process that opened it exclusively)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from virtbackupd.errors import InputError


def check_block_device(path: Path) -> Path:
    """The device's real path; an InputError if it is not a block device."""
    try:
        st = path.stat()
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror or exc}") from exc
    if not stat.S_ISBLK(st.st_mode):
        raise InputError(f"{path} is not a block device (--to-device writes onto one)")
    return path.resolve()


def device_size(path: Path) -> int:
    """Size in bytes (what seeking to the end says)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def in_use(path: Path) -> str | None:
    """Why the device must not be written to, or None."""
    st = path.stat()
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    devices = {f"{major}:{minor}"} | _partitions(major, minor)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[2] in devices:
            return f"a file system on it is mounted on {fields[4]}"
    holders = Path(f"/sys/dev/block/{major}:{minor}/holders")
    if holders.is_dir() and any(holders.iterdir()):
        names = ", ".join(sorted(p.name for p in holders.iterdir()))
        return f"it is held by {names} (device-mapper, md or similar)"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return "another process holds it open exclusively"
        raise InputError(f"{path}: {exc.strerror or exc}") from exc
    os.close(fd)
    return None


def _partitions(major: int, minor: int) -> set[str]:
    """major:minor of the device's partitions (sysfs lists them as children)."""
    base = Path(f"/sys/dev/block/{major}:{minor}")
    out = set()
    if base.is_dir():
        for child in base.iterdir():
            dev = child / "dev"
            if (child / "partition").exists() and dev.exists():
                out.add(dev.read_text().strip())
    return out
