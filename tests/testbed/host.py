"""libvirtd on this host: make sure it answers, never start a second one."""

from __future__ import annotations

import subprocess
from pathlib import Path

import libvirt

URI = "qemu:///system"
REPO = Path(__file__).resolve().parents[2]
#: Where libvirtd (started by scripts/ensure-libvirtd.sh, `libvirtd -d`, the
#: Debian defaults) writes its errors and warnings on these machines.
LIBVIRTD_LOG = Path("/var/log/libvirt/libvirtd.log")


def ensure_libvirtd() -> None:
    """Start virtlogd/libvirtd only if none is running (scripts/ensure-libvirtd.sh)."""
    proc = subprocess.run(
        [str(REPO / "scripts" / "ensure-libvirtd.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"libvirtd is not available on {URI}: {proc.stderr.strip()}")


def _silence(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr unless a handler is set; tests read
    the exceptions instead."""


def connect() -> libvirt.virConnect:
    libvirt.registerErrorHandler(_silence, None)
    return libvirt.open(URI)


def stop_libvirtd(timeout: float = 10) -> None:
    """SIGTERM libvirtd and wait until it is gone (running guests survive;
    ensure_libvirtd() starts it again)."""
    import time

    subprocess.run(["pkill", "-TERM", "-x", "libvirtd"], check=True)
    deadline = time.monotonic() + timeout
    while (
        subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True, check=False).returncode
        == 0
    ):
        if time.monotonic() > deadline:
            raise RuntimeError(f"libvirtd still running {timeout}s after SIGTERM")
        time.sleep(0.1)
