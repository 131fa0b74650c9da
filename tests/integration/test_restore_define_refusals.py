"""`restore --define` writes nothing it then leaves half-done (issue 23,
issue 24 item 5): a refusal that can be known before the copy is made
before a byte is written; one that only libvirt knows (its define) takes
back the images the restore wrote, and an existing domain `--force` was
to replace is defined again. `--force` never replaces an image a running
domain is on."""

from __future__ import annotations

from pathlib import Path

import libvirt
import pytest
from lxml import etree

from testbed.cli import run_cli
from testbed.domains import WORK_ROOT, DomainFactory, MiB, remove_domain
from virtbackupd.cli.main import main as cli


def restore(config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli(["-c", str(config), "restore", *args])
    return rc, capsys.readouterr().err


def edit(domain_xml: Path, change: str) -> None:
    root = etree.fromstring(domain_xml.read_bytes())
    devices = root.find("devices")
    assert devices is not None
    if change == "lose vdb":
        for disk in devices.findall("disk"):
            target = disk.find("target")
            if target is not None and target.get("dev") == "vdb":
                devices.remove(disk)
    else:  # a definition only libvirt refuses: more vCPUs now than at most
        vcpu = root.find("vcpu")
        assert vcpu is not None
        vcpu.text = "1"
        vcpu.set("current", "2")
    domain_xml.write_bytes(etree.tostring(root))


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_define_refusals_leave_nothing_written(
    domains: DomainFactory,
    config: Path,
    capsys: pytest.CaptureFixture[str],
    libvirt_conn: libvirt.virConnect,
) -> None:
    td = domains.create(qcow2_sizes=[8 * MiB, 8 * MiB], start=False)
    backup = run_cli(config, capsys, "backup", td.name)
    saved = Path(backup["path"]) / "domain.xml"
    original = saved.read_bytes()
    name = f"{td.name}-copy"
    folder = WORK_ROOT / f"{td.name}-copy"
    accept = "--accept-edited-definition"
    try:
        # The backup has vdb, its saved definition not: known before the copy.
        edit(saved, "lose vdb")
        rc, err = restore(config, capsys, td.name, "--to", str(folder), "--define", name, accept)
        assert rc == 2, err
        assert "no <disk> with target vdb" in err and "--disk" in err, err
        assert "nothing was restored" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err
        assert files(folder) == []
        assert name not in libvirt_conn.listDefinedDomains()
        # ... and leaving it out with --disk is what the message says works.
        out = run_cli(
            config, capsys, "restore", td.name, "--disk", "vda", "--to", str(folder),
            "--define", name, accept,
        )  # fmt: skip
        assert [d["disk"] for d in out["disks"]] == ["vda"]
        assert files(folder) == ["vda.qcow2"]
        vda = (folder / "vda.qcow2").read_bytes()

        # libvirt refuses the definition after the copy: the images written
        # are removed, what --force was to replace is as it was.
        saved.write_bytes(original)
        edit(saved, "vcpus")
        rc, err = restore(
            config, capsys, td.name, "--to", str(folder), "--define", name, accept, "--force"
        )
        assert rc == 1, err
        assert f"libvirt refused the definition of {name}" in err, err
        assert "vCPU" in err and "the images this restore wrote were removed" in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert files(folder) == ["vda.qcow2"]  # no vdb.qcow2, no .partial
        assert (folder / "vda.qcow2").read_bytes() == vda
        assert name in libvirt_conn.listDefinedDomains()  # defined again
        disks = etree.fromstring(libvirt_conn.lookupByName(name).XMLDesc(0).encode())
        assert [d.get("dev") for d in disks.iterfind("devices/disk/target")] == ["vda"]

        # --force never replaces an image a running domain is on.
        saved.write_bytes(original)
        libvirt_conn.lookupByName(name).create()
        rc, err = restore(
            config, capsys, td.name, "--disk", "vda", "--to", str(folder),
            "--define", f"{name}2", "--force",
        )  # fmt: skip
        assert rc == 1, err
        assert f"{folder / 'vda.qcow2'} is a disk of running domain {name}" in err, err
        assert "nothing was restored" in err and len(err.strip().splitlines()) == 1, err
        assert (
            files(folder) == ["vda.qcow2"] and f"{name}2" not in libvirt_conn.listDefinedDomains()
        )
    finally:
        remove_domain(libvirt_conn, name)
        remove_domain(libvirt_conn, f"{name}2")
