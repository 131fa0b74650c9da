"""A VM re-created from its backup under the same name gets a new UUID:
`list NAME` shows the backups of every domain that has borne the name,
with a line where the UUID changes; `restore NAME` and `verify NAME`
refuse to guess between them (exit 2, naming the UUIDs) unless --backup
or a UUID says which. Repositories built without libvirt; the config's
libvirt_uri names a socket that does not exist."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from testbed.cli import run_cli
from testbed.repo_builder import BuiltDomain, MiB
from testbed.tools import qemu_img_compare
from virtbackupd.adapters.store import Store
from virtbackupd.cli.main import main as cli

NO_LIBVIRT = "qemu+unix:///system?socket=/nonexistent/virtbackupd-test/libvirt-sock"


async def history(tmp: Path) -> tuple[BuiltDomain, BuiltDomain]:
    """Two backups of `vm`, then one of a new `vm` (another UUID) with
    other data, into the same repository and catalogue."""
    old = BuiltDomain(tmp, {"vda": MiB}, name="vm")
    async with Store.open(old.state_db) as store:
        old.write("vda", 0, 64 * 1024, 0x41)
        await old.backup(store)
        old.write("vda", 0, 64 * 1024, 0x42)
        await old.backup(store)
    new = BuiltDomain(tmp, {"vda": MiB}, name="vm")
    async with Store.open(new.state_db) as store:
        new.write("vda", 0, 64 * 1024, 0x43)
        await new.backup(store)
    return old, new


def test_list_name_finds_every_domain_that_bore_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = asyncio.run(history(tmp_path))
    config = tmp_path / "virtbackupd.yaml"
    config.write_text(
        f"state_dir: {old.state_db.parent}\nbackup_root: {old.root}\nruntime_dir: {old.runtime}\n"
        f"scratch_dir: {tmp_path / 'scratch'}\npolicy_dirs: []\nlibvirt_uri: '{NO_LIBVIRT}'\n"
    )

    listed = run_cli(config, capsys, "list", "vm")
    assert [(b["id"], b["domain_uuid"]) for b in listed] == [
        (old.ids[0], old.uuid),
        (old.ids[1], old.uuid),
        (new.ids[0], new.uuid),
    ]
    capsys.readouterr()
    assert cli(["-c", str(config), "list", "vm"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].startswith(f"--- domain {old.uuid}: 2 backups"), text
    assert text[3].startswith(f"--- domain {new.uuid}: 1 backups"), text

    # Which one to restore is not guessed: libvirt cannot say which bears the name now.
    out = tmp_path / "out"
    assert cli(["-c", str(config), "restore", "vm", "--to", str(out)]) == 2
    err = capsys.readouterr().err
    assert old.uuid in err and new.uuid in err and "give the UUID" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    assert cli(["-c", str(config), "verify", "vm"]) == 2
    assert "several domains have borne the name vm" in capsys.readouterr().err

    # --backup or a UUID says which.
    run_cli(config, capsys, "restore", "vm", "--backup", old.ids[0], "--to", str(out))
    qemu_img_compare(out / "vda.qcow2", old.refs[old.ids[0]]["vda"], "qcow2", "raw")
    verified = run_cli(config, capsys, "verify", "vm", "--backup", old.ids[1])
    assert [v["backup"] for v in verified] == [old.ids[1]]
    verified = run_cli(config, capsys, "verify", new.uuid)
    assert [v["backup"] for v in verified] == [new.ids[0]]
