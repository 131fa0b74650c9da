"""A name several domains have borne, with libvirt there: `restore NAME`
takes the domain libvirt has under that name now and says so on stderr
(with how to take another); `list NAME` marks which UUID is defined now.
The histories are built without a VM (testbed.repo_builder); only the
domain that bears the name now is a real, shut-off libvirt domain."""

from __future__ import annotations

import asyncio
from pathlib import Path

from testbed.daemon import cli, cli_json
from testbed.domains import DomainFactory, MiB
from testbed.repo_builder import BuiltDomain
from testbed.tools import qemu_img_compare
from virtbackupd.adapters.store import Store


async def test_restore_name_takes_the_domain_that_bears_it_now(
    domains: DomainFactory, tmp_path: Path
) -> None:
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[MiB], start=False)
    uuid = td.dom.UUIDString()
    gone = BuiltDomain(tmp_path, {"vda": MiB}, name=td.name)
    async with Store.open(gone.state_db) as store:
        gone.write("vda", 0, 64 * 1024, 0x51)
        await gone.backup(store)
    now = BuiltDomain(tmp_path, {"vda": MiB}, name=td.name, uuid=uuid)
    async with Store.open(now.state_db) as store:
        now.write("vda", 0, 64 * 1024, 0x52)
        await now.backup(store)
    config = tmp_path / "virtbackupd.yaml"
    config.write_text(
        f"state_dir: {gone.state_db.parent}\nbackup_root: {gone.root}\n"
        f"runtime_dir: {gone.runtime}\nscratch_dir: {tmp_path / 'scratch'}\npolicy_dirs: []\n"
    )

    rc, text, err = await cli(config, "list", td.name)
    assert rc == 0, err
    assert f"--- domain {gone.uuid} (no longer defined): 1 backups" in text, text
    assert f"--- domain {uuid} (defined now as {td.name}): 1 backups" in text, text

    out = tmp_path / "out"
    rc, _, err = await cli(config, "--json", "restore", td.name, "--to", str(out))
    assert rc == 0, err
    assert f"taking {uuid}, the one libvirt has under it now" in err, err
    assert gone.uuid in err, err
    qemu_img_compare(out / "vda.qcow2", now.refs[now.ids[0]]["vda"], "qcow2", "raw")
    verified = await cli_json(config, "verify", td.name)
    assert [v["backup"] for v in verified] == now.ids
