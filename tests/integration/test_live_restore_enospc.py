"""A live restore whose move cannot finish (issue 24, item 8): the target
folder is a tiny tmpfs, so QEMU's block pull fails with ENOSPC. The failure
is reported with the reason in `status` and the daemon's journal, the pull
is tried a bounded number of times (not every round forever), and the new
domain keeps running on the repository's image with its data readable;
once there is room, the move resumes by itself and finishes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import libvirt

from testbed.daemon import Daemon, spawn_cli
from testbed.domains import PREFIX, Disk, DomainFactory, GuestDomain, MiB, remove_domain
from testbed.guest import GuestWriter
from testbed.tools import run


async def cli(config: Path, *args: str) -> Any:
    proc = await spawn_cli(config, "--json", *args)
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"virtbackup {' '.join(args)}: {err.decode()}"
    return json.loads(out)  # an object or a list, as the command prints


async def live_holds(config: Path) -> list[dict[str, Any]]:
    return [h for h in (await cli(config, "status"))["holds"] if h["kind"] == "live-restore"]


CHUNKS = [(0, 0x41), (20 * MiB, 0x42), (40 * MiB, 0x43)]  # (offset, pattern), 8 MiB each


async def test_a_pull_that_runs_out_of_space_is_reported_and_not_retried_forever(
    domains: DomainFactory, config: Path, tmp_path: Path, libvirt_conn: libvirt.virConnect
) -> None:
    td = domains.create(qcow2_sizes=[64 * MiB])
    repo = td.root_folder("repo")  # QEMU (libvirt-qemu) must reach it
    config.write_text(config.read_text().replace("backup_root: backups", f"backup_root: {repo}"))
    (config.parent / "policies" / "p.yaml").write_text(f"domains: [{td.name}]\n")
    guest = GuestWriter(td)
    for at, pattern in CHUNKS:
        guest.write("vda", at, 8 * MiB, pattern)
    await cli(config, "backup", td.name)

    new_dir = td.workdir / "live"
    new_dir.mkdir()
    # 4 MiB: room for the overlay, not for the 24 MiB the pull copies.
    run("mount", "-t", "tmpfs", "-o", "size=4m,mode=0711", "tmpfs", str(new_dir))
    name = f"{PREFIX}{os.getpid()}-enospc"
    daemon = Daemon(config, tmp_path)
    try:
        await daemon.start()
        await cli(config, "restore", td.name, "--to", str(new_dir), "--define", name, "--live")
        dom = libvirt_conn.lookupByName(name)
        # The daemon's round sees the failure (`status` settles too, but
        # is not asked before: its own log would have the line).
        deadline = time.monotonic() + 180
        while "live restore: the move stopped" not in daemon.read_log():
            assert time.monotonic() < deadline, daemon.read_log()[-3000:]
            await asyncio.sleep(1)
        hold = (await live_holds(config))[0]
        print("status:", hold["state"], hold["trouble"])
        assert hold["state"] == "stopped", hold
        assert "No space left on device" in hold["trouble"], hold
        assert f"free space in {new_dir}" in hold["trouble"], hold
        assert "nothing is lost" in hold["trouble"], hold
        text = await spawn_cli(config, "status")
        out, _ = await text.communicate()
        assert "No space left on device" in out.decode(), out.decode()

        # Bounded: no pull is started again, round after round.
        pulls = daemon.read_log().count("live restore: pull started")
        await asyncio.sleep(20)  # four of the daemon's rounds
        log = daemon.read_log()
        assert log.count("live restore: pull started") == pulls, log[-3000:]
        assert not dom.blockJobInfo("vda", 0)
        failed = [x for x in log.splitlines() if "live restore: the move stopped" in x]
        assert len(failed) == 1 and "No space left on device" in failed[0], log[-3000:]
        print(f"pulls started: {pulls + 1} (the restore's own and the daemon's retries)")
        assert 1 <= pulls + 1 <= 4

        # Nothing lost: the domain runs on, reading the backup's data.
        assert dom.isActive()
        new = GuestDomain(
            name,
            new_dir,
            [Disk("vda", new_dir / "vda.qcow2", "qcow2", 64 * MiB)],
            dom,
            libvirt_conn,
        )
        new.refresh_aliases()
        reader = GuestWriter(new)
        for at, pattern in CHUNKS:
            reader._hmp(new.disk("vda"), f"read -P {pattern:#x} {at} {8 * MiB}", "read ")

        # What the operator is told to do: make room. The move resumes by
        # itself, finishes and is checked; the backup is released.
        run("mount", "-o", "remount,size=256m", str(new_dir))
        deadline = time.monotonic() + 240
        while list(repo.glob("*/.holds/*.json")):
            assert time.monotonic() < deadline, daemon.read_log()[-3000:]
            await asyncio.sleep(2)
        log = daemon.read_log()
        assert "live restore: there is room again; the move resumes" in log, log[-3000:]
        assert "live restore finished" in log, log[-3000:]
        assert dom.isActive()
    finally:
        with contextlib.suppress(Exception):
            await daemon.stop()
        daemon.close()
        remove_domain(libvirt_conn, name)
        run("umount", "-l", str(new_dir))
        assert not re.search(r"Traceback", daemon.read_log()), daemon.read_log()[-3000:]
