"""The domain XML of a restored copy: the saved (inactive) XML of the
backed-up domain, made into a new, independent domain. Pure.

- new name; no <uuid> (libvirt makes a new one);
- every interface's <mac> removed (libvirt generates new addresses, so the
  copy can share a network with the original);
- restored disks point at the restored images, with their format, and lose
  any <backingStore>;
- writable disks that were not restored are dropped: leaving them would
  make two domains write to one image;
- <nvram> is dropped so libvirt gives the copy its own UEFI variable store
  (from the loader's template) instead of sharing the original's.

Checkpoints are never copied: the restored images carry no bitmaps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from virtbackupd.core import xmldoc
from virtbackupd.errors import XMLError


@dataclass(frozen=True)
class RestoredImage:
    path: Path
    fmt: str  # "qcow2" | "raw"


@dataclass(frozen=True)
class RestoredDomain:
    xml: str
    dropped_disks: tuple[str, ...]  # writable disks that were not restored


def restored_domain_xml(
    saved_xml: str, name: str, images: Mapping[str, RestoredImage], document: str
) -> RestoredDomain:
    root = xmldoc.parse(saved_xml, document, "domain")
    name_el = root.find("name")
    if name_el is None:
        raise XMLError(document, "<domain> has no <name>")
    name_el.text = name
    for tag in ("uuid", "os/nvram", "devices/interface/mac"):
        for el in root.findall(tag):
            _remove(el)
    dropped = []
    seen = set()
    devices = root.find("devices")
    for disk in root.findall("devices/disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        image = images.get(dev or "")
        if image is None:
            if disk.get("device", "disk") in ("disk", "lun") and disk.find("readonly") is None:
                dropped.append(dev or "?")
                assert devices is not None
                devices.remove(disk)
            continue
        seen.add(dev)
        disk.set("type", "file")
        for el in disk.findall("source") + disk.findall("backingStore"):
            disk.remove(el)
        source = xmldoc.element("source", [("file", str(image.path))])
        driver = disk.find("driver")
        if driver is None:
            driver = xmldoc.element("driver", [("name", "qemu")])
            disk.insert(0, driver)
        driver.set("type", image.fmt)
        disk.insert(list(disk).index(driver) + 1, source)
    missing = sorted(set(images) - seen)
    if missing:
        raise XMLError(document, f"no <disk> with target {', '.join(missing)} to restore into")
    # libvirt re-formats what it is given; tostring keeps comments and
    # mixed content (<description>) that the strict formatter does not model.
    return RestoredDomain(etree.tostring(root, encoding="unicode"), tuple(dropped))


def _remove(el: etree._Element) -> None:
    parent = el.getparent()
    if parent is not None:
        parent.remove(el)
