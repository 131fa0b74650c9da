"""What an operator reads from a scheduled daemon's day: one line per
outcome at the right priority, DOMAIN and BACKUP_ID on every line about a
backup, a reload that says what it loaded (and what it rejected), an
operator's cancel as a notice, a deliberate `raw: full` as information,
nothing above debug about a domain no policy governs, and nothing in
libvirtd's own log from a routine backup (its scratch files are removed
only after libvirt has let go of them).

The daemon logs JSON lines here; under systemd the same keys become the
journal's fields (adapters/journald.py, tested in
tests/component/test_systemd_protocols.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

from testbed.daemon import Daemon, backups, cli, wait_backups, wait_running
from testbed.domains import DomainFactory, MiB, wait_until
from testbed.guest import GuestWriter
from testbed.host import LIBVIRTD_LOG
from virtbackupd.config.daemon import load_config

#: The events that end a backup; exactly one per backup.
OUTCOMES = {"backup complete", "backup done", "backup failed", "backup cancelled"}
ABOVE_DEBUG = {"info", "notice", "warning", "error", "critical"}


def lines(log: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in log.splitlines() if x.startswith("{")]


async def wait_line(daemon: Daemon, event: str, after: int, timeout: float = 60) -> dict[str, Any]:
    """The first line of `event` among the log lines after the first `after`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = [x for x in lines(daemon.read_log())[after:] if x.get("event") == event]
        if found:
            return found[0]
        assert loop.time() < deadline, f"no {event!r} line: {daemon.read_log()[-3000:]}"
        await asyncio.sleep(0.2)


async def ended(config: Path, backup_id: str, timeout: float = 60) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = [b for b in await backups(config) if b["id"] == backup_id]
        if found and found[0]["status"] != "running":
            return found[0]
        assert loop.time() < deadline, f"backup {backup_id} still running: {found}"
        await asyncio.sleep(0.3)


def kill_qemu(name: str) -> None:
    """SIGKILL the domain's QEMU: libvirt reports it stopped, 'failed'."""
    pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())
    os.kill(pid, signal.SIGKILL)


async def test_a_scheduled_day_in_the_journal(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    assert LIBVIRTD_LOG.exists(), f"libvirtd's log is not at {LIBVIRTD_LOG} (see TESTBED.md)"
    libvirtd_from = LIBVIRTD_LOG.stat().st_size
    config.write_text(config.read_text() + "log: {format: json}\n")
    scratch_dir = str(load_config(config).scratch_dir)
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[64 * MiB], raw_size=8 * MiB)
    other = await asyncio.to_thread(domains.create, qcow2_sizes=[8 * MiB])  # no policy's
    guest = GuestWriter(td)
    await asyncio.to_thread(guest.write, "vda", 0, MiB, 0x41)
    policies = config.parent / "policies"
    policy = f"domains: [{td.name}]\nschedule: {{incremental: '* * * * *'}}\ndisks: {{raw: full}}\n"
    (policies / "p.yaml").write_text(policy)
    daemon = Daemon(config, tmp_path)
    try:
        await daemon.start()
        [first] = await wait_backups(config, 1, timeout=150)  # at the next minute
        assert first["status"] == "complete", first

        # A broken file beside the good one: the reload keeps the previous
        # policies and says which file it rejected.
        seen = len(lines(daemon.read_log()))
        (policies / "broken.yaml").write_text("domains: [x]\nevents: {on_define: fulll}\n")
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        kept = await wait_line(daemon, "reload rejected; the previous policies stay", seen)
        assert kept["level"] == "warning", kept
        assert kept["rejected"] == [str(policies / "broken.yaml")], kept
        assert kept["governed"] == [td.name], kept

        # Fixed (and slowed down, so that the next run can be cancelled):
        # the reload says what it loaded and what governs.
        seen = len(lines(daemon.read_log()))
        (policies / "broken.yaml").unlink()
        (policies / "p.yaml").write_text(policy + "bandwidth: 1MiB\n")
        await asyncio.to_thread(guest.write, "vda", 2 * MiB, 40 * MiB, 0x42)
        daemon.proc.send_signal(signal.SIGHUP)
        loaded = await wait_line(daemon, "policies reloaded", seen)
        assert loaded["level"] == "info", loaded
        assert loaded["files"] == [str(policies / "p.yaml")], loaded
        assert loaded["governed"] == [td.name], loaded
        assert loaded["rejected"] == [], loaded

        # A domain no policy governs crashes: not the operator's concern here.
        await asyncio.to_thread(kill_qemu, other.name)
        await asyncio.to_thread(
            wait_until, lambda: not other.dom.isActive(), 30, "the killed domain to stop"
        )

        running = await wait_running(config, timeout=150)  # the next minute's run
        cfg = load_config(config)
        await asyncio.to_thread(
            wait_until,
            lambda: any((cfg.runtime_dir / "jobs").glob("*/nbd.sock")),
            60,
            "the copy to start",
        )
        rc, _, err = await cli(config, "cancel", td.name)
        assert rc == 0, err
        cancelled = await ended(config, running["id"])
        assert cancelled["status"] == "failed", cancelled
        assert await daemon.stop() == 0
    finally:
        daemon.close()

    log = lines(daemon.log)
    for b in await backups(config):
        outcome = [x for x in log if x.get("event") in OUTCOMES and x.get("backup_id") == b["id"]]
        assert len(outcome) == 1, (b["id"], outcome)
        assert outcome[0]["domain"] == td.name, outcome
    # Every outcome line names its backup (none is logged twice, once without it).
    assert all(x.get("backup_id") for x in log if x.get("event") in OUTCOMES), log
    [cancel] = [x for x in log if x.get("event") in OUTCOMES and x["backup_id"] == running["id"]]
    assert cancel["level"] == "notice", cancel
    assert cancel["event"] == "backup cancelled", cancel
    # Nothing about these backups is a warning or an error.
    about = [x for x in log if "domain" in x or "backup_id" in x]
    assert not [x for x in about if x["level"] in ("warning", "error", "critical")], about
    # raw: full is the policy's choice: information, once per backup.
    raw = [x for x in log if x.get("event") == "disk copied in full"]
    assert raw and all(x["level"] == "info" and x["disk"] == "vdb" for x in raw), raw
    # Nothing about the ungoverned domain above debug.
    assert not [x for x in log if other.name in json.dumps(x)], log

    with LIBVIRTD_LOG.open("rb") as f:
        f.seek(libvirtd_from)
        new = f.read().decode(errors="replace").splitlines()
    ours = [x for x in new if scratch_dir in x and (": error :" in x or ": warning :" in x)]
    assert not ours, "\n".join(ours)
