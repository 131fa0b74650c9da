"""Do no harm (issue 12): a VM start always wins over an offline backup,
through the shipped libvirt hook installed in the real libvirtd
(scripts/bootstrap.sh installs it as docs/operations.md says)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import libvirt_qemu

from testbed.daemon import Daemon, backups, wait_running
from testbed.domains import DomainFactory, GuestDomain, MiB
from testbed.guest import GuestWriter
from testbed.tools import assert_restores
from virtbackupd.engine import vm_starts


def policy(config: Path, text: str) -> None:
    (config.parent / "policies" / "p.yaml").write_text(text)


def live_bitmaps(td: GuestDomain) -> set[str]:
    """Our bitmaps in the running QEMU (QMP query-block)."""
    out = json.loads(libvirt_qemu.qemuMonitorCommand(td.dom, '{"execute": "query-block"}', 0))
    return {
        b["name"]
        for dev in out["return"]
        for b in dev.get("inserted", {}).get("dirty-bitmaps", [])
        if b["name"].startswith("virtbackupd-")
    }


def timed_start(td: GuestDomain) -> float:
    t0 = time.monotonic()
    td.start()
    return time.monotonic() - t0


T = TypeVar("T")


async def until(predicate: Callable[[], Awaitable[T | None]], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"no {what} after {timeout}s"
        await asyncio.sleep(0.3)


async def test_a_vm_start_wins_over_an_offline_backup(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    """An operator types `virsh start` once, during a long offline copy: the
    start succeeds within seconds, the backup ends as cancelled with nothing
    trusted left, and the domain gets its backup online without anyone."""
    assert vm_starts.hook_installed(), "scripts/bootstrap.sh installs the hook"
    policy(config, "domains: ['vbtest-*']\nbandwidth: 1MiB\nevents: {on_shutdown: full}\n")
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[64 * MiB])
    await asyncio.to_thread(GuestWriter(td).write, "vda", 0, 24 * MiB, 0x5A)
    # How long a start takes here without any backup, for comparison.
    await asyncio.to_thread(td.dom.destroy)
    baseline = await asyncio.to_thread(timed_start, td)
    d = Daemon(config, tmp_path)
    try:
        await d.start()
        await asyncio.to_thread(td.dom.destroy)
        offline = await wait_running(config)
        await asyncio.sleep(2)  # well into the copy (24 MiB at 1 MiB/s)
        assert (await backups(config))[0]["status"] == "running"
        took = await asyncio.to_thread(timed_start, td)
        assert td.is_running()
        print(f"start during the offline backup: {took:.2f}s, without a backup: {baseline:.2f}s")
        assert took < baseline + 5, f"start took {took:.1f}s (without a backup {baseline:.1f}s)"

        async def ended() -> dict[str, Any] | None:
            rec = next(b for b in await backups(config) if b["id"] == offline["id"])
            return rec if rec["status"] != "running" else None

        first = await until(ended, 30, "end of the offline backup")
        assert first["status"] == "failed", first
        assert "the domain was started" in first["error"]
        assert not Path(first["path"]).exists()
        assert not list(Path(first["path"]).parent.glob("*.partial"))
        assert first["checkpoint"] not in [c.getName() for c in td.dom.listAllCheckpoints()]

        async def online() -> dict[str, Any] | None:
            done = [b for b in await backups(config) if b["status"] == "complete"]
            return done[0] if done else None

        second = await until(online, 90, "online backup after the start")
        assert second["level"] == "full"
        assert f"domain={td.name} online=True" in d.read_log()
        assert_restores(
            Path(second["path"]), [(x["name"], x["path"]) for x in second["disks"]], td, tmp_path
        )
        # No bitmap of the cancelled backup in the running QEMU: only the
        # online backup's checkpoint tracks writes.
        assert live_bitmaps(td) == {second["checkpoint"]}
        assert await d.stop() == 0
        assert "Traceback" not in d.log
    finally:
        d.close()


async def test_define_then_start_at_once_gets_its_first_backup(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    """What virt-install does: define, then start within a second, under
    `on_define: full`. The start never fails because of the daemon, and the
    first backup arrives, online."""
    policy(config, "domains: ['vbtest-*']\nevents: {on_define: full}\n")
    d = Daemon(config, tmp_path)
    tds = []
    try:
        await d.start()
        for delay in (0.0, 0.3, 0.8):
            td = await asyncio.to_thread(domains.create, qcow2_sizes=[16 * MiB], start=False)
            await asyncio.sleep(delay)
            await asyncio.to_thread(td.start)  # raises if QEMU could not lock an image
            tds.append(td)

        async def all_backed_up() -> list[dict[str, Any]] | None:
            done = [b for b in await backups(config) if b["status"] == "complete"]
            names = {b["domain"] for b in done}
            return done if names >= {t.name for t in tds} else None

        done = await until(all_backed_up, 120, "first backup of every domain")
        for td in tds:
            first = next(b for b in done if b["domain"] == td.name)
            assert_restores(
                Path(first["path"]), [(x["name"], x["path"]) for x in first["disks"]], td, tmp_path
            )
        for b in await backups(config):
            assert b["status"] == "complete" or "the domain was started" in (b["error"] or ""), b
        assert await d.stop() == 0
    finally:
        d.close()
