"""The daemon left alone for five scheduled minutes on a host whose VMs
existed before it: several domains with `max_concurrent_backups` below
their number, guest writes, a domain stopped over a scheduled run and
started again, one restarted, one defined while the daemon runs, and a
libvirtd restart in between. Every scheduled run must end complete, every
backup must restore to a state its guest really had, `status` must say
what happened, and SIGTERM must exit 0.

Timing: schedules fire at the minute (plus up to 30 s of jitter) and these
small backups take seconds; the test acts between second 40 and 55 of
each minute, so that what each backup must contain is known. A backup
that does meet a write is still judged exactly: its point in time is
before or after each write (a write is one monitor command), so its
content must equal one of the guest's states during the backup."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from testbed.daemon import QUICK_SCHEDULE, Daemon, backups, cli_json, most_at_once
from testbed.domains import DomainFactory, GuestDomain, MiB
from testbed.guest import GuestWriter
from testbed.host import connect, ensure_libvirtd, stop_libvirtd

MINUTES = 5
SIZE = 16 * MiB


@dataclass
class History:
    """One domain's disk states over time: (write began, write done, copy
    of the reference after it), oldest first."""

    td: GuestDomain
    folder: Path
    initial: Path
    writes: list[tuple[datetime, datetime, Path]] = field(default_factory=list)
    defined: datetime = field(default_factory=lambda: datetime.now(UTC))

    def write(self, offset: int, pattern: int) -> None:
        began = datetime.now(UTC)
        GuestWriter(self.td).write("vda", offset, MiB, pattern)
        done = datetime.now(UTC)
        copy = self.folder / f"{self.td.name}-{len(self.writes)}.raw"
        ref = self.td.disk("vda").reference
        assert ref is not None
        shutil.copyfile(ref, copy)
        self.writes.append((began, done, copy))

    def candidates(self, start: datetime, end: datetime) -> list[Path]:
        """The states the disk may have had at a point in [start, end]."""
        before = self.initial
        during = []
        for began, done, copy in self.writes:
            if done <= start:
                before = copy
            elif began < end:
                during.append(copy)
        return [before, *during]


async def _until_second(second: int) -> None:
    """Sleep until the given second of a minute (this one or the next)."""
    now = datetime.now(UTC)
    target = now.replace(second=second, microsecond=0)
    if target <= now:
        target += timedelta(minutes=1)
    await asyncio.sleep((target - now).total_seconds())


def _restored_matches(backup: dict[str, Any], history: History, tmp: Path) -> bool:
    """Restore with plain qemu-img (the whole chain) and compare."""
    disk = next(d for d in backup["disks"] if d["name"] == "vda")
    out = tmp / f"restored-{backup['id']}.raw"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(Path(backup["path"]) / disk["path"]), str(out)],
        check=True,
    )
    data = out.read_bytes()
    out.unlink()
    start = datetime.fromisoformat(backup["started"])
    end = datetime.fromisoformat(backup["finished"])
    return any(c.read_bytes() == data for c in history.candidates(start, end))


@pytest.mark.timeout(900)  # five scheduled minutes by design, plus setup and checks
async def test_daemon_soak_with_schedules_several_domains_and_a_libvirtd_restart(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    versions = tmp_path / "versions"
    versions.mkdir()
    initial = versions / "zero.raw"
    with initial.open("wb") as f:
        f.truncate(SIZE)
    # Three VMs exist and run before the daemon starts; a fourth no policy governs.
    tds = [await asyncio.to_thread(domains.create, qcow2_sizes=[SIZE]) for _ in range(3)]
    unmanaged = await asyncio.to_thread(domains.create, qcow2_sizes=[MiB], start=False)
    hist = {td.name: History(td, versions, initial) for td in tds}
    # The defaults, as an operator runs it: 0-30 s jitter, 15 s busy retry.
    config.write_text(
        config.read_text().replace(QUICK_SCHEDULE, "") + "max_concurrent_backups: 2\n"
    )
    (config.parent / "policies" / "soak.yaml").write_text(
        "domains: ['vbtest-*']\n"
        f"exclude_domains: ['{unmanaged.name}']\n"
        "schedule: {incremental: '* * * * *', full: '*/3 * * * *'}\n"
    )
    _, b, c = tds
    d = Daemon(config, tmp_path)
    try:
        await d.start()
        daemon_up = datetime.now(UTC)
        for minute in range(MINUTES):
            await _until_second(40)
            running = [h for h in hist.values() if h.td.dom.isActive()]
            for i, h in enumerate(running):
                await asyncio.to_thread(h.write, ((minute * 3 + i) % 15) * MiB, 0x10 + minute)
            if minute == 1:
                await asyncio.to_thread(b.dom.destroy)  # off over the next run: offline
            elif minute == 2:
                await asyncio.to_thread(b.start)
                await asyncio.to_thread(stop_libvirtd)
                await asyncio.to_thread(ensure_libvirtd)
                domains.conn = connect()
                for h in hist.values():
                    h.td.dom = domains.conn.lookupByName(h.td.name)
                    h.td.conn = domains.conn
                unmanaged.dom = domains.conn.lookupByName(unmanaged.name)
            elif minute == 3:
                new = await asyncio.to_thread(domains.create, qcow2_sizes=[SIZE])
                hist[new.name] = History(new, versions, initial)
            elif minute == 4:
                await asyncio.to_thread(c.dom.destroy)
                await asyncio.to_thread(c.start)
        # The last minute's runs, then everything settled.
        await _until_second(40)
        deadline = time.monotonic() + 60
        while any(x["status"] == "running" for x in await backups(config)):
            assert time.monotonic() < deadline, "a backup never ended"
            await asyncio.sleep(1)
        status = await cli_json(config, "status")
        stopped_at = datetime.now(UTC)
        assert await d.stop() == 0
    finally:
        d.close()

    log = d.log
    assert "Traceback" not in log, log[-5000:]
    assert "task died" not in log and "crashed" not in log
    records = await backups(config)
    by_domain: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_domain.setdefault(r["domain"], []).append(r)
    problems = []
    for name, h in hist.items():
        mine = by_domain.get(name, [])
        # Every scheduled minute in which the domain existed has exactly one run.
        first = max(daemon_up, h.defined).replace(second=0, microsecond=0) + timedelta(minutes=1)
        minutes = []
        m = first
        while m + timedelta(seconds=40) < stopped_at:
            minutes.append(m)
            m += timedelta(minutes=1)
        for m in minutes:
            runs = [
                r
                for r in mine
                if m <= datetime.fromisoformat(r["started"]) < m + timedelta(minutes=1)
            ]
            if len(runs) != 1:
                problems.append(f"{name} {m:%H:%M}: {len(runs)} runs")
            for r in runs:
                if r["status"] != "complete":
                    problems.append(f"{name} {r['id']}: {r['status']} ({r['error']})")
                elif m.minute % 3 == 0 and r["level"] != "full":
                    problems.append(f"{name} {r['id']}: {r['level']} at a full minute")
        for r in mine:
            if r["status"] == "complete" and not _restored_matches(r, h, tmp_path):
                problems.append(f"{name} {r['id']}: restores to no state the guest had")
        assert len(mine) >= 2
        row = next(x for x in status["domains"] if x["domain"] == name)
        last_good = [r["id"] for r in mine if r["status"] == "complete"][-1]
        if row["last_good"] != last_good:
            problems.append(f"{name}: status says last good {row['last_good']}, not {last_good}")
        if set(row["next_runs"]) != {"full", "incremental"}:
            problems.append(f"{name}: next runs {row['next_runs']}")
    assert not problems, "\n".join(problems)
    # The offline run of the stopped domain and the concurrency really happened.
    assert f"domain={b.name} online=False" in log, "the stopped domain's run was offline"
    # max_concurrent_backups is honoured (that two really run at once is
    # pinned deterministically in test_first_contact: the jitter here may
    # spread short backups apart).
    assert most_at_once(records) <= 2
    assert unmanaged.name in status["unmanaged"]
    assert status["running"] == []
    assert "lost the connection to libvirtd" in log
