"""Building the backup and checkpoint documents from a plan: which disks
take part and why, and that the result is valid for libvirt's schemas."""

from __future__ import annotations

import pytest

from virtbackupd.core.backup_documents import (
    BackupRequest,
    RawDisks,
    build_documents,
    checkpoint_name,
    is_own_checkpoint,
)
from virtbackupd.core.backup_xml import Backup, DiskBackupMode
from virtbackupd.core.checkpoint_xml import Checkpoint
from virtbackupd.core.domain_xml import DomainDisk, parse_domain
from virtbackupd.errors import PlanError, XMLError
from xmltools import schema_errors

DOMAIN_XML = """<domain type='qemu'>
  <name>web01</name>
  <uuid>0b1cbd0e-1c2f-4a57-9b43-5b1f1e0f7a01</uuid>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web01.qcow2'/><target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/></disk>
    <disk type='block' device='disk'><driver name='qemu' type='qcow2'/>
      <source dev='/dev/vg0/web01-data'/><target dev='vdb' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='/var/lib/libvirt/images/swap.img'/><target dev='vdc' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
      <target dev='hdc' bus='ide'/><readonly/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/srv/shared.qcow2'/><target dev='vdd' bus='virtio'/><shareable/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/srv/ro.qcow2'/><target dev='vde' bus='virtio'/><readonly/></disk>
    <disk type='network' device='disk'><driver name='qemu' type='raw'/>
      <source protocol='rbd' name='pool/img'/><target dev='vdf' bus='virtio'/></disk>
    <disk type='file' device='floppy'><target dev='fda' bus='fdc'/></disk>
  </devices>
</domain>"""

DISKS = parse_domain(DOMAIN_XML).disks


def request(**kw: object) -> BackupRequest:
    base: dict[str, object] = {
        "checkpoint": checkpoint_name("20261123T200000Z-0001"),
        "incremental_from": None,
        "socket_path": "/run/virtbackupd/web01/nbd.sock",
        "scratch_dir": "/run/virtbackupd/web01",
    }
    base.update(kw)
    # The tests pass BackupRequest's own fields; a wrong one fails at the call.
    return BackupRequest(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("channels", "expected"),
    [
        ("", False),
        (
            "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>",
            True,
        ),
        (
            "<channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>",
            False,
        ),
    ],
)
def test_a_guest_agent_channel_is_noticed(channels: str, expected: bool) -> None:
    """Without one, `quiesce: auto` does not ask (nor warn) for a freeze."""
    xml = DOMAIN_XML.replace("</devices>", channels + "</devices>")
    assert parse_domain(xml).agent_channel is expected


def test_domain_disks_are_read_with_their_properties() -> None:
    info = parse_domain(DOMAIN_XML)
    assert info.name == "web01"
    vda = info.disk("vda")
    assert vda == DomainDisk(
        "vda",
        "disk",
        "file",
        "/var/lib/libvirt/images/web01.qcow2",
        "qcow2",
        "virtio",
        alias="virtio-disk0",
    )
    vdb, hdc = info.disk("vdb"), info.disk("hdc")
    assert vdb is not None and vdb.source == "/dev/vg0/web01-data"
    assert hdc is not None and hdc.source is None


def test_every_exclusion_carries_its_reason() -> None:
    docs = build_documents(DISKS, request(raw=RawDisks.SKIP))
    reasons = {c.target: (c.included, c.reason) for c in docs.choices}
    assert reasons == {
        "vda": (True, "qcow2: full"),
        "vdb": (True, "qcow2: full"),
        "vdc": (False, "raw disk: no bitmap possible (raw: skip)"),
        "hdc": (False, "device is a cdrom"),
        "vdd": (False, "shareable disk (another guest may write it)"),
        "vde": (False, "read-only disk"),
        "vdf": (False, "network disks are not supported"),
        "fda": (False, "device is a floppy"),
    }


