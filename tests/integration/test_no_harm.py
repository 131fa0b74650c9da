"""Do no harm (issue 12), through the CLI as an operator runs it: nothing
silently left out (raw disks, excluded disks), a disk grown while the VM
runs, a policy whose target moved. Every backup restores byte-identical to
the reference of its moment."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import libvirt

from testbed.daemon import Daemon, bitmaps, cli, spawn_cli, wait_running
from testbed.domains import DomainFactory, GuestDomain, MiB, wait_until
from testbed.guest import GuestWriter
from testbed.tools import assert_restores, qemu_img_info


def policy(config: Path, text: str) -> None:
    (config.parent / "policies" / "p.yaml").write_text(text)


async def backup(config: Path, td: GuestDomain, *extra: str) -> dict[str, Any]:
    rc, out, err = await cli(config, "--json", "backup", td.name, *extra)
    assert rc == 0, err
    doc: dict[str, Any] = json.loads(out)
    return doc


def restores(rec: dict[str, Any], td: GuestDomain, tmp: Path) -> None:
    assert_restores(Path(rec["path"]), [(d["name"], d["path"]) for d in rec["disks"]], td, tmp)


async def test_a_raw_boot_disk_is_backed_up_under_the_defaults(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    """A VM whose boot disk is raw got a "complete" backup without it, not
    a word said. Now the disk is in every backup, copied whole (no bitmap
    is possible), and the log says so and suggests qcow2."""
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[], raw_size=16 * MiB)
    assert td.disk("vda").fmt == "raw"
    w = GuestWriter(td)
    await asyncio.to_thread(w.write, "vda", 0, 2 * MiB, 0x21)
    rc, out, err = await cli(config, "backup", td.name)
    assert rc == 0, err
    assert "left out" not in out
    assert "disk copied in full" in err and "convert it to qcow2" in err
    rc, out, err = await cli(config, "--json", "list", td.name)
    full = json.loads(out)[-1]
    assert [d["name"] for d in full["disks"]] == ["vda"] and full["left_out"] == []
    restores(full, td, tmp_path)
    await asyncio.to_thread(w.write, "vda", 8 * MiB, MiB, 0x23)
    nxt = await backup(config, td)
    assert [d["name"] for d in nxt["disks"]] == ["vda"]
    restores(nxt, td, tmp_path)


async def test_a_disk_left_out_by_policy_is_said_everywhere(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    policy(config, "domains: ['vbtest-*']\ndisks: {raw: skip, exclude: [vdb]}\n")
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[8 * MiB, 8 * MiB], raw_size=8 * MiB)
    rec = await backup(config, td)
    assert [d["name"] for d in rec["disks"]] == ["vda"]
    assert rec["left_out"] == [
        {"name": "vdb", "reason": "excluded by policy"},
        {"name": "vdc", "reason": "raw disk: no bitmap possible (raw: skip)"},
    ]
    rc, out, _ = await cli(config, "list", td.name)
    assert rc == 0
    assert "left out: vdb (excluded by policy); vdc (raw disk: no bitmap possible" in out
    manifest = json.loads((Path(rec["path"]) / "manifest.json").read_text())
    assert manifest["left_out"] == rec["left_out"]


async def test_a_disk_grown_while_the_vm_runs(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    """`virsh blockresize` between backups made every later backup fail
    (ValueError from the copy engine). Now the next one is an incremental
    onto an overlay of the new size, and every point restores exactly."""
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[32 * MiB])
    w = GuestWriter(td)
    await asyncio.to_thread(w.write, "vda", 0, 4 * MiB, 0x31)
    full = await backup(config, td)
    before = tmp_path / "before.raw"
    disk = td.disk("vda")
    assert disk.reference is not None
    shutil.copy(disk.reference, before)

    await asyncio.to_thread(
        td.dom.blockResize, "vda", 64 * MiB, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES
    )
    disk.size = 64 * MiB
    with disk.reference.open("r+b") as f:
        f.truncate(64 * MiB)
    await asyncio.to_thread(w.write, "vda", 2 * MiB, MiB, 0x32)  # old area
    await asyncio.to_thread(w.write, "vda", 40 * MiB, 2 * MiB, 0x33)  # new area
    grown = await backup(config, td)
    assert grown["level"] == "incremental", grown
    manifest = json.loads((Path(grown["path"]) / "manifest.json").read_text())
    assert "disk vda grew from 33554432 to 67108864 bytes" in manifest["reason"]
    restores(grown, td, tmp_path)
    await asyncio.to_thread(w.write, "vda", 60 * MiB, MiB, 0x34)
    after = await backup(config, td)
    assert after["level"] == "incremental"
    restores(after, td, tmp_path)
    # The point before the resize is still the 32 MiB disk it was.
    disk.reference, disk.size = before, 32 * MiB
    restores(full, td, tmp_path)


async def test_moving_the_target_starts_a_new_chain_there(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    """Every backup after a change of `target:` failed ("Could not open
    backing image"): the planned parent lived in the old repository."""
    old, new = tmp_path / "old-disk", tmp_path / "bigger-disk"
    policy(config, f"domains: ['vbtest-*']\ntarget: {old}\n")
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[8 * MiB])
    w = GuestWriter(td)
    await asyncio.to_thread(w.write, "vda", 0, MiB, 0x41)
    first = await backup(config, td)
    assert first["path"].startswith(str(old))
    await asyncio.to_thread(w.write, "vda", 2 * MiB, MiB, 0x42)
    policy(config, f"domains: ['vbtest-*']\ntarget: {new}\n")
    moved = await backup(config, td)
    assert moved["path"].startswith(str(new))
    assert moved["level"] == "full"
    manifest = json.loads((Path(moved["path"]) / "manifest.json").read_text())
    assert "is in another repository" in manifest["reason"]
    restores(moved, td, tmp_path)
    await asyncio.to_thread(w.write, "vda", 4 * MiB, MiB, 0x43)
    nxt = await backup(config, td)
    assert nxt["level"] == "incremental" and nxt["parent"] == moved["id"]
    restores(nxt, td, tmp_path)


