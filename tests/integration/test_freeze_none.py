"""A freeze of no file system says so (issue 24 item 6): a real Linux guest
whose agent answers but has nothing mounted it can freeze (its disk is
blank) logs `no guest file system frozen (the agent reported none)`, not
"guest file systems frozen count=0", which reads as a quiesced backup."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import libvirt
import libvirt_qemu

from testbed.daemon import cli
from testbed.domains import DomainFactory, GuestDomain, MiB
from testbed.tools import assert_restores


def agent_up(td: GuestDomain) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            libvirt_qemu.qemuAgentCommand(td.dom, json.dumps({"execute": "guest-ping"}), 10, 0)
        except libvirt.libvirtError:
            assert time.monotonic() < deadline, "the guest agent never answered"
            time.sleep(0.5)
        else:
            return


async def test_a_freeze_of_no_file_system_says_none_was_frozen(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[8 * MiB], agent=True)
    await asyncio.to_thread(agent_up, td)
    (config.parent / "policies" / "p.yaml").write_text(f"domains: [{td.name}]\n")
    rc, out, err = await cli(config, "--json", "backup", td.name)
    assert rc == 0, err
    assert "no guest file system frozen (the agent reported none)" in err, err
    assert "guest file systems frozen" not in err, err
    rec = json.loads(out)
    assert_restores(Path(rec["path"]), [(d["name"], d["path"]) for d in rec["disks"]], td, tmp_path)