def test_raw_disks_are_backed_up_by_default_in_full_without_bitmap() -> None:
    """A raw boot disk silently left out was found only at restore time."""
    assert BackupRequest("c", None, "/s", "/s").raw is RawDisks.FULL
    docs = build_documents(DISKS, request(incremental_from="virtbackupd-x"))
    assert "convert it to qcow2" in next(c.reason for c in docs.choices if c.target == "vdc")
    vdc = docs.backup.disk("vdc")
    assert vdc is not None and vdc.backup and vdc.backupmode is DiskBackupMode.FULL
    assert vdc.incremental is None and vdc.exportbitmap is None
    vdc_checkpoint = docs.checkpoint.disk("vdc")
    assert vdc_checkpoint is not None and vdc_checkpoint.checkpoint == "no"
    vda = docs.backup.disk("vda")
    assert vda is not None and vda.backupmode is DiskBackupMode.INCREMENTAL
    assert vda.incremental == "virtbackupd-x" and vda.exportbitmap == "backup-vda"


def test_include_and_exclude_lists() -> None:
    docs = build_documents(DISKS, request(include=frozenset({"vda"})))
    assert [c.target for c in docs.included] == ["vda"]
    docs = build_documents(DISKS, request(include=frozenset({"vda"}), raw=RawDisks.SKIP))
    assert [c.target for c in docs.included] == ["vda"]
    vdb = docs.backup.disk("vdb")
    assert vdb is not None and vdb.backup is False
    docs = build_documents(DISKS, request(exclude=frozenset({"vda"})))
    assert [c.target for c in docs.included] == ["vdb", "vdc"]
    # One policy serves VMs with different disks: excluding a disk this VM
    # lacks excludes nothing (it failed every backup before).
    docs = build_documents(DISKS, request(exclude=frozenset({"vdz"})))
    assert [c.target for c in docs.included] == ["vda", "vdb", "vdc"]
    with pytest.raises(PlanError, match="disks.include names disks the domain does not have: vdz"):
        build_documents(DISKS, request(include=frozenset({"vdz"})))


def test_nothing_to_back_up_is_an_error_with_reasons() -> None:
    with pytest.raises(PlanError, match="no disk can be backed up .*vda: excluded by policy"):
        build_documents(DISKS, request(include=frozenset({"vda"}), exclude=frozenset({"vda"})))


def test_every_domain_disk_is_listed_in_both_documents() -> None:
    docs = build_documents(DISKS, request())
    targets = [d.target for d in DISKS]
    assert [d.name for d in docs.backup.disks] == targets
    assert [d.name for d in docs.checkpoint.disks] == targets


@pytest.mark.parametrize("incremental", [None, "virtbackupd-20261122T200000Z-0001"])
@pytest.mark.parametrize("raw", list(RawDisks))
def test_built_documents_validate_against_libvirt_schemas(
    incremental: str | None, raw: RawDisks
) -> None:
    docs = build_documents(DISKS, request(incremental_from=incremental, raw=raw))
    assert schema_errors("domainbackup", docs.backup.to_xml()) is None
    assert schema_errors("domaincheckpoint", docs.checkpoint.to_xml()) is None
    assert Backup.from_xml(docs.backup.to_xml()) == docs.backup
    assert Checkpoint.from_xml(docs.checkpoint.to_xml()) == docs.checkpoint


def test_checkpoint_names_are_recognisable_and_safe() -> None:
    name = checkpoint_name("20261123T200000Z-0001")
    assert name == "virtbackupd-20261123T200000Z-0001"
    assert is_own_checkpoint(name)
    assert not is_own_checkpoint("nightly-1")
    with pytest.raises(XMLError, match="not allowed"):
        checkpoint_name("../x")
    with pytest.raises(XMLError, match="not allowed"):
        build_documents(DISKS, request(incremental_from="bad/name"))


def test_example_documents_match_docs() -> None:
    """docs/xml-model.md shows these two documents verbatim."""
    from pathlib import Path

    docs_md = (Path(__file__).parents[2] / "docs" / "xml-model.md").read_text()
    example = build_documents(DISKS, request(incremental_from="virtbackupd-20261122T200000Z-0001"))
    assert example.backup.to_xml() in docs_md
    assert example.checkpoint.to_xml() in docs_md
