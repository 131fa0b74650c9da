"""A guest freeze is always thawed (issue 12), with a real Linux guest and
its QEMU guest agent (testbed/agent_guest.py): the guest mounts an ext4 file
system (read-only, so its disk never changes) that the agent freezes."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

import libvirt
import libvirt_qemu

from testbed.daemon import cli
from testbed.domains import DomainFactory, GuestDomain, MiB
from testbed.tools import assert_restores
from virtbackupd.config.daemon import load_config
from virtbackupd.engine.locks import freeze_left, note_freeze


def agent(td: GuestDomain, command: str) -> object:
    out = libvirt_qemu.qemuAgentCommand(td.dom, json.dumps({"execute": command}), 10, 0)
    return json.loads(out)["return"]


def ext4_guest(domains: DomainFactory, tmp: Path) -> GuestDomain:
    """A guest whose vda holds an ext4 file system with a file on it."""
    td = domains.create(qcow2_sizes=[32 * MiB], start=False, agent=True)
    raw = tmp / "ext4.raw"
    content = tmp / "content"
    content.mkdir()
    (content / "hello.txt").write_text("written before the backup\n")
    subprocess.run(["truncate", "-s", str(32 * MiB), str(raw)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(content), str(raw)], check=True)
    disk = td.disk("vda")
    subprocess.run(
        ["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", str(raw), str(disk.path)],
        check=True,
    )
    assert disk.reference is not None
    shutil.copy(raw, disk.reference)
    td.start()
    deadline = time.monotonic() + 60
    while True:
        try:
            agent(td, "guest-ping")
        except libvirt.libvirtError:
            assert time.monotonic() < deadline, "the guest agent never answered"
            time.sleep(0.5)
        else:
            return td


async def test_a_freeze_left_by_a_dead_backup_is_thawed_by_the_next_run(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    """A backup process that dies between freeze and thaw leaves the guest's
    file systems frozen (every write in the guest blocks). It records the
    freeze before making it; the next run of the CLI (or the daemon), holding
    the domain's lock, finds the record and thaws the guest first. Here the
    state such a death leaves is made directly: the record, and the guest
    frozen through its agent."""
    td = await asyncio.to_thread(ext4_guest, domains, tmp_path)
    runtime = load_config(config).runtime_dir
    assert await asyncio.to_thread(td.dom.fsFreeze, None, 0) == 1  # the ext4 on vda
    note_freeze(runtime, td.dom.UUIDString())
    assert agent(td, "guest-fsfreeze-status") == "frozen"

    rc, out, err = await cli(config, "--json", "backup", td.name)
    assert rc == 0, err
    assert "thawed the file systems of a guest a dead backup had frozen" in err
    assert agent(td, "guest-fsfreeze-status") == "thawed"
    assert not freeze_left(runtime, td.dom.UUIDString())
    rec = json.loads(out)
    assert_restores(Path(rec["path"]), [(d["name"], d["path"]) for d in rec["disks"]], td, tmp_path)


async def test_a_quiesced_backup_freezes_and_thaws_and_leaves_no_record(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    td = await asyncio.to_thread(ext4_guest, domains, tmp_path)
    (config.parent / "policies" / "p.yaml").write_text("domains: ['vbtest-*']\nquiesce: always\n")
    rc, out, err = await cli(config, "--json", "backup", td.name)
    assert rc == 0, err
    assert '"count": 1' in err and "guest file systems frozen" in err
    assert agent(td, "guest-fsfreeze-status") == "thawed"
    assert not freeze_left(load_config(config).runtime_dir, td.dom.UUIDString())
    rec = json.loads(out)
    assert_restores(Path(rec["path"]), [(d["name"], d["path"]) for d in rec["disks"]], td, tmp_path)
