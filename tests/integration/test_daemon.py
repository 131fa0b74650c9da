"""virtbackupd as a subprocess against real libvirtd: event-triggered
backups, sd_notify, and a clean stop on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import time
from pathlib import Path

from testbed.domains import DomainFactory, MiB
from testbed.guest import GuestWriter
from testbed.tools import assert_restores


async def _backups(config: Path) -> list[dict]:  # type: ignore[type-arg]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "virtbackupd.cli.main",
        "-c",
        str(config),
        "--json",
        "list",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await proc.communicate()
    return json.loads(out) if proc.returncode == 0 else []  # type: ignore[no-any-return]


async def _wait_backups(config: Path, n: int, timeout: float = 60) -> list[dict]:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [b for b in await _backups(config) if b["status"] != "running"]
        if len(done) >= n:
            return done
        await asyncio.sleep(0.5)
    raise AssertionError(f"fewer than {n} finished backups after {timeout}s")


def _notes(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


async def test_daemon_backs_up_on_define_and_shutdown_then_stops(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.setblocking(False)
    (config.parent / "policies" / "p.yaml").write_text(
        "domains: ['vbtest-*']\nevents: {on_define: full, on_shutdown: incremental}\n"
    )
    env = {"NOTIFY_SOCKET": str(notify_path), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "virtbackupd.daemon.main",
        "-c",
        str(config),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not any("READY=1" in n for n in _notes(notify)):
            assert time.monotonic() < deadline, "no READY=1 from the daemon"
            assert proc.returncode is None
            await asyncio.sleep(0.1)
        td = await asyncio.to_thread(domains.create, qcow2_sizes=[16 * MiB])
        guest = GuestWriter(td)
        first = await _wait_backups(config, 1)
        assert first[0]["level"] == "full"
        assert first[0]["status"] == "complete"
        await asyncio.to_thread(guest.write, "vda", MiB, MiB, 0x61)
        # destroy: QEMU gets SIGTERM and closes its images, a clean stop
        # ("destroyed") that triggers the on-shutdown backup, taken offline.
        await asyncio.to_thread(td.dom.destroy)
        both = await _wait_backups(config, 2)
        assert both[1]["level"] == "incremental"
        assert both[1]["status"] == "complete"
        assert_restores(
            Path(both[1]["path"]), [(d["name"], d["path"]) for d in both[1]["disks"]], td, tmp_path
        )
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
        assert proc.returncode == 0
        assert any("STOPPING=1" in n for n in _notes(notify))
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        notify.close()
        assert proc.stderr is not None
        log = (await proc.stderr.read()).decode()
        print(log)
        assert "Traceback" not in log
