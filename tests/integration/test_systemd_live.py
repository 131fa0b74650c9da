"""The shipped unit, run for real. systemd is not PID 1 on the test bed,
so the test starts a private systemd as PID 1 of its own PID and mount
namespace, whose unit folder holds the shipped `systemd/virtbackupd.service`
unchanged, and takes real backups through it.

virtbackupd is installed the way docs/operations.md says: a venv in /opt
made from the distribution's Python (the developer's venv lives under
/root, which the unit's ProtectHome= hides, as it would on a real host).
The drop-in changes only where the program and its config live and where
its output goes (no journald here); every sandbox setting is the unit's.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.daemon import cli
from testbed.domains import DomainFactory, MiB
from testbed.guest import GuestWriter
from testbed.tools import assert_restores

REPO = Path(__file__).resolve().parents[2]
INSTALL = Path("/opt/virtbackupd-testbed")
IMAGES = Path("/var/lib/libvirt/images")
RUN_SYSTEMD = Path("/run/systemd")


def _install() -> Path:
    """pip install of this checkout into a venv of Debian's python3 (cached
    while the sources are unchanged)."""
    digest = hashlib.sha256()
    for f in sorted([REPO / "pyproject.toml", *(REPO / "daemon").rglob("*.py")]):
        digest.update(f.read_bytes())
    stamp = INSTALL / f".installed-{digest.hexdigest()[:16]}"
    if not stamp.exists():
        shutil.rmtree(INSTALL, ignore_errors=True)
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(INSTALL)], check=True)
        subprocess.run(
            [str(INSTALL / "bin" / "pip"), "install", "-q", str(REPO)], check=True, timeout=600
        )
        stamp.touch()
    return INSTALL / "bin" / "virtbackupd"


class PrivateSystemd:
    """systemd as PID 1 of a new PID and mount namespace, seeing only the
    units of `units` (the host's unit folders are covered by bind mounts
    inside the namespace; nothing of the host's changes)."""

    def __init__(self, units: Path, log: Path) -> None:
        self.units = units
        self.log = log
        self.pid = 0  # systemd's pid as the host sees it
        # What systemd leaves in the shared /run/systemd (e.g. system/, which
        # tells tools that systemd booted the host) goes again at stop.
        self.run_before = set(RUN_SYSTEMD.iterdir()) if RUN_SYSTEMD.is_dir() else set()

    def start(self) -> None:
        empty = self.units.parent / "empty"
        empty.mkdir(exist_ok=True)
        # /run bound onto itself: systemd mounts a fresh tmpfs on /run only
        # where it is no mount point, which would hide libvirt's socket and
        # our runtime dir (QEMU, outside, must see its NBD socket there).
        script = (
            "mount --bind /run /run && "
            f"mount --bind {self.units} /lib/systemd/system && "
            f"mount --bind {empty} /etc/systemd/system && "
            "exec /lib/systemd/systemd --system --unit=vbtest.target --log-target=console"
        )
        self._out = self.log.open("ab")
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount", "--mount-proc", "sh", "-c", script],
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while not self.pid:
            assert time.monotonic() < deadline, "the private systemd did not start"
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            if kids and Path(f"/proc/{kids[0]}/comm").read_text().strip() == "systemd":
                self.pid = int(kids[0])
            time.sleep(0.1)

    def systemctl(self, *args: str) -> str:
        out = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "-p", "systemctl", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        return out.stdout.strip()

    def stop(self) -> None:
        if self.pid:
            # PID 1 of the namespace: everything in it goes with it.
            subprocess.run(["kill", "-KILL", str(self.pid)], check=False)
        self.proc.wait(timeout=30)
        self._out.close()
        if RUN_SYSTEMD.is_dir():
            for entry in set(RUN_SYSTEMD.iterdir()) - self.run_before:
                subprocess.run(["umount", "-R", str(entry)], capture_output=True, check=False)
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """Inside the unit's StateDirectory (/var/lib/virtbackupd), one folder
    per test: the daemon may write there, and a real installation's files
    beside it are not touched."""
    folder = Path("/var/lib/virtbackupd") / f"testbed-{time.monotonic_ns()}"
    folder.mkdir(parents=True)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def _proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


@pytest.mark.timeout(600)  # an install into /opt, then a scheduled (every-minute) run
async def test_the_shipped_unit_runs_the_daemon_and_backs_up_under_its_sandbox(
    domains: DomainFactory, state_dir: Path, tmp_path: Path
) -> None:
    program = await asyncio.to_thread(_install)
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[16 * MiB], root=IMAGES)
    guest = GuestWriter(td)
    await asyncio.to_thread(guest.write, "vda", MiB, 2 * MiB, 0x61)
    (state_dir / "policies").mkdir()
    (state_dir / "policies" / "vm.yaml").write_text(
        f"domains: ['{td.name}']\n"
        "events: {on_shutdown: full}\n"
        "schedule: {incremental: '* * * * *'}\n"
    )
    config = state_dir / "virtbackupd.yaml"
    config.write_text(
        f"state_dir: {state_dir}\nbackup_root: {state_dir}/backups\n"
        "runtime_dir: /run/virtbackupd\npolicy_dirs: [policies]\n"
        "schedule: {jitter: 3}\n"
    )
    units = tmp_path / "units"
    shutil.copytree(REPO / "systemd", units)
    (units / "vbtest.target").write_text("[Unit]\nWants=virtbackupd.service\n")
    dropin = units / "virtbackupd.service.d"
    dropin.mkdir()
    unit_log = state_dir / "unit.log"
    (dropin / "testbed.conf").write_text(
        "[Service]\n"
        "ExecStart=\n"
        f"ExecStart={program} -c {config}\n"
        f"StandardOutput=append:{unit_log}\n"
        "StandardError=inherit\n"
    )
    assert (units / "virtbackupd.service").read_bytes() == (
        REPO / "systemd" / "virtbackupd.service"
    ).read_bytes()
    sd = PrivateSystemd(units, tmp_path / "systemd.log")
    await asyncio.to_thread(sd.start)
    try:
        # Type=notify: "active" only after READY=1.
        await asyncio.to_thread(
            _wait,
            lambda: sd.systemctl("is-active", "virtbackupd") == "active",
            60,
            "virtbackupd.service never became active",
        )
        found = await asyncio.to_thread(
            subprocess.run, ["pgrep", "-f", f"{program} -c {config}"], capture_output=True
        )
        pids = found.stdout.decode().split()
        assert pids, "the daemon process is not found"
        st = _proc_status(int(pids[0]))
        assert st["NoNewPrivs"] == "1"
        assert st["Seccomp"] == "2"  # SystemCallFilter= is in force
        assert int(st["CapBnd"], 16) == 0b1011  # CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER

        # Offline: the domain stops, the daemon adds a bitmap to its image
        # (ReadWritePaths) and copies it with qemu-nbd.
        await asyncio.to_thread(td.dom.destroy)
        env_cfg = config

        async def listed() -> list[dict[str, Any]]:
            rc, out, err = await cli(env_cfg, "--json", "list")
            assert rc == 0, err
            doc: list[dict[str, Any]] = json.loads(out)
            return doc

        deadline = time.monotonic() + 90
        while not [b for b in await listed() if b["status"] != "running"]:
            assert time.monotonic() < deadline, unit_log.read_text()[-3000:]
            await asyncio.sleep(1)
        first = (await listed())[0]
        assert first["status"] == "complete", (first["error"], unit_log.read_text()[-3000:])
        assert_restores(
            Path(first["path"]), [(d["name"], d["path"]) for d in first["disks"]], td, tmp_path
        )
        # Online: the domain runs again; the every-minute schedule takes a
        # pull-mode incremental (QEMU's NBD socket in the unit's runtime dir).
        await asyncio.to_thread(td.start)
        await asyncio.to_thread(guest.write, "vda", 8 * MiB, MiB, 0x62)
        deadline = time.monotonic() + 120
        while not [
            b for b in await listed() if b["level"] == "incremental" and b["status"] != "running"
        ]:
            assert time.monotonic() < deadline, unit_log.read_text()[-3000:]
            await asyncio.sleep(1)
        inc = next(b for b in await listed() if b["level"] == "incremental")
        assert inc["status"] == "complete", (inc["error"], unit_log.read_text()[-3000:])
        assert_restores(
            Path(inc["path"]), [(d["name"], d["path"]) for d in inc["disks"]], td, tmp_path
        )
        # systemctl stop: SIGTERM, a clean exit within TimeoutStopSec.
        sd.systemctl("stop", "virtbackupd")
        assert sd.systemctl("show", "-p", "Result", "--value", "virtbackupd") == "success"
        assert sd.systemctl("show", "-p", "ExecMainStatus", "--value", "virtbackupd") == "0"
    finally:
        await asyncio.to_thread(sd.stop)
    log = unit_log.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert "virtbackupd stopped" in log
