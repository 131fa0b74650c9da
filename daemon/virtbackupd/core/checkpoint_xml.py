"""The `<domaincheckpoint>` document (libvirt's formatcheckpoint), as typed values.

Element order and attribute order follow libvirt's formatter, so
``Checkpoint.from_xml(text).to_xml() == text`` for anything libvirt wrote.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum

from lxml import etree

from virtbackupd.core import xmldoc
from virtbackupd.core.xmldoc import element
from virtbackupd.errors import XMLError

ROOT = "domaincheckpoint"

# libvirt's checkpointName: usable as a file name, no leading dot, no "/".
_NAME_RE = re.compile(r"[a-zA-Z0-9_\-][a-zA-Z0-9_\-.]*")


def parent_of(data: str | bytes, document: str = "checkpoint XML") -> str | None:
    """The parent checkpoint's name in libvirt's XML of a checkpoint (None:
    a root). Read leniently, for checkpoints other tools made too: asking
    libvirt (virDomainCheckpointGetParent) makes libvirtd log an error for
    every root checkpoint, on every listing."""
    root = xmldoc.parse(data, document, ROOT)
    return xmldoc.text_of(root.find("parent/name"))


def check_checkpoint_name(name: str, document: str, where: str = "checkpoint name") -> str:
    if not _NAME_RE.fullmatch(name):
        raise XMLError(
            document,
            f"{where} '{name}' is not allowed: use letters, digits, '_', '-' and '.' "
            "(not first), as libvirt requires",
        )
    return name


class CheckpointDiskMode(StrEnum):
    NO = "no"
    BITMAP = "bitmap"


@dataclass(frozen=True)
class CheckpointDisk:
    """One `<disks/disk>`: whether (and in which bitmap) the disk is tracked."""

    name: str
    checkpoint: CheckpointDiskMode | None = None  # None: libvirt's default, bitmap
    bitmap: str | None = None
    size: int | None = None  # bytes changed since the checkpoint (output only)

    def to_element(self) -> etree._Element:
        return element(
            "disk",
            [
                ("name", self.name),
                ("checkpoint", self.checkpoint),
                ("bitmap", self.bitmap),
                ("size", None if self.size is None else str(self.size)),
            ],
        )

    @classmethod
    def from_element(cls, el: etree._Element, document: str) -> CheckpointDisk:
        a = xmldoc.attrs_of(el, document, ("name", "checkpoint", "bitmap", "size"))
        xmldoc.children_of(el, document, ())
        if "name" not in a:
            raise XMLError(
                document, "<disk> in <disks> needs a name='...' attribute (the target, e.g. vda)"
            )
        mode = xmldoc.parse_choice(
            a.get("checkpoint"),
            [m.value for m in CheckpointDiskMode],
            document,
            f"checkpoint= of disk '{a['name']}'",
        )
        disk = cls(
            name=a["name"],
            checkpoint=None if mode is None else CheckpointDiskMode(mode),
            bitmap=a.get("bitmap"),
            size=xmldoc.parse_uint(a.get("size"), document, f"size= of disk '{a['name']}'"),
        )
        if disk.checkpoint is CheckpointDiskMode.NO and (disk.bitmap or disk.size is not None):
            raise XMLError(
                document, f"disk '{disk.name}' has checkpoint='no' but names a bitmap or size"
            )
        return disk


@dataclass(frozen=True)
class Checkpoint:
    """A whole `<domaincheckpoint>`.

    ``domain_xml`` keeps the embedded `<domain>` as libvirt formatted it, so
    the checkpoint can be redefined later (VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE).
    ``active`` is libvirt-internal status XML, accepted only with ``internal=True``.
    """

    name: str | None = None
    description: str | None = None
    parent: str | None = None
    creation_time: int | None = None
    disks: tuple[CheckpointDisk, ...] = ()
    domain_xml: str | None = None
    active: int | None = None

    def __post_init__(self) -> None:
        if self.name is not None:
            check_checkpoint_name(self.name, "checkpoint")
        if self.parent is not None:
            check_checkpoint_name(self.parent, "checkpoint", "parent checkpoint name")
        seen: set[str] = set()
        for d in self.disks:
            if d.name in seen:
                raise XMLError("checkpoint", f"disk '{d.name}' is listed twice")
            seen.add(d.name)

    def disk(self, name: str) -> CheckpointDisk | None:
        return next((d for d in self.disks if d.name == name), None)

    def to_element(self) -> etree._Element:
        domain = None
        if self.domain_xml is not None:
            domain = xmldoc.parse(self.domain_xml, "embedded domain XML", "domain")
        return element(
            ROOT,
            children=[
                element("name", text=self.name) if self.name is not None else None,
                element("description", text=self.description)
                if self.description is not None
                else None,
                element("parent", children=[element("name", text=self.parent)])
                if self.parent is not None
                else None,
                element("creationTime", text=str(self.creation_time))
                if self.creation_time is not None
                else None,
                element("disks", children=[d.to_element() for d in self.disks])
                if self.disks
                else None,
                domain,
                element("active", text=str(self.active)) if self.active is not None else None,
            ],
        )

    def to_xml(self) -> str:
        return xmldoc.serialize(self.to_element())

    @classmethod
    def from_xml(
        cls, data: str | bytes, document: str = "checkpoint XML", *, internal: bool = False
    ) -> Checkpoint:
        """Parse a checkpoint document. ``internal`` admits libvirt's
        status-only `<active>` element, which user XML must not carry."""
        root = xmldoc.parse(data, document, ROOT)
        return cls.from_element(root, document, internal=internal)

    @classmethod
    def from_element(
        cls, root: etree._Element, document: str, *, internal: bool = False
    ) -> Checkpoint:
        xmldoc.attrs_of(root, document, ())
        allowed = ["name", "description", "parent", "creationTime", "disks", "domain"]
        if internal:
            allowed.append("active")
        elif root.find("active") is not None:
            raise XMLError(
                document, "<active> is internal to libvirt and not allowed in checkpoint XML"
            )
        xmldoc.children_of(root, document, allowed)

        name = xmldoc.text_of(xmldoc.single(root, "name", document))
        if name is not None:
            check_checkpoint_name(name, document)
        parent_el = xmldoc.single(root, "parent", document)
        parent = None
        if parent_el is not None:
            xmldoc.children_of(parent_el, document, ["name"])
            parent = xmldoc.text_of(xmldoc.single(parent_el, "name", document))
            if parent is None:
                raise XMLError(document, "<parent> needs a <name>")
            check_checkpoint_name(parent, document, "parent checkpoint name")
        disks_el = xmldoc.single(root, "disks", document)
        disks: tuple[CheckpointDisk, ...] = ()
        if disks_el is not None:
            kids = xmldoc.children_of(disks_el, document, ["disk"])
            if not kids:
                raise XMLError(
                    document, "<disks> is empty; list at least one <disk> or leave it out"
                )
            disks = tuple(CheckpointDisk.from_element(k, document) for k in kids)
        domain_el = xmldoc.single(root, "domain", document)
        active = xmldoc.single(root, "active", document)
        try:
            return cls(
                name=name,
                description=xmldoc.text_of(xmldoc.single(root, "description", document)),
                parent=parent,
                creation_time=xmldoc.parse_uint(
                    xmldoc.text_of(xmldoc.single(root, "creationTime", document)),
                    document,
                    "<creationTime>",
                ),
                disks=disks,
                domain_xml=None if domain_el is None else xmldoc.serialize(domain_el),
                active=xmldoc.parse_uint(xmldoc.text_of(active), document, "<active>"),
            )
        except XMLError as exc:
            raise XMLError(document, exc.problem) from exc


def for_redefinition(
    stored_xml: str,
    domain_xml: str,
    document: str,
    keep_parent: Callable[[str], bool] = lambda _: True,
) -> str:
    """A stored checkpoint's XML, to redefine it, with the domain's current
    definition (from libvirt) embedded in place of the stored one: libvirt
    acts on the embedded `<domain>` at redefinition (it runs its
    `<emulator>` to probe it), and the stored copy may have come back from
    a repository that someone else could edit. A parent `keep_parent`
    refuses (one libvirt does not know: pruned since) is left out, and the
    checkpoint comes back as a root."""
    cp = Checkpoint.from_xml(stored_xml, document)
    parent = cp.parent if cp.parent is not None and keep_parent(cp.parent) else None
    return replace(cp, domain_xml=domain_xml, parent=parent).to_xml()
