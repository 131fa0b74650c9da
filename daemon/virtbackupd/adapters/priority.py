"""The process's CPU and I/O priority: backups yield to the guests.

The daemon and the CLI lower their own priority at start; the helper
processes they start (qemu-nbd, qemu-img) inherit it. The systemd unit sets
the same values (Nice=, IOSchedulingClass=, IOSchedulingPriority=), so a
daemon started by systemd finds them already in place. What QEMU itself
does for a pull-mode export (reading the guest's disk, copy-before-write)
runs in the guest's QEMU and keeps the guest's priority.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

# The setting itself (`priority: low|normal`) is a config value; this module
# carries it out.
from virtbackupd.config.daemon import Priority as Priority
from virtbackupd.errors import VirtBackupError

# ioprio_set(2)/ioprio_get(2): no wrapper in glibc or Python.
_SYS_IOPRIO_SET = 251  # x86_64
_SYS_IOPRIO_GET = 252
_IOPRIO_WHO_PROCESS = 1
_CLASS_SHIFT = 13
_IO_CLASSES = {"none": 0, "realtime": 1, "best-effort": 2, "idle": 3}


@dataclass(frozen=True)
class Settings:
    nice: int
    io_class: str
    io_level: int


# The values of `priority: low`; systemd/virtbackupd.service says the same.
LOW = Settings(nice=10, io_class="best-effort", io_level=7)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def io_priority(pid: int = 0) -> tuple[str, int]:
    """(class, level) of a process (0: this one)."""
    value = _libc().syscall(_SYS_IOPRIO_GET, _IOPRIO_WHO_PROCESS, pid)
    if value < 0:
        raise VirtBackupError(f"ioprio_get: {os.strerror(ctypes.get_errno())}")
    names = {v: k for k, v in _IO_CLASSES.items()}
    return names[value >> _CLASS_SHIFT], value & ((1 << _CLASS_SHIFT) - 1)


def apply(priority: Priority) -> None:
    """Lower this process's priority (never raise it: a process started at
    a lower one, e.g. by an operator's `nice`, keeps it)."""
    if priority is Priority.NORMAL:
        return
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if current < LOW.nice:
        os.setpriority(os.PRIO_PROCESS, 0, LOW.nice)
    io_class, level = io_priority()
    if io_class in ("none", "realtime") or (io_class == "best-effort" and level < LOW.io_level):
        value = (_IO_CLASSES[LOW.io_class] << _CLASS_SHIFT) | LOW.io_level
        if _libc().syscall(_SYS_IOPRIO_SET, _IOPRIO_WHO_PROCESS, 0, value) < 0:
            raise VirtBackupError(f"ioprio_set: {os.strerror(ctypes.get_errno())}")
