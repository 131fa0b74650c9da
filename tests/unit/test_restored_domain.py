"""The domain XML of a restored copy."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from virtbackupd.core.restored_domain import RestoredImage, restored_domain_xml
from virtbackupd.errors import XMLError

SAVED = """<domain type='kvm'>
  <name>web01</name>
  <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>
  <description>the &lt;web&gt; server</description>
  <os><type>hvm</type><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/web01_VARS.fd</nvram></os>
  <devices>
    <!-- the system disk -->
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source dev='/dev/vg/web01'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/images/web01-data.qcow2'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/install.iso'/><target dev='hdc' bus='ide'/><readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:cc'/><source network='default'/>
    </interface>
  </devices>
</domain>"""


def test_new_name_no_uuid_macs_or_nvram_and_disks_on_the_restored_images() -> None:
    out = restored_domain_xml(
        SAVED, "web01-copy", {"vda": RestoredImage(Path("/r/vda.qcow2"), "qcow2")}, "saved"
    )
    root = etree.fromstring(out.xml.encode())
    assert root.findtext("name") == "web01-copy"
    assert root.find("uuid") is None
    assert root.find("os/nvram") is None
    assert root.find("os/loader") is not None
    assert root.find("devices/interface/mac") is None
    assert root.find("devices/interface/source").get("network") == "default"
    assert root.findtext("description") == "the <web> server"
    disks = root.findall("devices/disk")
    vda = disks[0]
    assert vda.get("type") == "file"
    assert vda.find("source").attrib == {"file": "/r/vda.qcow2"}
    assert vda.find("driver").get("type") == "qcow2"
    assert vda.find("driver").get("cache") == "none"
    assert vda.find("backingStore") is None
    # vdb was not restored: a copy must not write to the original's image.
    assert out.dropped_disks == ("vdb",)
    assert [d.find("target").get("dev") for d in disks] == ["vda", "hdc"]


def test_a_disk_the_domain_does_not_have_is_an_error() -> None:
    with pytest.raises(XMLError, match="no <disk> with target vdz"):
        restored_domain_xml(SAVED, "x", {"vdz": RestoredImage(Path("/r/vdz.raw"), "raw")}, "saved")
