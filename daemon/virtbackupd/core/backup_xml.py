"""The `<domainbackup>` document (libvirt's formatbackup), as typed values.

Attribute and element order follow libvirt's formatter. ``align_disks``
is the defaulting libvirt applies before a backup starts
(virDomainBackupAlignDisks); the project applies it itself so the document
it hands to libvirt already says exactly what will happen to every disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from lxml import etree

from virtbackupd.core import xmldoc
from virtbackupd.core.domain_xml import DomainDisk
from virtbackupd.core.storage_xml import Encryption, Seclabel
from virtbackupd.core.xmldoc import element
from virtbackupd.errors import XMLError

ROOT = "domainbackup"


class BackupMode(StrEnum):
    PUSH = "push"
    PULL = "pull"


class DiskBackupMode(StrEnum):
    FULL = "full"
    INCREMENTAL = "incremental"


class StoreType(StrEnum):
    FILE = "file"
    BLOCK = "block"


class Transport(StrEnum):
    TCP = "tcp"
    UNIX = "unix"
    FD = "fd"


def _yes_no(value: bool | None) -> str | None:
    return None if value is None else ("yes" if value else "no")


def _parse_yes_no(value: str | None, document: str, where: str) -> bool | None:
    v = xmldoc.parse_choice(value, ("yes", "no"), document, where)
    return None if v is None else v == "yes"


@dataclass(frozen=True)
class Store:
    """Where libvirt writes: a push `<target>` or a pull `<scratch>`.

    The element name depends on the backup mode and the path attribute
    (file= or dev=) on the disk's type, so both are given when formatting.
    """

    path: str
    seclabels: tuple[Seclabel, ...] = ()
    encryption: Encryption | None = None

    def to_element(self, tag: str, store_type: StoreType) -> etree._Element:
        attr = "file" if store_type is StoreType.FILE else "dev"
        return element(
            tag,
            [(attr, self.path)],
            children=[
                *(s.to_element() for s in self.seclabels),
                self.encryption.to_element() if self.encryption else None,
            ],
        )

    @classmethod
    def from_element(cls, el: etree._Element, document: str, store_type: StoreType) -> Store:
        attr = "file" if store_type is StoreType.FILE else "dev"
        a = xmldoc.attrs_of(el, document, (attr,))
        kids = xmldoc.children_of(el, document, ("seclabel", "encryption"))
        if attr not in a:
            raise XMLError(document, f"<{el.tag}> of a type='{store_type}' disk needs {attr}='...'")
        enc = xmldoc.single(el, "encryption", document)
        return cls(
            path=a[attr],
            seclabels=tuple(
                Seclabel.from_element(k, document) for k in kids if k.tag == "seclabel"
            ),
            encryption=None if enc is None else Encryption.from_element(enc, document),
        )


@dataclass(frozen=True)
class BackupDisk:
    """One `<disks/disk>` of a backup."""

    name: str
    backup: bool | None = None  # None: not said (libvirt's default is yes)
    type: StoreType | None = None
    backupmode: DiskBackupMode | None = None
    incremental: str | None = None
    exportname: str | None = None
    exportbitmap: str | None = None
    driver_type: str | None = None
    store: Store | None = None
    index: int | None = None  # libvirt's storage index of the store (its output only)
    state: str | None = None  # libvirt-internal job state (status XML only)

    def to_element(self, mode: BackupMode) -> etree._Element:
        store_type = self.type or StoreType.FILE
        tag = "scratch" if mode is BackupMode.PULL else "target"
        return element(
            "disk",
            [
                ("name", self.name),
                ("backup", _yes_no(self.backup)),
                ("state", self.state),
                ("type", self.type),
                ("backupmode", self.backupmode),
                ("incremental", self.incremental),
                ("exportname", self.exportname),
                ("exportbitmap", self.exportbitmap),
                ("index", None if self.index is None else str(self.index)),
            ],
            children=[
                element("driver", [("type", self.driver_type)]) if self.driver_type else None,
                self.store.to_element(tag, store_type) if self.store else None,
            ],
        )

    @classmethod
    def from_element(
        cls, el: etree._Element, mode: BackupMode, document: str, internal: bool
    ) -> BackupDisk:
        allowed = [
            "name",
            "backup",
            "type",
            "backupmode",
            "incremental",
            "exportname",
            "exportbitmap",
            "index",
        ]
        if internal:
            allowed.append("state")
        elif "state" in el.attrib:
            raise XMLError(document, "disk attribute state= is internal to libvirt")
        a = xmldoc.attrs_of(el, document, allowed)
        store_tag = "scratch" if mode is BackupMode.PULL else "target"
        xmldoc.children_of(el, document, ("driver", store_tag))
        name = a.get("name")
        if not name:
            raise XMLError(
                document, "<disk> in <disks> needs a name='...' attribute (the target, e.g. vda)"
            )
        where = f"disk '{name}'"
        stype = xmldoc.parse_choice(
            a.get("type"), [t.value for t in StoreType], document, f"type= of {where}"
        )
        store_type = StoreType(stype) if stype else None
        bmode = xmldoc.parse_choice(
            a.get("backupmode"),
            [m.value for m in DiskBackupMode],
            document,
            f"backupmode= of {where}",
        )
        driver = xmldoc.single(el, "driver", document)
        driver_type = None
        if driver is not None:
            driver_type = xmldoc.attrs_of(driver, document, ("type",)).get("type")
        store_el = xmldoc.single(el, store_tag, document)
        disk = cls(
            name=name,
            backup=_parse_yes_no(a.get("backup"), document, f"backup= of {where}"),
            type=store_type,
            backupmode=DiskBackupMode(bmode) if bmode else None,
            incremental=a.get("incremental"),
            exportname=a.get("exportname"),
            exportbitmap=a.get("exportbitmap"),
            driver_type=driver_type,
            store=None
            if store_el is None
            else Store.from_element(store_el, document, store_type or StoreType.FILE),
            index=xmldoc.parse_uint(a.get("index"), document, f"index= of {where}"),
            state=a.get("state"),
        )
        if disk.backupmode is DiskBackupMode.FULL and disk.incremental is not None:
            raise XMLError(document, f"{where} is backupmode='full' but names incremental=")
        return disk


@dataclass(frozen=True)
class Server:
    """The NBD server of a pull-mode backup."""

    transport: Transport | None = None  # None: libvirt's default, tcp
    name: str | None = None
    port: int | None = None
    socket: str | None = None
    fdgroup: str | None = None
    tls: bool | None = None

    def __post_init__(self) -> None:
        t = self.transport or Transport.TCP
        if t is Transport.UNIX and not self.socket:
            raise XMLError("backup server", "transport='unix' needs socket='...'")
        if t is Transport.TCP and not self.name:
            raise XMLError("backup server", "transport='tcp' needs name='host'")
        if t is Transport.FD and not self.fdgroup:
            raise XMLError("backup server", "transport='fd' needs fdgroup='...'")

    def to_element(self) -> etree._Element:
        return element(
            "server",
            [
                ("transport", self.transport),
                ("tls", _yes_no(self.tls)),
                ("name", self.name),
                ("port", None if self.port is None else str(self.port)),
                ("socket", self.socket),
                ("fdgroup", self.fdgroup),
            ],
        )

    @classmethod
    def from_element(cls, el: etree._Element, document: str) -> Server:
        a = xmldoc.attrs_of(el, document, ("transport", "tls", "name", "port", "socket", "fdgroup"))
        xmldoc.children_of(el, document, ())
        t = xmldoc.parse_choice(
            a.get("transport"), [t.value for t in Transport], document, "server transport="
        )
        try:
            return cls(
                transport=Transport(t) if t else None,
                name=a.get("name"),
                port=xmldoc.parse_uint(a.get("port"), document, "server port="),
                socket=a.get("socket"),
                fdgroup=a.get("fdgroup"),
                tls=_parse_yes_no(a.get("tls"), document, "server tls="),
            )
        except XMLError as exc:
            raise XMLError(document, exc.problem) from exc


@dataclass(frozen=True)
class Backup:
    """A whole `<domainbackup>`. ``private_data`` is libvirt-internal status
    XML, accepted only with ``internal=True`` and kept as formatted text."""

    mode: BackupMode | None = None  # None: libvirt's default, push
    incremental: str | None = None
    server: Server | None = None
    disks: tuple[BackupDisk, ...] = ()
    private_data: str | None = None

    @property
    def effective_mode(self) -> BackupMode:
        return self.mode or BackupMode.PUSH

    def disk(self, name: str) -> BackupDisk | None:
        return next((d for d in self.disks if d.name == name), None)

    def to_element(self) -> etree._Element:
        private = None
        if self.private_data is not None:
            private = xmldoc.parse(self.private_data, "backup private data", "privateData")
        return element(
            ROOT,
            [("mode", self.mode)],
            children=[
                element("incremental", text=self.incremental)
                if self.incremental is not None
                else None,
                self.server.to_element() if self.server else None,
                element("disks", children=[d.to_element(self.effective_mode) for d in self.disks])
                if self.disks
                else None,
                private,
            ],
        )

    def to_xml(self) -> str:
        return xmldoc.serialize(self.to_element())

    @classmethod
    def from_xml(
        cls, data: str | bytes, document: str = "backup XML", *, internal: bool = False
    ) -> Backup:
        """Parse a backup document. ``internal`` admits libvirt's status-only
        parts (per-disk state=, `<privateData>`), which user XML must not carry."""
        root = xmldoc.parse(data, document, ROOT)
        xmldoc.attrs_of(root, document, ("mode",))
        allowed = ["incremental", "server", "disks"]
        if internal:
            allowed.append("privateData")
        elif root.find("privateData") is not None:
            raise XMLError(
                document, "<privateData> is internal to libvirt and not allowed in backup XML"
            )
        xmldoc.children_of(root, document, allowed)
        m = xmldoc.parse_choice(root.get("mode"), [m.value for m in BackupMode], document, "mode=")
        mode = BackupMode(m) if m else None
        effective = mode or BackupMode.PUSH
        server_el = xmldoc.single(root, "server", document)
        if server_el is not None and effective is BackupMode.PUSH:
            raise XMLError(document, "<server> is only allowed with mode='pull'")
        disks_el = xmldoc.single(root, "disks", document)
        disks: tuple[BackupDisk, ...] = ()
        if disks_el is not None:
            kids = xmldoc.children_of(disks_el, document, ["disk"])
            disks = tuple(BackupDisk.from_element(k, effective, document, internal) for k in kids)
            names = [d.name for d in disks]
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise XMLError(document, f"disk '{sorted(dup)[0]}' is listed twice")
        private_el = xmldoc.single(root, "privateData", document)
        return cls(
            mode=mode,
            incremental=xmldoc.text_of(xmldoc.single(root, "incremental", document)),
            server=None if server_el is None else Server.from_element(server_el, document),
            disks=disks,
            private_data=None if private_el is None else xmldoc.serialize(private_el),
        )


def align_disks(backup: Backup, domain_disks: Sequence[DomainDisk], suffix: str) -> Backup:
    """Fill in what libvirt would default before starting `backup` on a
    domain with `domain_disks` (virDomainBackupAlignDisks):

    - the mode becomes explicit (push when absent);
    - listed disks get backup='yes' unless they say 'no', a store type
      (file), a backupmode and, for incremental ones, the checkpoint
      (per-disk, else the top-level `<incremental>`);
    - a disk without a target/scratch gets ``<source>.<suffix>``;
    - domain disks not listed are appended as backup='no' — or, when no
      disk is listed at all, every disk with a source is backed up.
    """
    document = "backup XML"
    by_target = {d.target: d for d in domain_disks}
    for d in backup.disks:
        if d.name not in by_target:
            raise XMLError(document, f"no disk named '{d.name}' in the domain")
    listed = {d.name for d in backup.disks}
    backup_all = not backup.disks
    disks: list[BackupDisk] = []
    for d in backup.disks:
        disks.append(_align_disk(d, backup, by_target[d.name], suffix, document))
    for dd in domain_disks:
        if dd.target in listed:
            continue
        if backup_all and dd.source and not dd.readonly:
            disks.append(_align_disk(BackupDisk(name=dd.target), backup, dd, suffix, document))
        else:
            disks.append(BackupDisk(name=dd.target, backup=False))
    return replace(backup, mode=backup.effective_mode, disks=tuple(disks))


def _align_disk(
    d: BackupDisk, backup: Backup, dd: DomainDisk, suffix: str, document: str
) -> BackupDisk:
    if d.backup is False:
        return BackupDisk(name=d.name, backup=False)
    bmode = d.backupmode
    if bmode is None:
        bmode = (
            DiskBackupMode.INCREMENTAL
            if (d.incremental or backup.incremental)
            else DiskBackupMode.FULL
        )
    incremental = None
    if bmode is DiskBackupMode.INCREMENTAL:
        incremental = d.incremental or backup.incremental
        if incremental is None:
            raise XMLError(
                document,
                f"disk '{d.name}' is backupmode='incremental' but no checkpoint is named "
                "(set incremental= on the disk or <incremental> on the backup)",
            )
    store_type = d.type or StoreType.FILE
    store = d.store
    if store is None:
        if store_type is not StoreType.FILE or not dd.source:
            raise XMLError(document, f"disk '{d.name}' needs an explicit target/scratch path")
        store = Store(path=f"{dd.source}.{suffix}")
    return replace(
        d, backup=True, type=store_type, backupmode=bmode, incremental=incremental, store=store
    )
