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

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from virtbackupd.adapters import repository
from virtbackupd.adapters.libvirt_conn import DomainRef, Libvirt
from virtbackupd.core.own_resources import Moved
from virtbackupd.core.restored_domain import RestoredDomain, RestoredImage, restored_domain_xml
from virtbackupd.core.untrusted_domain import Dropped, guest_target, host_offer
from virtbackupd.engine.restore.chain import NOTHING_RESTORED
from virtbackupd.engine.restore.context import running_user
from virtbackupd.errors import (
    DefineRefusedError,
    DefinitionMismatchError,
    InputError,
    LibvirtError,
    RestoreError,
    VirtBackupError,
)

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
    moved: tuple[Moved, ...] = ()

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.ref.name,
            "uuid": self.ref.uuid,
            "dropped_disks": list(self.dropped_disks),
            "dropped": [{"what": d.what, "why": d.why} for d in self.dropped],
            "emulator": self.emulator,
            "warnings": list(self.warnings),
            "moved": [{"what": m.what, "was": m.was, "now": m.now} for m in self.moved],
        }

    def report(self) -> list[str]:
        """The lines under "defined domain ..." in the CLI's text output."""
        out = []
        if self.dropped_disks:
            out.append(f"  not restored, left out of it: {', '.join(self.dropped_disks)}")
        out += [f"  left out (could reach the host): {d}" for d in self.dropped]
        out += [f"  its own (the original keeps its): {m}" for m in self.moved]
        return out


@dataclass(frozen=True)
class NewDomain:
    """The domain a restore defines: its name and images (in `folder`,
    where its own files go); `force` replaces a domain of that name."""

    name: str
    images: Mapping[str, RestoredImage]
    folder: Path
    force: bool = False


@dataclass(frozen=True)
class Planned:
    """A definition made, and checked as far as can be, before the restore
    writes anything: what libvirt is then given."""

    name: str
    xml: str
    new: RestoredDomain
    force: bool


async def plan_definition(lv: Libvirt, saved: SavedDefinition, wanted: NewDomain) -> Planned:
    """The domain `wanted` as it will be defined on its images, refused
    now for whatever can be known before a byte is copied: a disk of the
    restore its saved definition lacks, a guest the host has no emulator
    for, an existing domain of its name without `force` or while it runs."""
    name, images, force = wanted.name, wanted.images, wanted.force
    target = guest_target(saved.xml, saved.document)
    caps = await lv.domain_capabilities(target.virt_type, target.arch, target.machine)
    host = host_offer(caps, "libvirt's domain capabilities")
    try:
        new = restored_domain_xml(saved.xml, name, images, saved.document, host, wanted.folder)
    except DefinitionMismatchError as exc:
        raise DefinitionMismatchError(
            exc.document,
            f"{exc.problem} (the backup has it, its saved definition does not); leave it "
            f"out with --disk, or restore without --define; {NOTHING_RESTORED}",
        ) from None
    await _refuse_existing(lv, name, force)
    # --force replaces files in the folder: never one a running domain is on.
    user = await running_user(lv, {i.path for i in images.values() if i.path.exists()})
    if user is not None:
        raise RestoreError(f"{user[1]} is a disk of running domain {user[0]}; {NOTHING_RESTORED}")
    return Planned(name, new.xml, new, force)


async def _refuse_existing(lv: Libvirt, name: str, force: bool) -> None:
    if not await lv.exists(name):
        return
    if not force:
        raise InputError(
            f"--define {name}: a domain of that name exists; choose another name, "
            f"or give --force to replace it; {NOTHING_RESTORED}"
        )
    if await lv.is_running(await lv.domain(name)):
        raise RestoreError(f"domain {name!r} is running; shut it off to replace it")


async def define_planned(lv: Libvirt, saved: SavedDefinition, planned: Planned) -> Defined:
    """Define what :func:`plan_definition` made. An existing domain of that
    name (`force`) is replaced; if libvirt refuses the new definition, the
    old one is defined again and the refusal raised for the caller to
    take back what it wrote."""
    name = planned.name
    await _refuse_existing(lv, name, planned.force)  # again: the copy took time
    old_xml = None
    if await lv.exists(name):
        old = await lv.domain(name)
        old_xml = await lv.xml(old, inactive=True)
        await lv.undefine(old)
    try:
        ref = await lv.define(planned.xml)
    except LibvirtError as exc:
        if old_xml is not None:
            with contextlib.suppress(VirtBackupError):
                await lv.define(old_xml)
        raise DefineRefusedError(f"libvirt refused the definition of {name}: {exc}") from exc
    new = planned.new
    log.info(
        "domain defined from backup",
        domain=name,
        uuid=ref.uuid,
        dropped=new.dropped_disks,
        left_out=[str(d) for d in new.dropped],
        own=[str(m) for m in new.moved],
        emulator=new.emulator,
    )
    return Defined(ref, new.dropped_disks, new.dropped, new.emulator, saved.warnings, new.moved)


async def define_on_images(lv: Libvirt, saved: SavedDefinition, wanted: NewDomain) -> Defined:
    planned = await plan_definition(lv, saved, wanted)
    return await define_planned(lv, saved, planned)
