"""Self-tests of the test bed against the real libvirtd and QEMU.

If these fail, no integration test of the product can be trusted: they pin
down the recipes of shared/TESTBED.md on this machine.
"""

from __future__ import annotations

from pathlib import Path

import libvirt
import pytest

from testbed.domains import DomainFactory, GuestDomain, MiB, remove_stale, wait_until
from testbed.guest import GuestWriter
from testbed.tools import nbd_unix_uri, nbdinfo_map, qemu_img_compare, ranges_where, run


def _pull_backup(td: GuestDomain, checkpoint: str, incremental: str | None) -> Path:
    """Start a pull-mode backup of vda with a new checkpoint; return the socket."""
    sock = td.workdir / f"backup-{checkpoint}.sock"
    inc = f"<incremental>{incremental}</incremental>" if incremental else ""
    backup_xml = f"""<domainbackup mode='pull'>{inc}
      <server transport='unix' socket='{sock}'/>
      <disks><disk name='vda' backup='yes' type='file'>
        <scratch file='{td.workdir}/scratch-{checkpoint}.qcow2'/></disk></disks>
    </domainbackup>"""
    checkpoint_xml = f"""<domaincheckpoint><name>{checkpoint}</name>
      <disks><disk name='vda' checkpoint='bitmap'/></disks></domaincheckpoint>"""
    td.dom.backupBegin(backup_xml, checkpoint_xml, 0)
    return sock


def _end_job(td: GuestDomain) -> None:
    td.dom.abortJob()
    wait_until(lambda: td.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE, what="backup job to end")


def test_domain_starts_with_requested_disks(domains: DomainFactory) -> None:
    """A throw-away domain runs under TCG with qcow2, raw and cdrom devices."""
    td = domains.create(qcow2_sizes=[32 * MiB, 16 * MiB], raw_size=8 * MiB, cdrom=True)
    assert td.is_running()
    assert [d.target for d in td.disks] == ["vda", "vdb", "vdc", "hdc"]
    assert [d.fmt for d in td.data_disks] == ["qcow2", "qcow2", "raw"]
    assert all(d.alias for d in td.disks), "every disk has a device alias"
    assert td.name.startswith("vbtest-")


def test_stale_domains_are_removed(domains: DomainFactory) -> None:
    """A domain named as if left by a dead pytest process is cleaned up."""
    td = domains.create(start=False)
    stale_name = "vbtest-999999999-1"
    xml = td.dom.XMLDesc(0).replace(td.name, stale_name)
    xml = xml.replace(f"<uuid>{td.dom.UUIDString()}</uuid>", "")
    td.conn.defineXML(xml)
    removed = remove_stale(td.conn)
    assert stale_name in removed
    assert td.name not in removed, "a domain of the live run is kept"
    with pytest.raises(libvirt.libvirtError):
        td.conn.lookupByName(stale_name)


def test_pull_backup_exports_vda_and_dirty_map_matches_guest_writes(
    domains: DomainFactory,
) -> None:
    """Full pull backup exports vda; after guest writes, the incremental's
    dirty bitmap covers exactly the written ranges, and the export equals the
    reference image both times."""
    td = domains.create(qcow2_sizes=[64 * MiB])
    guest = GuestWriter(td)
    vda = td.disk("vda")
    assert vda.reference is not None
    guest.write("vda", 0, 1 * MiB, 0xAA)

    sock = _pull_backup(td, "tb-cp1", None)
    uri = nbd_unix_uri(sock, "vda")
    assert "vda" in run("nbdinfo", "--list", "--json", nbd_unix_uri(sock))
    qemu_img_compare(vda.reference, uri, "raw", "raw")
    _end_job(td)

    written = [(1 * MiB, 3 * MiB), (50 * MiB, 51 * MiB), (8 * MiB, 8 * MiB + 64 * 1024)]
    guest.write("vda", 1 * MiB, 2 * MiB, 0xAB)
    guest.zero("vda", 50 * MiB, 1 * MiB)
    guest.discard("vda", 8 * MiB, 64 * 1024)

    sock2 = _pull_backup(td, "tb-cp2", "tb-cp1")
    uri2 = nbd_unix_uri(sock2, "vda")
    dirty = ranges_where(nbdinfo_map(uri2, "qemu:dirty-bitmap:backup-vda"), "dirty")
    assert dirty == sorted(written)
    qemu_img_compare(vda.reference, uri2, "raw", "raw")
    _end_job(td)

    names = {cp.getName() for cp in td.dom.listAllCheckpoints()}
    assert names == {"tb-cp1", "tb-cp2"}


def test_reference_detects_a_difference(domains: DomainFactory) -> None:
    """The oracle can fail: a write not mirrored into the reference is seen."""
    td = domains.create(qcow2_sizes=[16 * MiB])
    guest = GuestWriter(td)
    vda = td.disk("vda")
    guest.write("vda", 4 * MiB, 64 * 1024, 0x11)
    # Bypass the mirror: write through the device only.
    guest._hmp(vda, f"write -P 0x22 {5 * MiB} 4096", "wrote")
    sock = _pull_backup(td, "tb-cpx", None)
    with pytest.raises(AssertionError, match="differ"):
        qemu_img_compare(vda.reference or "", nbd_unix_uri(sock, "vda"), "raw", "raw")
    _end_job(td)


def test_failed_guest_write_is_reported(domains: DomainFactory) -> None:
    """qemu-io reports failures only in QEMU's log; the helper reads them."""
    td = domains.create(qcow2_sizes=[16 * MiB])
    guest = GuestWriter(td)
    with pytest.raises(AssertionError, match="write failed"):
        guest._hmp(td.disk("vda"), f"write -P 0x1 {64 * MiB} 4096", "wrote")
    with pytest.raises(ValueError, match="outside vda"):
        guest.write("vda", 16 * MiB - 4096, 8192, 0x1)
