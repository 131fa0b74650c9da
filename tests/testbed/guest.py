"""Guest writes through the guest's own virtio device, mirrored into a raw
reference image that serves as the oracle for every restore comparison.

HMP ``qemu-io -d <qdev path>`` goes through the device's BlockBackend, so
QEMU's dirty bitmaps record these writes exactly as they record guest I/O.
"""

from __future__ import annotations

import time
from pathlib import Path

import libvirt_qemu

from .domains import Disk, GuestDomain

# Discards only deallocate whole qcow2 clusters; a partial one is ignored by
# QEMU, which the reference could not predict. Require cluster alignment.
CLUSTER = 64 * 1024


class GuestWriter:
    def __init__(self, domain: GuestDomain) -> None:
        self.domain = domain
        self.log: list[tuple[str, str, int, int]] = []  # (op, disk, offset, length)

    def _hmp(self, disk: Disk, command: str, expect: str) -> None:
        """Run qemu-io in the guest's QEMU and check it did what was asked.

        The monitor answers only errors of the HMP command itself; qemu-io's
        own report ("wrote ...", "write failed: ...") goes to QEMU's stdout,
        which libvirt keeps in the domain log. Read the log's new lines.
        """
        log = Path(f"/var/log/libvirt/qemu/{self.domain.name}.log")
        start = log.stat().st_size
        out: str = libvirt_qemu.qemuMonitorCommand(
            self.domain.dom,
            f'qemu-io -d {disk.qdev} "{command}"',
            libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP,
        )
        if out.strip():
            raise AssertionError(f"qemu-io {command!r} on {disk.target}: {out.strip()}")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with log.open("rb") as f:
                f.seek(start)
                new = f.read().decode(errors="replace")
            if "failed" in new or "not found" in new:
                raise AssertionError(f"qemu-io {command!r} on {disk.target}: {new.strip()}")
            if expect in new and new.endswith("\n"):
                return
            time.sleep(0.02)
        raise AssertionError(f"qemu-io {command!r} on {disk.target}: no report in {log}")

    def _check_range(self, disk: Disk, offset: int, length: int) -> None:
        if offset < 0 or length <= 0 or offset + length > disk.size:
            raise ValueError(f"range {offset}+{length} outside {disk.target} ({disk.size} bytes)")

    def _mirror(self, disk: Disk, offset: int, data: bytes) -> None:
        assert disk.reference is not None
        with disk.reference.open("r+b") as f:
            f.seek(offset)
            f.write(data)

    def write(self, target: str, offset: int, length: int, pattern: int) -> None:
        """Write `length` bytes of the byte `pattern` at `offset`."""
        disk = self.domain.disk(target)
        self._check_range(disk, offset, length)
        self._hmp(disk, f"write -P {pattern:#x} {offset} {length}", "wrote")
        self._mirror(disk, offset, bytes([pattern]) * length)
        self.log.append(("write", target, offset, length))

    def zero(self, target: str, offset: int, length: int) -> None:
        """Write zeroes (QEMU's write-zeroes request, not a data write)."""
        disk = self.domain.disk(target)
        self._check_range(disk, offset, length)
        self._hmp(disk, f"write -z {offset} {length}", "wrote")
        self._mirror(disk, offset, bytes(length))
        self.log.append(("zero", target, offset, length))

    def discard(self, target: str, offset: int, length: int) -> None:
        """Discard (TRIM) whole clusters; with discard='unmap' they read as zeroes."""
        disk = self.domain.disk(target)
        self._check_range(disk, offset, length)
        if offset % CLUSTER or length % CLUSTER:
            raise ValueError(f"discard {offset}+{length} is not {CLUSTER}-byte aligned")
        self._hmp(disk, f"discard {offset} {length}", "discard ")
        self._mirror(disk, offset, bytes(length))
        self.log.append(("discard", target, offset, length))
