"""The backup repository on disk.

    <backup_root>/<domain uuid>/<backup id>/
        <disk>.qcow2      full: standalone; incremental: overlay whose backing
                          file is ../<parent id>/<disk>.qcow2 (relative)
        manifest.json     ids, level, checkpoint, parent, per-disk digests
        domain.xml        the domain's (inactive) XML at backup time
        checkpoint.xml    libvirt's checkpoint XML, for redefinition

A backup is written under ``<backup id>.partial/``, every file fsynced, then
renamed: a crash never leaves a half backup that looks complete. Folders
are 0700, files 0600. Standard tools read the chain without this project
(``qemu-img info --backing-chain``, ``qemu-img convert``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from virtbackupd.core.plan import Plan
from virtbackupd.core.records import DiskRecord
from virtbackupd.engine.copy import CopyResult

MANIFEST = "manifest.json"
PRUNE_JOURNAL = ".prune-journal.json"  # in a domain folder while a prune runs
FORMAT = "virtbackupd-backup/1"


def new_backup_id(now: datetime) -> str:
    """Unique, and sorting as the backups were taken (to the millisecond):
    ``20261123T201500.123Z-3f2a``."""
    return f"{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z-{secrets.token_hex(2)}"


def disk_file(disk: str) -> str:
    return f"{disk}.qcow2"


def backing_of(parent_id: str, disk: str) -> str:
    """Backing path of an incremental, relative to the overlay's folder."""
    return f"../{parent_id}/{disk_file(disk)}"


class Repository:
    def __init__(self, root: Path) -> None:
        self.root = root

    def domain_dir(self, uuid: str) -> Path:
        return self.root / uuid

    def final_dir(self, uuid: str, backup_id: str) -> Path:
        return self.domain_dir(uuid) / backup_id

    def partial_dir(self, uuid: str, backup_id: str) -> Path:
        return self.domain_dir(uuid) / f"{backup_id}.partial"

    def create_partial(self, uuid: str, backup_id: str) -> Path:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.domain_dir(uuid).mkdir(exist_ok=True, mode=0o700)
        partial = self.partial_dir(uuid, backup_id)
        partial.mkdir(mode=0o700)
        return partial

    def discard(self, uuid: str, backup_id: str) -> None:
        shutil.rmtree(self.partial_dir(uuid, backup_id), ignore_errors=True)

    def commit(
        self,
        uuid: str,
        backup_id: str,
        manifest: dict[str, Any],
        texts: dict[str, str],
        images: Sequence[str],
    ) -> Path:
        """Write the metadata files, fsync everything, rename into place."""
        partial = self.partial_dir(uuid, backup_id)
        files = {MANIFEST: json.dumps({"format": FORMAT, **manifest}, indent=2) + "\n", **texts}
        for name, text in files.items():
            _write_synced(partial / name, text)
        for image in images:
            path = partial / image
            path.chmod(0o600)
            fsync_path(path)
        fsync_path(partial)
        final = self.final_dir(uuid, backup_id)
        partial.rename(final)
        fsync_path(final.parent)
        return final

    def stale_partials(self) -> list[Path]:
        """Leftovers of backups that crashed before their rename."""
        if not self.root.is_dir():
            return []
        return sorted(self.root.glob("*/*.partial"))


def write_manifest(folder: Path, data: Mapping[str, Any]) -> None:
    """Replace a backup's manifest atomically (merges rewrite it)."""
    _replace_synced(folder / MANIFEST, json.dumps({**data, "format": FORMAT}, indent=2) + "\n")


