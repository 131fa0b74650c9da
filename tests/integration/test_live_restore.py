"""Live restore (issue 14, item 1): a new domain runs from a multi-GiB
backup within seconds, its disk moves out of the repository while it runs;
a guest write made during the move is on the finished disk, which stands
alone and equals the backup plus that write, byte for byte; a prune
during the move keeps the held backups; the move survives a daemon
restart, a libvirtd restart and a restart of the new domain (the daemon
starts the move again), and the repository is closed again afterwards.
The same daemon runs another domain's scheduled filesystem check
(`schedule.verify_filesystems`) meanwhile and names the filesystem whose
superblock the guest damaged."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from pathlib import Path

import libvirt

from testbed import guest_disks
from testbed.daemon import Daemon, spawn_cli
from testbed.domains import PREFIX, Disk, DomainFactory, GuestDomain, MiB, remove_domain
from testbed.guest import GuestWriter
from testbed.host import connect, ensure_libvirtd, stop_libvirtd
from testbed.tools import qemu_img_compare, qemu_img_info, run

GiB = 1024 * MiB


async def cli(config: Path, *args: str) -> dict:  # type: ignore[type-arg]
    proc = await spawn_cli(config, "--json", *args)
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"virtbackup {' '.join(args)}: {err.decode()}"
    return json.loads(out)  # type: ignore[no-any-return]


async def refused(config: Path, *args: str) -> tuple[int, str]:
    """A command expected to fail: its exit status and stderr."""
    proc = await spawn_cli(config, *args)
    _, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def live_holds(config: Path) -> list[dict]:  # type: ignore[type-arg]
    return [h for h in (await cli(config, "status"))["holds"] if h["kind"] == "live-restore"]


async def test_live_restore_runs_at_once_and_moves_while_the_guest_writes(
    domains: DomainFactory, config: Path, tmp_path: Path, libvirt_conn: libvirt.virConnect
) -> None:
    size = 3 * GiB
    td = domains.create(qcow2_sizes=[size])
    # QEMU (libvirt-qemu) must reach the repository: not below pytest's 0700 temp dirs.
    repo = td.workdir / "repo"
    config.write_text(config.read_text().replace("backup_root: backups", f"backup_root: {repo}"))
    (config.parent / "policies" / "p.yaml").write_text(
        f"domains: [{td.name}]\nretention: {{keep_last: 1}}\n"
    )
    guest = GuestWriter(td)
    for i in range(6):  # data all across the disk
        guest.write("vda", i * 512 * MiB, 8 * MiB, 0x40 + i)
    full = await cli(config, "backup", td.name)
    guest.write("vda", 100 * MiB, 4 * MiB, 0x55)
    inc = await cli(config, "backup", td.name)
    assert inc["level"] == "incremental"
    source_ref = td.disk("vda").reference
    assert source_ref is not None
    ref = tmp_path / "new.reference.raw"  # the backup's content, plus NEW's writes below
    run("cp", "--sparse=always", source_ref, ref)
    guest.write("vda", 200 * MiB, MiB, 0x66)  # after the backup: not in NEW

    # Meanwhile the daemon runs another domain's scheduled filesystem check
    # (`schedule.verify_filesystems`), on a backup whose ext4 superblock the
    # guest damaged: it must name that filesystem.
    fs_td, raws = guest_disks.create_fs_domain(domains, tmp_path)
    (config.parent / "policies" / "fs.yaml").write_text(
        f"domains: [{fs_td.name}]\nschedule: {{verify_filesystems: '* * * * *'}}\n"
    )
    await cli(config, "backup", fs_td.name)
    guest_disks.damage_superblock(fs_td, raws)
    damaged = await cli(config, "backup", fs_td.name)

    name = f"{PREFIX}{os.getpid()}-live"
    new_dir = td.workdir / "live"  # QEMU (libvirt-qemu) must reach it
    for args, says in (
        (("--define", name, "--live", "--format", "raw"), "moves the disks into qcow2"),
        (("--live",), "--live needs --to DIR and --define NAME"),
        (("--define", name, "--move-rate", "5"), "give --live too"),
        (("--define", name, "--live", "--move-rate", "0"), "not a positive number of MiB/s"),
    ):
        rc, err = await refused(config, "restore", td.name, "--to", str(new_dir), *args)
        assert rc == 2 and says in err, (args, err)
    assert not libvirt_conn.listAllDomains() or name not in {
        d.name() for d in libvirt_conn.listAllDomains()
    }
    daemon = Daemon(config, tmp_path)
    await daemon.start()
    try:
        started = time.monotonic()
        out = await cli(
            config,
            "restore",
            td.name,
            "--to",
            str(new_dir),
            "--define",
            name,
            "--live",
            "--move-rate",
            "2",
        )
        to_running = time.monotonic() - started
        dom = libvirt_conn.lookupByName(name)
        assert dom.isActive(), "the new domain does not run"
        print(f"live restore of a {size // GiB} GiB disk: running after {to_running:.2f} s")
        assert to_running < 30, to_running
        assert out["backup"] == inc["id"] and out["running"]
        image = new_dir / "vda.qcow2"
        assert qemu_img_info(image)["backing-filename"].endswith(f"/{inc['id']}/vda.qcow2")

        # --force replaces nothing a running domain uses: NEW itself, or its image.
        for other in (name, f"{name}-2"):
            rc, err = await refused(
                config,
                "restore",
                td.name,
                "--to",
                str(new_dir),
                "--define",
                other,
                "--live",
                "--force",
            )
            assert rc == 1 and "running" in err, err
        assert dom.isActive() and image.exists()

        # A guest write while the move runs (52 MiB of data at 2 MiB/s: about 26 s).
        new = GuestDomain(
            name, new_dir, [Disk("vda", image, "qcow2", size, reference=ref)], dom, libvirt_conn
        )
        new.refresh_aliases()
        GuestWriter(new).write("vda", 2 * GiB + 4 * MiB, 2 * MiB, 0x77)

        moving = await live_holds(config)
        assert [h["state"] for h in moving] == ["moving"], moving
        assert moving[0]["domain"] == name and moving[0]["backup"] == inc["id"]
        assert 0 <= moving[0]["disks"][0]["done"] < moving[0]["disks"][0]["total"] == size

        # Prune (keep_last 1 would take the full): the held chain stays.
        pruned = await cli(config, "prune", td.name)
        verdicts = {v["id"]: v for v in pruned[0]["backups"]}
        for b in (full, inc):
            assert verdicts[b["id"]]["keep"], verdicts
            assert any(
                r.startswith("held: live restore of domain") for r in verdicts[b["id"]]["reasons"]
            )
        assert {b["id"] for b in await cli(config, "list", td.name)} >= {full["id"], inc["id"]}

        # The daemon restarts in the middle; then the new domain does (its
        # block job ends with it): the daemon starts the move again.
        assert await daemon.stop() == 0
        daemon.close()
        logs = [daemon.read_log()]
        daemon = Daemon(config, tmp_path)
        await daemon.start()
        # libvirtd restarts: QEMU's job goes on and libvirt finds it again.
        await asyncio.to_thread(stop_libvirtd)
        await asyncio.to_thread(ensure_libvirtd)
        conn = domains.conn = connect()  # the test's connection died with libvirtd
        dom = conn.lookupByName(name)
        job = dom.blockJobInfo("vda", 0)
        assert job and job["cur"] < job["end"], job
        dom.destroy()
        dom.create()
        assert dom.blockJobInfo("vda", 0) == {}  # no move runs until the daemon starts one

        # Wait on the hold file itself: `status` settles holds too, and
        # this is to show that the daemon does.
        deadline = time.monotonic() + 240
        while list(repo.glob("*/.holds/*.json")):
            assert time.monotonic() < deadline, "the move did not finish"
            assert dom.isActive()
            await asyncio.sleep(2)
        took = time.monotonic() - started
        print(f"move finished {took:.0f} s after the command")
        assert "live restore: pull (re)started" in daemon.read_log()
        assert "live restore finished" in daemon.read_log()

        # The filesystem check: the minute it runs in may still be ahead.
        deadline = time.monotonic() + 75
        while "filesystem check" not in "".join([*logs, daemon.read_log()]):
            assert time.monotonic() < deadline, "no scheduled filesystem check"
            await asyncio.sleep(1)
        await asyncio.sleep(0.5)
        checked = next(
            x for x in "".join([*logs, daemon.read_log()]).splitlines() if "filesystem check" in x
        )
        assert "filesystem check failed" in checked, checked
        assert f"backup={damaged['id']}" in checked, checked
        assert "vda/part1 (ext4): e2fsck exit" in checked and "part3" not in checked, checked
    finally:
        await daemon.stop()
        daemon.close()

    dom.destroy()  # QEMU writes back its caches: now the file is complete
    assert "backing-filename" not in qemu_img_info(image)
    qemu_img_compare(ref, image, "raw", "qcow2")
    # The repository is closed to QEMU's user again.
    for folder in [repo / full["domain_uuid"] / b["id"] for b in (full, inc)]:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        for f in folder.glob("*.qcow2"):
            assert (f.stat().st_uid, stat.S_IMODE(f.stat().st_mode)) == (0, 0o600)
    remove_domain(conn, name)
