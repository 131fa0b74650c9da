"""The backup engine through the CLI against a real libvirtd and QEMU:
full and incremental backups of a running domain restore byte-identical to
the reference images, and incrementals copy only about the dirty bytes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from testbed.domains import DomainFactory, GuestDomain, MiB
from testbed.guest import GuestWriter
from testbed.tools import assert_restores, qemu_img_info
from virtbackupd.cli.main import main as cli


def backup(
    config: Path, capsys: pytest.CaptureFixture[str], domain: str, *extra: str
) -> dict[str, Any]:
    capsys.readouterr()
    rc = cli(["-c", str(config), "--json", "backup", domain, *extra])
    out, err = capsys.readouterr()
    assert rc == 0, err
    doc: dict[str, Any] = json.loads(out)
    return doc


def restore_matches(record: dict[str, Any], td: GuestDomain, tmp: Path) -> None:
    assert_restores(
        Path(record["path"]), [(d["name"], d["path"]) for d in record["disks"]], td, tmp
    )


def test_full_then_incrementals_online_and_offline_restore_byte_identical(
    domains: DomainFactory, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    td = domains.create(qcow2_sizes=[32 * MiB, 16 * MiB], raw_size=8 * MiB)
    (config.parent / "policies" / "p.yaml").write_text(
        f"domains: [{td.name}]\ndisks: {{raw: full}}\n"
    )
    guest = GuestWriter(td)
    guest.write("vda", 0, 4 * MiB, 0x11)
    guest.write("vdb", 8 * MiB, MiB, 0x12)
    guest.write("vdc", MiB, MiB, 0x13)

    full = backup(config, capsys, td.name)
    assert full["level"] == "full"
    assert full["status"] == "complete"
    assert full["parent"] is None
    assert {d["name"] for d in full["disks"]} == {"vda", "vdb", "vdc"}
    restore_matches(full, td, tmp_path)

    guest.write("vda", MiB, 64 * 1024, 0x21)
    guest.zero("vda", 2 * MiB, MiB)
    guest.discard("vdb", 8 * MiB, 512 * 1024)
    inc1 = backup(config, capsys, td.name)
    assert inc1["level"] == "incremental"
    assert inc1["parent"] == full["id"]
    by_disk = {d["name"]: d for d in inc1["disks"]}
    # Only the dirty data was written (raw vdc is copied in full every time).
    assert by_disk["vda"]["bytes_written"] == 64 * 1024
    assert by_disk["vdb"]["bytes_written"] == 0
    # QEMU reports a raw file's first block as allocated (format probing
    # protection), so the raw disk's full copy reads one more cluster
    # (64 KiB: the backup image's unit) than the guest wrote.
    assert MiB <= by_disk["vdc"]["bytes_written"] <= MiB + 64 * 1024
    restore_matches(inc1, td, tmp_path)
    vda = Path(inc1["path"]) / "vda.qcow2"
    assert qemu_img_info(vda)["backing-filename"] == f"../{full['id']}/vda.qcow2"

    guest.write("vdb", 0, 3 * MiB, 0x31)
    td.shutdown_hard()  # QEMU gets SIGTERM and closes its images: bitmaps stay consistent
    inc2 = backup(config, capsys, td.name)  # offline: qemu-nbd exports the images
    assert inc2["level"] == "incremental"
    assert inc2["parent"] == inc1["id"]
    by_disk = {d["name"]: d for d in inc2["disks"]}
    assert by_disk["vdb"]["bytes_written"] == 3 * MiB
    assert by_disk["vda"]["bytes_written"] == 0
    restore_matches(inc2, td, tmp_path)
    td.start()
    # The offline backup's checkpoint was redefined in libvirt and carries on.
    guest.write("vda", 5 * MiB, MiB, 0x41)
    inc3 = backup(config, capsys, td.name)
    assert inc3["level"] == "incremental"
    assert inc3["parent"] == inc2["id"]
    assert {d["name"]: d["bytes_written"] for d in inc3["disks"]}["vda"] == MiB
    restore_matches(inc3, td, tmp_path)

    # The repository is self-describing and the state agrees.
    manifest = json.loads((Path(inc3["path"]) / "manifest.json").read_text())
    assert manifest["parent"] == inc2["id"]
    assert (Path(inc2["path"]) / "checkpoint.xml").read_text().startswith("<domaincheckpoint>")
    capsys.readouterr()
    assert cli(["-c", str(config), "--json", "list", td.name]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [b["id"] for b in listed] == [full["id"], inc1["id"], inc2["id"], inc3["id"]]
    assert not list(Path(full["path"]).parent.glob("*.partial"))

    # Losing state.db: reindex rebuilds it from the repository, and the
    # chain continues as an incremental.
    state = config.parent / "state" / "state.db"
    for f in state.parent.glob("state.db*"):
        f.unlink()
    capsys.readouterr()
    assert cli(["-c", str(config), "--json", "reindex"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "added": 4,
        "backups": 4,
        "failed_attempts": 0,
        "moved_aside": None,
        "problems": [],
        "unreadable": [],
    }
    assert cli(["-c", str(config), "--json", "list", td.name]) == 0
    assert json.loads(capsys.readouterr().out) == listed
    guest.write("vdb", 12 * MiB, MiB, 0x51)
    after = backup(config, capsys, td.name)
    assert after["level"] == "incremental"
    assert after["parent"] == inc3["id"]
    restore_matches(after, td, tmp_path)

    # --full starts a new chain.
    again = backup(config, capsys, td.name, "--full")
    assert again["level"] == "full"
    restore_matches(again, td, tmp_path)
