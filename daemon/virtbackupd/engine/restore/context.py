"""What every part of a restore shares: the backup and disks it reads and
how (:class:`RestoreContext`), what it wrote (:class:`RestoredDisk`), and
the guard that nothing a running domain uses is written over."""

from __future__ import annotations

from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass
from pathlib import Path

from virtbackupd.adapters.libvirt_conn import Libvirt
from virtbackupd.core.domain_xml import parse_domain
from virtbackupd.core.repository_format.manifest import Manifest
from virtbackupd.engine.datapath.copy import CopyProgress, CopyResult
from virtbackupd.errors import DomainNotFoundError, UnknownRestorePointError

FORMATS = ("qcow2", "raw")

ProgressFn = Callable[[str, CopyProgress], None]


@dataclass(frozen=True)
class RestoreContext:
    """One restore's source and manner, the same for each of its disks."""

    folder: Path  # the backup's folder in the repository
    disks: tuple[str, ...]  # the disks restored (targets: vda, ...)
    runtime_dir: Path  # sockets of the qemu-nbd a read may need
    progress: ProgressFn | None = None
    allow_damaged: bool = False  # write what can be read of a damaged chain

    def progress_of(self, disk: str) -> Callable[[CopyProgress], None] | None:
        return of_disk(self.progress, disk)


@dataclass(frozen=True)
class RestoredDisk:
    disk: str
    path: Path
    fmt: str
    result: CopyResult
    damage: tuple[str, ...] = ()  # with allow_damaged: what did not check out
    partial: Path | None = None  # written, not yet renamed to `path`


def disks_of(manifest: Manifest, wanted: Sequence[str]) -> list[str]:
    have = [d.disk for d in manifest.disks]
    unknown = sorted(set(wanted) - set(have))
    if unknown:
        raise UnknownRestorePointError(
            f"backup {manifest.id} has no disk {', '.join(unknown)} (it has {', '.join(have)})"
        )
    return [d for d in have if not wanted or d in wanted]


def of_disk(progress: ProgressFn | None, disk: str) -> Callable[[CopyProgress], None] | None:
    return (lambda p: progress(disk, p)) if progress else None


async def running_user(lv: Libvirt, paths: Set[Path]) -> tuple[str, Path] | None:
    """A running domain with one of `paths` (files or devices) as a disk,
    and which path: nothing a domain runs on may be written over."""
    wanted = {p.resolve(): p for p in paths}
    for ref in await lv.domains():
        try:
            if not await lv.is_running(ref):
                continue
            xml = await lv.xml(ref)
        except DomainNotFoundError:
            continue  # undefined since the listing: it runs on nothing
        info = parse_domain(xml, f"domain XML of {ref.name}")
        for d in info.disks:
            if d.source and (hit := wanted.get(Path(d.source).resolve())) is not None:
                return ref.name, hit
    return None
