"""The XML model against a real libvirtd: built documents are accepted,
libvirt's own output parses, and checkpoints redefined from stored XML give
back the same lineage."""

from __future__ import annotations

import libvirt

from testbed.domains import DomainFactory, GuestDomain, MiB, wait_until
from testbed.guest import GuestWriter
from testbed.tools import nbd_unix_uri, qemu_img_compare, run
from virtbackupd.core.backup_documents import BackupRequest, build_documents, checkpoint_name
from virtbackupd.core.backup_xml import Backup, BackupMode
from virtbackupd.core.checkpoint_xml import Checkpoint
from virtbackupd.core.domain_xml import parse_domain


def _begin(td: GuestDomain, stamp: str, parent: str | None) -> tuple[str, str]:
    """Start a pull backup from built documents; return (checkpoint, socket)."""
    cp = checkpoint_name(stamp)
    sock = str(td.workdir / f"{stamp}.sock")
    docs = build_documents(
        parse_domain(td.dom.XMLDesc(0)).disks,
        BackupRequest(cp, parent, sock, str(td.workdir)),
    )
    td.dom.backupBegin(docs.backup.to_xml(), docs.checkpoint.to_xml(), 0)
    return cp, sock


def _end(td: GuestDomain) -> None:
    td.dom.abortJob()
    wait_until(lambda: td.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE, what="job end")


def _lineage(td: GuestDomain) -> str:
    return run("virsh", "-c", "qemu:///system", "checkpoint-list", td.name, "--parent", "--name")


def test_pull_backup_from_built_xml_exports_expected_disks(domains: DomainFactory) -> None:
    td = domains.create(qcow2_sizes=[16 * MiB, 8 * MiB], raw_size=4 * MiB, cdrom=True)
    GuestWriter(td).write("vdb", MiB, MiB, 0x42)
    _, sock = _begin(td, "t1", None)
    exports = run("nbdinfo", "--list", "--json", nbd_unix_uri(sock))
    assert '"vda"' in exports and '"vdb"' in exports
    assert '"vdc"' in exports, "raw disks are backed up by default (in full)"
    vdb = td.disk("vdb")
    assert vdb.reference is not None
    qemu_img_compare(vdb.reference, nbd_unix_uri(sock, "vdb"), "raw", "raw")
    # libvirt's own view of the running job parses with the model.
    live_xml = td.dom.backupGetXMLDesc(0)
    live = Backup.from_xml(live_xml, "backupGetXMLDesc", internal=True)
    assert live.to_xml() == live_xml
    live_vda = live.disk("vda")
    assert live_vda is not None and live_vda.index is not None
    assert live.mode is BackupMode.PULL
    assert {d.name for d in live.disks if d.backup} == {"vda", "vdb", "vdc"}
    vdc = td.disk("vdc")
    assert vdc.reference is not None
    qemu_img_compare(vdc.reference, nbd_unix_uri(sock, "vdc"), "raw", "raw")
    _end(td)


def test_checkpoints_redefined_from_stored_xml_keep_lineage(domains: DomainFactory) -> None:
    td = domains.create(qcow2_sizes=[16 * MiB])
    guest = GuestWriter(td)
    cp1, _ = _begin(td, "r1", None)
    _end(td)
    guest.write("vda", 0, MiB, 0x1)
    cp2, _ = _begin(td, "r2", cp1)
    _end(td)
    cp3 = checkpoint_name("r3")
    built = build_documents(
        parse_domain(td.dom.XMLDesc(0)).disks, BackupRequest(cp3, cp2, "/unused", "/unused")
    )
    td.dom.checkpointCreateXML(built.checkpoint.to_xml(), 0)

    before = _lineage(td)
    stored = {}
    for name in (cp1, cp2, cp3):
        xml = td.dom.checkpointLookupByName(name).getXMLDesc(0)
        parsed = Checkpoint.from_xml(xml, f"checkpoint {name}")
        assert parsed.to_xml() == xml, "libvirt's output round-trips byte for byte"
        assert parsed.domain_xml is not None and "<domain" in parsed.domain_xml
        stored[name] = parsed
    assert stored[cp2].parent == cp1 and stored[cp3].parent == cp2

    # Forget the metadata only (bitmaps stay in the image), children first.
    for name in (cp3, cp2, cp1):
        td.dom.checkpointLookupByName(name).delete(
            libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY
        )
    assert td.dom.listAllCheckpoints() == []
    for name in (cp1, cp2, cp3):
        td.dom.checkpointCreateXML(
            stored[name].to_xml(), libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
        )
    assert _lineage(td) == before
    assert cp1 in before and cp3 in before

    # The redefined lineage is usable: an incremental from cp3 works.
    guest.write("vda", 2 * MiB, MiB, 0x2)
    _, sock = _begin(td, "r4", cp3)
    vda = td.disk("vda")
    assert vda.reference is not None
    qemu_img_compare(vda.reference, nbd_unix_uri(sock, "vda"), "raw", "raw")
    _end(td)
