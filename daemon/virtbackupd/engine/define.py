"""Defining a new domain from a backup's saved domain XML (`restore
--define`, `restore --live`).

The saved XML is untrusted input (a repository is data, never code): it is
checked against the digest its manifest recorded before anything is
restored, and at define time core.restored_domain keeps the guest's
hardware but takes out, and reports, whatever would reach the host; the
emulator is the one libvirt's domain capabilities name for the guest's
type, architecture and machine, never the stored path (libvirt runs the
emulator to probe it as soon as a definition names it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from virtbackupd.adapters import repository
from virtbackupd.adapters.libvirt_conn import DomainRef, Libvirt
from virtbackupd.core.restored_domain import RestoredImage, restored_domain_xml
from virtbackupd.core.untrusted_domain import Dropped, guest_target, host_offer
from virtbackupd.engine.restore import RestoredDisk
from virtbackupd.errors import RestoreError

log = structlog.get_logger("virtbackupd.restore")

ACCEPT_FLAG = "--accept-edited-definition"


@dataclass(frozen=True)
class SavedDefinition:
    """A backup's domain.xml, read (and checked) for a new domain."""

    document: str  # the file, for messages
    xml: str
    warnings: tuple[str, ...]  # for the operator: why it is used as it is


def saved_definition(folder: Path, accept_edited: bool = False) -> SavedDefinition:
    """The backup's domain.xml. One that no longer matches its manifest's
    digest is refused (exit 2) unless `accept_edited`: an operator who
    changed it on purpose, say for another host. A manifest written before
    digests has none to check: used with a warning. Either way it is
    sanitised at define time."""
    manifest = repository.read_manifest(folder)
    try:
        doc = repository.read_document(
            folder, manifest, repository.DOMAIN_XML, accept_edited=accept_edited
        )
    except repository.DocumentDigestError as exc:
        raise repository.DocumentDigestError(
            exc.path,
            f"does not match the SHA-256 recorded for it in {repository.MANIFEST}; "
            f"refusing to define from it (give {ACCEPT_FLAG} if you edited it)",
        ) from exc
    warnings: tuple[str, ...] = ()
    if doc.trust is repository.Trust.UNRECORDED:
        warnings = (
            f"{doc.path}: its manifest records no digest (a backup from before digests); "
            "used as it is, less what could reach the host",
        )
    elif doc.trust is repository.Trust.EDITED:
        warnings = (f"{doc.path}: edited since the backup; used as {ACCEPT_FLAG} asks",)
    return SavedDefinition(str(doc.path), doc.text, warnings)


@dataclass(frozen=True)
class Defined:
    """A domain defined from a backup, and what of its saved XML was left out."""

    ref: DomainRef
    dropped_disks: tuple[str, ...]
    dropped: tuple[Dropped, ...]
    emulator: str
    warnings: tuple[str, ...]

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.ref.name,
            "uuid": self.ref.uuid,
            "dropped_disks": list(self.dropped_disks),
            "dropped": [{"what": d.what, "why": d.why} for d in self.dropped],
            "emulator": self.emulator,
            "warnings": list(self.warnings),
        }

    def report(self) -> list[str]:
        """The lines under "defined domain ..." in the CLI's text output."""
        out = []
        if self.dropped_disks:
            out.append(f"  not restored, left out of it: {', '.join(self.dropped_disks)}")
        out += [f"  left out (could reach the host): {d}" for d in self.dropped]
        return out


async def define_restored(
    lv: Libvirt,
    saved: SavedDefinition,
    name: str,
    restored: Sequence[RestoredDisk],
    force: bool,
) -> Defined:
    """Define `name` from the backup's saved domain XML, on the restored
    images. An existing domain of that name is replaced only with `force`,
    and never while it runs."""
    images = {r.disk: RestoredImage(r.path, r.fmt) for r in restored}
    return await define_on_images(lv, saved, name, images, force)


async def define_on_images(
    lv: Libvirt,
    saved: SavedDefinition,
    name: str,
    images: Mapping[str, RestoredImage],
    force: bool,
) -> Defined:
    # What can fail on the saved XML fails before an existing domain goes.
    target = guest_target(saved.xml, saved.document)
    caps = await lv.domain_capabilities(target.virt_type, target.arch, target.machine)
    host = host_offer(caps, "libvirt's domain capabilities")
    new = restored_domain_xml(saved.xml, name, images, saved.document, host)
    if await lv.exists(name):
        if not force:
            raise RestoreError(f"a domain named {name!r} exists; give --force to replace it")
        old = await lv.domain(name)
        if await lv.is_running(old):
            raise RestoreError(f"domain {name!r} is running; shut it off to replace it")
        await lv.undefine(old)
    ref = await lv.define(new.xml)
    log.info(
        "domain defined from backup",
        domain=name,
        uuid=ref.uuid,
        dropped=new.dropped_disks,
        left_out=[str(d) for d in new.dropped],
        emulator=new.emulator,
    )
    return Defined(ref, new.dropped_disks, new.dropped, new.emulator, saved.warnings)
