"""What the backup planner needs from a domain's XML: its disks.

Only reading; the domain document itself stays libvirt's. Unknown elements
are ignored here on purpose (a domain has hundreds of possible devices).
"""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

from virtbackupd.core import xmldoc
from virtbackupd.errors import XMLError


@dataclass(frozen=True)
class DomainDisk:
    """One `<devices/disk>` of a domain."""

    target: str  # "vda"
    device: str  # disk | cdrom | floppy | lun
    source_type: str  # file | block | network | volume | dir | nvme | vhostuser
    source: str | None  # file path, device path, or None when empty
    driver_type: str | None  # qcow2 | raw | ...
    bus: str | None = None
    readonly: bool = False
    shareable: bool = False
    alias: str | None = None  # live XML only: virtio-disk0


@dataclass(frozen=True)
class DomainInfo:
    name: str
    uuid: str | None
    disks: tuple[DomainDisk, ...]
    qemu_user: tuple[int, int] | None = None  # uid, gid QEMU runs as (live XML, DAC label)
    # A virtio channel for the QEMU guest agent: without one there is no
    # agent to ask for a freeze, and no reason to warn that none answered.
    agent_channel: bool = False

    def disk(self, target: str) -> DomainDisk | None:
        return next((d for d in self.disks if d.target == target), None)


GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"


def parse_domain(data: str | bytes, document: str = "domain XML") -> DomainInfo:
    root = xmldoc.parse(data, document, "domain")
    name = xmldoc.text_of(root.find("name"))
    if not name:
        raise XMLError(document, "<domain> has no <name>")
    disks = []
    for el in root.iterfind("devices/disk"):
        target_el = el.find("target")
        dev = target_el.get("dev") if target_el is not None else None
        if not dev:
            raise XMLError(document, "a <disk> of the domain has no <target dev='...'>")
        src_el = el.find("source")
        source = None
        if src_el is not None:
            source = (
                src_el.get("file")
                or src_el.get("dev")
                or src_el.get("dir")
                or src_el.get("name")
                or src_el.get("volume")
            )
        driver = el.find("driver")
        alias = el.find("alias")
        disks.append(
            DomainDisk(
                target=dev,
                device=el.get("device", "disk"),
                source_type=el.get("type", "file"),
                source=source,
                driver_type=driver.get("type") if driver is not None else None,
                bus=target_el.get("bus") if target_el is not None else None,
                readonly=el.find("readonly") is not None,
                shareable=el.find("shareable") is not None,
                alias=alias.get("name") if alias is not None else None,
            )
        )
    return DomainInfo(
        name=name,
        uuid=xmldoc.text_of(root.find("uuid")),
        disks=tuple(disks),
        qemu_user=_dac_label(root),
        agent_channel=any(
            t.get("name") == GUEST_AGENT_CHANNEL for t in root.iterfind("devices/channel/target")
        ),
    )


def _dac_label(root: etree._Element) -> tuple[int, int] | None:
    """The uid:gid of the running QEMU, from `<seclabel model='dac'>`
    (libvirt writes "+64055:+107")."""
    for sec in root.iterfind("seclabel"):
        if sec.get("model") != "dac":
            continue
        label = xmldoc.text_of(sec.find("label")) or ""
        uid, _, gid = label.partition(":")
        try:
            return int(uid.lstrip("+")), int(gid.lstrip("+"))
        except ValueError:
            return None
    return None


def backing_files(xml: str, target: str, document: str = "domain XML") -> list[str]:
    """The files the disk `target` reads below its own image, nearest first,
    as libvirt's live XML reports them (`<backingStore>` nesting). Empty for
    a standalone image, or a shut-off domain (libvirt reports chains only
    while it runs)."""
    root = xmldoc.parse(xml, document, "domain")
    out: list[str] = []
    for disk in root.findall("devices/disk"):
        t = disk.find("target")
        if t is None or t.get("dev") != target:
            continue
        store = disk.find("backingStore")
        while store is not None:
            source = store.find("source")
            if source is not None and source.get("file"):
                out.append(str(source.get("file")))
            store = store.find("backingStore")
    return out