def kill_qemu(td: GuestDomain) -> None:
    """SIGKILL the domain's QEMU (what a host crash or the OOM killer does)
    and wait until libvirt has it shut off."""
    pid = int(Path(f"/run/libvirt/qemu/{td.name}.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not td.dom.isActive(), 30, "libvirt to see QEMU gone")


async def test_offline_backups_recover_after_qemu_was_killed(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    """QEMU killed leaves our bitmaps in-use and the domain off: every
    offline backup planned an incremental and died in qemu-nbd until
    someone ran --full. Now the next one is full with the reason, and the
    one after it is incremental again."""
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[16 * MiB])
    w = GuestWriter(td)
    await asyncio.to_thread(w.write, "vda", 0, MiB, 0x51)
    await backup(config, td)
    await asyncio.to_thread(w.write, "vda", 4 * MiB, MiB, 0x52)
    await asyncio.to_thread(kill_qemu, td)
    image = td.disk("vda").path
    # What a kill leaves: a bitmap QEMU created is written to the image only
    # when QEMU closes it, so it is missing (or, loaded from the image
    # earlier, left flagged in-use), while libvirt keeps the checkpoint.
    left = qemu_img_info(image)["format-specific"]["data"].get("bitmaps", [])
    assert left == [] or "in-use" in left[0]["flags"]
    rec = await backup(config, td)
    assert rec["level"] == "full", rec
    manifest = json.loads((Path(rec["path"]) / "manifest.json").read_text())
    assert manifest["reason"].startswith("QEMU did not shut down cleanly")
    restores(rec, td, tmp_path)
    info = qemu_img_info(image)["format-specific"]["data"]
    assert [(b["name"], "in-use" in b["flags"]) for b in info["bitmaps"]] == [
        (rec["checkpoint"], False)
    ]
    assert [c.getName() for c in td.dom.listAllCheckpoints()] == [rec["checkpoint"]]
    nxt = await backup(config, td)
    assert nxt["level"] == "incremental" and nxt["parent"] == rec["id"]
    restores(nxt, td, tmp_path)


async def test_no_bitmap_of_ours_outlives_a_backup_the_vm_stop_interrupted(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    """An online backup interrupted by the VM stopping left its new bitmap
    in the image with no libvirt checkpoint: QEMU tracked every write in it
    forever. Now the failure removes it; foreign bitmaps stay."""
    policy(config, "domains: ['vbtest-*']\nbandwidth: 1MiB\n")
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[32 * MiB])
    await asyncio.to_thread(GuestWriter(td).write, "vda", 0, 16 * MiB, 0x61)
    first = await backup(config, td)
    await asyncio.to_thread(GuestWriter(td).write, "vda", 16 * MiB, 8 * MiB, 0x62)
    proc = await spawn_cli(
        config, "backup", td.name, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    await wait_running(config)
    await asyncio.sleep(2)
    await asyncio.to_thread(td.dom.destroy)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert "stopped during the backup" in err.decode()
    assert bitmaps(td.disk("vda").path) == {first["checkpoint"]}
    assert [c.getName() for c in td.dom.listAllCheckpoints()] == [first["checkpoint"]]


async def test_forget_checkpoints_lets_an_internal_snapshot_revert_go_through(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    """QEMU 7.2 quits when it reverts to an internal snapshot while dirty
    bitmaps are active. The supported way: `virtbackup forget-checkpoints`
    (backups stay, the next backup is full), then the revert."""
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[16 * MiB])
    w = GuestWriter(td)
    disk = td.disk("vda")
    assert disk.reference is not None
    await asyncio.to_thread(w.write, "vda", 0, MiB, 0x71)
    snap = await asyncio.to_thread(
        td.dom.snapshotCreateXML, "<domainsnapshot><name>before</name></domainsnapshot>", 0
    )
    at_snapshot = tmp_path / "at-snapshot.raw"
    shutil.copy(disk.reference, at_snapshot)
    first = await backup(config, td)
    await asyncio.to_thread(w.write, "vda", 2 * MiB, MiB, 0x72)
    await backup(config, td)
    rc, out, err = await cli(config, "forget-checkpoints", td.name)
    assert rc == 0, err
    assert "removed 2 checkpoint(s)" in out and "the next backup is full" in out
    assert td.dom.listAllCheckpoints() == []
    await asyncio.to_thread(td.dom.revertToSnapshot, snap, 0)
    assert td.dom.isActive()
    shutil.copy(at_snapshot, disk.reference)
    await asyncio.to_thread(td.refresh_aliases)
    after = await backup(config, td)
    assert after["level"] == "full"
    restores(after, td, tmp_path)
    # The backups from before stay listed and restorable.
    rc, out, _ = await cli(config, "--json", "list", td.name)
    assert first["id"] in [b["id"] for b in json.loads(out)]
    restores(first, td, tmp_path)  # taken at the snapshot's state
    await asyncio.to_thread(snap.delete, 0)


async def test_the_daemon_removes_stray_bitmaps_of_ours_at_start_never_foreign_ones(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    """A shut-off governed domain whose image holds a bitmap of ours that
    no checkpoint names (what an interrupted backup leaves): the daemon
    removes it at start. Another tool's bitmap stays."""
    policy(config, "domains: ['vbtest-*']\n")
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[8 * MiB], start=False)
    image = td.disk("vda").path
    for name in ("virtbackupd-20260101T000000.000Z-dead", "nightly"):
        await asyncio.to_thread(
            subprocess.run, ["qemu-img", "bitmap", "--add", str(image), name], check=True
        )
    d = Daemon(config, tmp_path)
    try:
        await d.start()
        names = {b["name"] for b in qemu_img_info(image)["format-specific"]["data"]["bitmaps"]}
        assert names == {"nightly"}
        assert "removing a bitmap of ours that no checkpoint names" in d.read_log()
        assert await d.stop() == 0
    finally:
        d.close()
