"""The daemon SIGKILLed at random instants of its own work (issue 22's
fault suite, the daemon's part): a backup the daemon runs on an event, and
the prune after it, killed anywhere; the next start must clean up, and
every backup `list` calls complete must restore byte-identical to what the
disk held when it was taken, with `verify` agreeing."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import time
from datetime import datetime
from pathlib import Path

from testbed.daemon import Daemon, backups, cli
from testbed.domains import DomainFactory, MiB
from testbed.guest import GuestWriter
from testbed.tools import qemu_img_compare


async def test_the_daemon_killed_at_random_instants_costs_no_backup(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    """Each round: the guest writes, the domain stops, the daemon backs it
    up (on_shutdown) and prunes (keep_last 2); the daemon is SIGKILLed at a
    seeded random instant of that span (VBT_DAEMON_KILL_SEED replays,
    VBT_DAEMON_KILLS sets how many), then started again."""
    seed = int(os.environ.get("VBT_DAEMON_KILL_SEED", random.randrange(1 << 30)))
    kills = int(os.environ.get("VBT_DAEMON_KILLS", "3"))
    print(f"VBT_DAEMON_KILL_SEED={seed}")
    rnd = random.Random(seed)
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[32 * MiB])
    (config.parent / "policies" / "p.yaml").write_text(
        f"domains: ['{td.name}']\nevents: {{on_shutdown: incremental}}\n"
        "retention: {keep_last: 2}\nbandwidth: 8MiB\n"
    )
    guest = GuestWriter(td)
    refs: list[tuple[float, Path]] = []  # (when the domain stopped, its disk then)

    async def stop_domain(n: int) -> None:
        await asyncio.to_thread(guest.write, "vda", (n % 4) * 8 * MiB, 6 * MiB, 0x30 + n)
        ref = tmp_path / f"ref-{n}.raw"
        reference = td.disk("vda").reference
        assert reference is not None
        await asyncio.to_thread(shutil.copyfile, reference, ref)
        refs.append((time.time(), ref))
        await asyncio.to_thread(td.dom.destroy)

    async def settled(count: int, timeout: float = 120) -> float:
        """Wait until `count` backups are finished: the seconds it took."""
        started = time.monotonic()
        while True:
            done = [b for b in await backups(config) if b["status"] != "running"]
            if len(done) >= count:
                return time.monotonic() - started
            assert time.monotonic() - started < timeout, "the backup did not finish"
            await asyncio.sleep(0.2)

    d = Daemon(config, tmp_path)
    try:
        await d.start()
        await stop_domain(0)  # a full, untouched: the backup's normal length
        # ... and its prune after it, about as long again at most: kills
        # land before, inside and after the copy, and in the prune.
        span = 2 * await settled(1)
        assert await d.stop() == 0
    finally:
        d.close()
    print(f"kills land within {span:.2f} s of the stop")

    for n in range(1, kills + 1):
        await asyncio.to_thread(td.start)
        d = Daemon(config, tmp_path)
        try:
            await d.start()
            await stop_domain(n)
            at = rnd.uniform(0, span)
            await asyncio.sleep(at)
            print(f"kill {n}: SIGKILL {at:.2f} s after the stop")
            await d.stop(signal.SIGKILL)
        finally:
            d.close()
        d = Daemon(config, tmp_path)
        try:
            await d.start()  # cleans up what the killed one left, before READY
            assert await d.stop() == 0
            assert "Traceback" not in d.log, d.log[-3000:]
        finally:
            d.close()
        await _every_listed_backup_restores(config, td.name, refs, tmp_path)


async def _every_listed_backup_restores(
    config: Path, name: str, refs: list[tuple[float, Path]], tmp: Path
) -> None:
    listed = await backups(config)
    assert not [b for b in listed if b["state"] == "running"], listed
    # What list calls complete (a backup an interrupted prune is removing
    # is `pruning`: no restore point, and restore says so).
    complete = [b for b in listed if b["state"] == "complete"]
    assert complete, listed
    for b in complete:
        started = datetime.fromisoformat(b["started"]).timestamp()
        ref = max((r for r in refs if r[0] <= started), key=lambda r: r[0])[1]
        out = tmp / f"restored-{b['id']}"
        rc, _, err = await cli(
            config, "restore", name, "--backup", b["id"], "--to", str(out), "--format", "raw"
        )
        assert rc == 0, (b["id"], err)
        await asyncio.to_thread(qemu_img_compare, ref, out / "vda.raw", "raw", "raw")
        shutil.rmtree(out)
    rc, out_text, err = await cli(config, "--json", "verify", name)
    assert rc == 0, (out_text, err)
    assert all(v["ok"] for v in json.loads(out_text)), out_text
