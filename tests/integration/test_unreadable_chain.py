"""A torn manifest under the newest backup, then the domain's next backup
(real libvirtd and QEMU, the CLI as an operator runs it): an incremental
on that chain could not be restored, so the next backup is full, and it
restores exact."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from testbed.daemon import spawn_cli
from testbed.domains import DomainFactory, MiB
from testbed.guest import GuestWriter
from testbed.tools import assert_restores


async def backup(config: Path, name: str) -> Any:
    proc = await spawn_cli(config, "--json", "backup", name)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=300)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


async def test_the_next_backup_after_a_torn_manifest_below_the_newest_is_full(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    td = domains.create(qcow2_sizes=[32 * MiB])
    guest = GuestWriter(td)
    (config.parent / "policies" / "p.yaml").write_text(f"domains: [{td.name}]\n")
    guest.write("vda", 0, MiB, 0x1A)
    full = await backup(config, td.name)
    guest.write("vda", 4 * MiB, MiB, 0x1B)
    inc = await backup(config, td.name)
    assert inc["parent"] == full["id"]
    torn = Path(full["path"]) / "manifest.json"
    torn.write_bytes(torn.read_bytes()[:64])
    guest.write("vda", 8 * MiB, MiB, 0x1C)
    nxt = await backup(config, td.name)
    assert (nxt["level"], nxt["parent"]) == ("full", None)
    assert_restores(Path(nxt["path"]), [(d["name"], d["path"]) for d in nxt["disks"]], td, tmp_path)
