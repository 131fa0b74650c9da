"""The domain XML of a restored copy: the saved (inactive) XML of the
backed-up domain, made into a new, independent domain. Pure.

- new name; no <uuid> (libvirt makes a new one);
- every interface's <mac> removed (libvirt generates new addresses, so the
  copy can share a network with the original);
- restored disks point at the restored images, with their format, and lose
  any <backingStore>;
- writable disks that were not restored are dropped: leaving them would
  make two domains write to one image;
- any other disk's medium outside the restore's own files goes too: a
  cdrom or floppy drive stays, empty; a read-only disk is dropped;
- <nvram> is dropped so libvirt gives the copy its own UEFI variable store
  (from the loader's template) instead of sharing the original's;
- the original's host files, sockets and fixed ports become the copy's
  own (core.own_resources), so that it can run beside the original;
- the saved XML is untrusted input: core.untrusted_domain takes out (and
  reports) whatever in it would reach the host, and the emulator is the
  host's own.

Checkpoints are never copied: the restored images carry no bitmaps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from virtbackupd.core import xmldoc
from virtbackupd.core.own_resources import Moved, make_own
from virtbackupd.core.untrusted_domain import Dropped, HostOffer, Sanitiser
from virtbackupd.errors import DefinitionMismatchError, XMLError


@dataclass(frozen=True)
class RestoredImage:
    path: Path
    fmt: str  # "qcow2" | "raw"


@dataclass(frozen=True)
class RestoredDomain:
    xml: str
    dropped_disks: tuple[str, ...]  # writable disks that were not restored
    dropped: tuple[Dropped, ...] = ()  # what could reach the host, taken out
    emulator: str = ""  # the host's, in place of the saved one
    moved: tuple[Moved, ...] = ()  # the original's host resources, the copy's own now


# Parts of a disk that name something of the host besides its medium.
_DISK_HOST_PARTS = ("source", "backingStore", "auth", "encryption", "mirror")


# C901: one branch per rewritten element of the saved definition
def restored_domain_xml(  # noqa: C901 (see above)
    saved_xml: str,
    name: str,
    images: Mapping[str, RestoredImage],
    document: str,
    host: HostOffer,
    folder: Path | None = None,
) -> RestoredDomain:
    """`folder`: where the copy's own files go (default: the images')."""
    root = xmldoc.parse(saved_xml, document, "domain")
    name_el = root.find("name")
    if name_el is None:
        raise XMLError(document, "<domain> has no <name>")
    name_el.text = name
    for tag in ("uuid", "os/nvram", "devices/interface/mac"):
        for el in root.findall(tag):
            _remove(el)
    dropped_disks = []
    dropped: list[Dropped] = []
    seen = set()
    for disk in root.findall("devices/disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        image = images.get(dev or "")
        device = disk.get("device", "disk")
        if image is None:
            if device in ("disk", "lun") and disk.find("readonly") is None:
                dropped_disks.append(dev or "?")
                _remove(disk)
            elif disk.find("source") is not None:
                what = f"<disk device='{device}'> {dev or '?'} {_medium(disk)}".rstrip()
                why = "a medium outside the restore's own files"
                if device in ("cdrom", "floppy"):
                    # The drive stays, empty: the guest's hardware is unchanged.
                    for el in [c for c in disk if c.tag in _DISK_HOST_PARTS]:
                        disk.remove(el)
                    dropped.append(Dropped(what, why + "; the drive stays, empty"))
                else:
                    _remove(disk)
                    dropped.append(Dropped(what, why))
            continue
        seen.add(dev)
        disk.set("type", "file")
        for el in [c for c in disk if c.tag in _DISK_HOST_PARTS]:
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
        raise DefinitionMismatchError(
            document, f"no <disk> with target {', '.join(missing)} to restore into"
        )
    if folder is None:
        folder = next(iter(images.values())).path.parent if images else Path("/")
    own = make_own(root, folder)
    dropped += own.dropped
    allowed = [str(i.path) for i in images.values()] + sorted(own.paths)
    dropped += Sanitiser(root, host, allowed).run()
    # libvirt re-formats what it is given; tostring keeps comments and
    # mixed content (<description>) that the strict formatter does not model.
    return RestoredDomain(
        etree.tostring(root, encoding="unicode"),
        tuple(dropped_disks),
        tuple(dropped),
        host.emulator,
        own.moved,
    )


def _medium(disk: etree._Element) -> str:
    source = disk.find("source")
    if source is None:
        return ""
    return " ".join(str(v) for v in source.attrib.values() if v)


def _remove(el: etree._Element) -> None:
    parent = el.getparent()
    if parent is not None:
        parent.remove(el)
