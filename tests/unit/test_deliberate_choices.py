"""What the policy chose for a disk is information, not a warning: each
disk's choice says whether the policy made it (`by_policy`), and the raw
disk advice ("convert it to qcow2") is given only where it can be
followed: an image file, not a block device (an LVM volume, a LUN)."""

from __future__ import annotations

import pytest

from virtbackupd.core.backup_documents import BackupRequest, RawDisks, choose_disks
from virtbackupd.core.domain_xml import parse_domain

DOMAIN_XML = """<domain type='qemu'><name>web01</name><devices>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
    <source file='/i/a.qcow2'/><target dev='vda' bus='virtio'/></disk>
  <disk type='file' device='disk'><driver name='qemu' type='raw'/>
    <source file='/i/swap.img'/><target dev='vdb' bus='virtio'/></disk>
  <disk type='block' device='disk'><driver name='qemu' type='raw'/>
    <source dev='/dev/vg0/data'/><target dev='vdc' bus='virtio'/></disk>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
    <source file='/srv/shared.qcow2'/><target dev='vdd' bus='virtio'/><shareable/></disk>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
    <source file='/i/e.qcow2'/><target dev='vde' bus='virtio'/></disk>
</devices></domain>"""
DISKS = parse_domain(DOMAIN_XML).disks


def choices(**kw: object) -> dict[str, tuple[bool, bool, str]]:
    # The tests pass BackupRequest's own fields; a wrong one fails at the call.
    req = BackupRequest("virtbackupd-c", None, "/s", "/s", **kw)  # type: ignore[arg-type]
    return {c.target: (c.included, c.by_policy, c.reason) for c in choose_disks(DISKS, req)}


@pytest.mark.parametrize(
    ("kw", "disk", "included", "by_policy"),
    [
        ({}, "vdb", True, True),  # raw: full (the default) is the policy's choice
        ({"raw": RawDisks.SKIP}, "vdb", False, True),
        ({"exclude": frozenset({"vde"})}, "vde", False, True),
        ({"include": frozenset({"vda"})}, "vde", False, True),
        ({}, "vdd", False, False),  # shareable: left out, not by the policy
        ({"exclude": frozenset({"vdd"})}, "vdd", False, False),  # ineligible anyway
        ({}, "vda", True, False),
    ],
)
def test_the_policy_s_own_choices_are_marked(
    kw: dict[str, object], disk: str, included: bool, by_policy: bool
) -> None:
    got = choices(**kw)[disk]
    assert got[:2] == (included, by_policy), got


def test_only_an_image_file_is_advised_to_become_qcow2() -> None:
    got = choices()
    assert "convert it to qcow2" in got["vdb"][2]
    assert "convert" not in got["vdc"][2], got["vdc"]
    assert got["vdc"][:2] == (True, True)
