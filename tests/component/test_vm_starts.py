"""The handshake between an offline backup and the libvirt hook, run for
real (the shipped shell script, flock, files) in a folder of the test's own.
The same script under the real libvirtd: tests/integration/test_vm_wins.py."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from virtbackupd.engine import vm_starts
from virtbackupd.errors import BackupBusyError, DomainStartingError

HOOK = Path(__file__).parents[2] / "libvirt-hooks" / "qemu.d" / "virtbackupd"
UUID = "2f1e6f5c-4f7e-4d43-9d0f-0c1a5b7e9a11"
XML = f"<domain type='qemu'>\n  <name>web01</name>\n  <uuid>{UUID}</uuid>\n</domain>\n"


def hook(folder: Path, op: str, sub: str, xml: str = XML) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(HOOK), "web01", op, sub, "-"],
        input=xml,
        text=True,
        capture_output=True,
        env={"PATH": os.environ["PATH"], "VIRTBACKUPD_HOOK_DIR": str(folder)},
        timeout=90,
    )


def test_an_offline_backup_is_refused_while_the_domain_starts(tmp_path: Path) -> None:
    assert hook(tmp_path, "prepare", "begin").returncode == 0
    assert vm_starts.starting(UUID, tmp_path)
    with (
        pytest.raises(DomainStartingError, match="web01 is being started") as err,
        vm_starts.hold_images(UUID, "web01", tmp_path),
    ):
        pass
    assert isinstance(err.value, BackupBusyError)  # so the daemon retries it
    # Once QEMU runs (or gave up), the marker goes and backups may begin.
    assert hook(tmp_path, "started", "begin").returncode == 0
    assert not vm_starts.starting(UUID, tmp_path)
    with vm_starts.hold_images(UUID, "web01", tmp_path):
        pass


def test_a_marker_left_by_a_dead_libvirtd_does_not_block_backups_forever(tmp_path: Path) -> None:
    assert hook(tmp_path, "prepare", "begin").returncode == 0
    old = time.time() - vm_starts.STARTING_FRESH_S - 1
    os.utime(tmp_path / f"{UUID}.starting", (old, old))
    assert not vm_starts.starting(UUID, tmp_path)
    with vm_starts.hold_images(UUID, "web01", tmp_path):
        pass


def test_a_start_waits_in_the_hook_until_the_backup_let_go(tmp_path: Path) -> None:
    """The hook returns (and QEMU opens the images) only once the offline
    backup that held them has left `hold_images`, i.e. after its clean-up."""
    held = threading.Event()
    release = threading.Event()
    left_at: list[float] = []

    def backup() -> None:
        with vm_starts.hold_images(UUID, "web01", tmp_path):
            held.set()
            # The job's monitor notices the start...
            deadline = time.monotonic() + 10
            while not vm_starts.starting(UUID, tmp_path):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            release.wait(10)  # ...and cleans up
            left_at.append(time.monotonic())

    t = threading.Thread(target=backup)
    t.start()
    assert held.wait(10)
    timer = threading.Timer(1.0, release.set)
    timer.start()
    result = hook(tmp_path, "prepare", "begin")
    returned = time.monotonic()
    t.join(10)
    assert result.returncode == 0, result.stderr
    assert left_at and returned >= left_at[0]


def test_the_hook_never_stands_in_the_way(tmp_path: Path) -> None:
    """Operations it does not handle, a missing folder, XML without a UUID:
    exit 0 at once, nothing written."""
    for op, sub in [("start", "begin"), ("stopped", "end"), ("migrate", "begin")]:
        assert hook(tmp_path, op, sub).returncode == 0
    assert list(tmp_path.iterdir()) == []
    assert hook(tmp_path / "absent", "prepare", "begin").returncode == 0
    assert not (tmp_path / "absent").exists()
    assert hook(tmp_path, "prepare", "begin", xml="<domain/>").returncode == 0
    assert list(tmp_path.iterdir()) == []


def test_images_held_elsewhere_are_busy_not_an_os_error(tmp_path: Path) -> None:
    """A second hold of the same images (the hook's momentary hold of
    `.offline` during a start's "prepare", or another offline job) was a
    raw BlockingIOError: a traceback, or "Resource temporarily unavailable"."""
    with (
        vm_starts.hold_images(UUID, "web01", tmp_path),
        pytest.raises(DomainStartingError, match="held by a VM start or another offline backup"),
        vm_starts.hold_images(UUID, "web01", tmp_path),
    ):
        pass