def read_journal(domain_dir: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((domain_dir / PRUNE_JOURNAL).read_text())
    except FileNotFoundError:
        return None
    return data


def write_journal(domain_dir: Path, data: Mapping[str, Any]) -> None:
    _replace_synced(domain_dir / PRUNE_JOURNAL, json.dumps(data) + "\n")


def drop_journal(domain_dir: Path) -> None:
    (domain_dir / PRUNE_JOURNAL).unlink(missing_ok=True)
    fsync_path(domain_dir)


def being_removed(domain_dir: Path) -> set[str]:
    """Backups an unfinished prune is taking out: no longer restore points."""
    journal = read_journal(domain_dir)
    if journal is None:
        return set()
    return {str(op["id"]) for op in journal["ops"] if op["op"] == "remove"}


def list_backups(
    domain_dir: Path, problems: list[str] | None = None
) -> list[tuple[Path, dict[str, Any]]]:
    """The finished backup folders of one domain with their manifests,
    oldest first (backup ids sort by time). Partial folders, and those an
    unfinished prune is removing, are skipped. An unreadable manifest raises,
    or, given `problems`, is reported there and skipped."""
    if not domain_dir.is_dir():
        return []
    gone = being_removed(domain_dir)
    out = []
    for folder in sorted(domain_dir.iterdir()):
        if not folder.is_dir() or folder.name.endswith(".partial") or folder.name.startswith("."):
            continue
        if folder.name in gone:
            continue
        try:
            out.append((folder, read_manifest(folder)))
        except (OSError, ValueError) as exc:
            if problems is None:
                raise
            problems.append(f"{folder}: {exc}")
    return out


def count_backup_folders(root: Path) -> int:
    """Committed backup folders under a repository root (a manifest in a
    folder two levels down), without reading them: a cheap check that a
    repository is not empty."""
    if not root.is_dir():
        return 0
    return sum(1 for _ in root.glob(f"*/*/{MANIFEST}"))


def read_manifest(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / MANIFEST).read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{folder / MANIFEST}: unknown format {data.get('format')!r}")
    return data


def disk_records(results: Mapping[str, CopyResult]) -> tuple[DiskRecord, ...]:
    """What the store and the manifest keep of each disk's copy."""
    return tuple(
        DiskRecord(
            disk=name,
            path=disk_file(name),
            virtual_size=r.size,
            bytes_read=r.bytes_read,
            bytes_written=r.bytes_written,
            bytes_zeroed=r.bytes_zeroed,
            digest=r.digest,
            grid=r.grid,
            ranges=json.dumps([[x.offset, x.length, x.kind.value] for x in r.ranges]),
        )
        for name, r in sorted(results.items())
    )


def manifest(
    *,
    backup_id: str,
    name: str,
    uuid: str,
    plan: Plan,
    checkpoint: str,
    started: datetime,
    finished: datetime,
    disks: Sequence[DiskRecord],
) -> dict[str, Any]:
    """The manifest.json of a backup folder (reindex reads it back)."""
    return {
        "id": backup_id,
        "domain": {"name": name, "uuid": uuid},
        "level": plan.level.value,
        "reason": plan.reason,
        "checkpoint": checkpoint,
        "parent": plan.parent_backup,
        "parent_checkpoint": plan.parent_checkpoint,
        "started": started.isoformat(),
        "finished": finished.isoformat(),
        "disks": [
            {
                "name": d.disk,
                "file": d.path,
                "virtual_size": d.virtual_size,
                "bytes_read": d.bytes_read,
                "bytes_written": d.bytes_written,
                "bytes_zeroed": d.bytes_zeroed,
                "digest": d.digest,
                "grid": d.grid,
                "ranges": json.loads(d.ranges),
            }
            for d in disks
        ],
        # Disks of the domain this backup does not hold, and why.
        "left_out": [{"name": d.disk, "reason": d.reason} for d in plan.left_out],
    }


def disks_from_manifest(data: Mapping[str, Any]) -> tuple[DiskRecord, ...]:
    """The inverse of the manifest's "disks" list."""
    return tuple(
        DiskRecord(
            d["name"],
            d["file"],
            d["virtual_size"],
            d["bytes_read"],
            d["bytes_written"],
            d["bytes_zeroed"],
            d["digest"],
            d["grid"],
            json.dumps(d["ranges"]),
        )
        for d in data["disks"]
    )


def _write_synced(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_synced(path: Path, text: str) -> None:
    """Write `text` beside `path`, fsync it, rename it over `path`, fsync
    the folder: readers see the old file or the new one, never a mix."""
    tmp = path.with_name(f"{path.name}.tmp")
    _write_synced(tmp, text)
    tmp.rename(path)
    fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: so that renames in it are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
