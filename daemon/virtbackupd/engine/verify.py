"""Verifying backups in the repository, one folder at a time.

Each disk image of a backup is checked for:

1. qcow2 consistency (`qemu-img check`);
2. its place in the chain: the backing file is the one the manifest's
   parent names, it exists, and the virtual size is the recorded one;
3. the content digest recorded at backup time, recomputed over the
   recorded ranges of the image's view (the image with its backing chain);
   the ZERO ranges must still read as zeroes;
4. the bytes the image holds beyond those ranges (qcow2 allocates whole
   clusters, so a small write leaves copied-up bytes around it): they must
   equal what the parent's view (zeroes for a standalone image) shows there.

So a flipped byte in any data cluster of any image is found, and named by
backup and disk (and offset, where the check can tell).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virtbackupd.adapters import qemu_img
from virtbackupd.core import extents
from virtbackupd.core.records import BackupRecord
from virtbackupd.engine import repository
from virtbackupd.engine.content import allocated_here, differing, digest_view, open_view
from virtbackupd.engine.locks import domain_lock
from virtbackupd.errors import VirtBackupError


@dataclass(frozen=True)
class DiskVerdict:
    disk: str
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class BackupVerdict:
    backup_id: str
    folder: Path
    disks: tuple[DiskVerdict, ...] = ()
    problems: tuple[str, ...] = field(default=())  # about the folder itself

    @property
    def ok(self) -> bool:
        return not self.problems and all(d.ok for d in self.disks)

    def as_json(self) -> dict[str, object]:
        return {
            "backup": self.backup_id,
            "path": str(self.folder),
            "ok": self.ok,
            "problems": list(self.problems),
            "disks": [
                {"disk": d.disk, "ok": d.ok, "problems": list(d.problems)} for d in self.disks
            ],
        }


async def verify_recorded(
    backups: Sequence[BackupRecord], runtime_dir: Path
) -> AsyncIterator[tuple[BackupRecord, BackupVerdict]]:
    """Verify recorded backups one by one, each under its domain's lock
    (no prune merges what is being read). Backups without a folder, or
    that an interrupted prune is removing, are no backups any more."""
    for b in backups:
        if b.path is None or b.id in repository.being_removed(Path(b.path).parent):
            continue
        with domain_lock(runtime_dir, b.domain_uuid, b.domain_name, "verify"):
            verdict = await verify_backup(Path(b.path), runtime_dir)
        yield b, verdict


async def verify_backup(
    folder: Path, runtime_dir: Path, disks: Sequence[str] | None = None
) -> BackupVerdict:
    """Check one backup folder; never raises for what it finds wrong."""
    try:
        manifest = repository.read_manifest(folder)
    except (OSError, ValueError) as exc:
        return BackupVerdict(folder.name, folder, problems=(f"manifest unreadable: {exc}",))
    verdicts = []
    for d in manifest["disks"]:
        if disks is not None and d["name"] not in disks:
            continue
        verdicts.append(await _verify_disk(folder, manifest.get("parent"), d, runtime_dir))
    return BackupVerdict(str(manifest["id"]), folder, tuple(verdicts))


async def _verify_disk(
    folder: Path, parent: str | None, d: dict[str, Any], runtime_dir: Path
) -> DiskVerdict:
    name = str(d["name"])
    image = folder / str(d["file"])
    problems: list[str] = []
    if not image.is_file():
        return DiskVerdict(name, (f"image {image} is missing",))
    try:
        await qemu_img.check(image)
    except VirtBackupError as exc:
        problems.append(f"qemu-img check: {exc}")
    try:
        info = await qemu_img.info(image)
    except VirtBackupError as exc:
        return DiskVerdict(name, (*problems, f"qemu-img info: {exc}"))
    if info.virtual_size != d["virtual_size"]:
        problems.append(
            f"virtual size is {info.virtual_size}, the manifest says {d['virtual_size']}"
        )
    expected = repository.backing_of(parent, name) if parent else None
    backing = info.backing_filename
    if backing != expected:
        problems.append(f"backing file is {backing!r}, the manifest's parent needs {expected!r}")
        return DiskVerdict(name, tuple(problems))
    parent_image = (folder / backing).resolve() if backing else None
    if parent_image is not None and not parent_image.is_file():
        problems.append(f"backing file {parent_image} is missing")
        return DiskVerdict(name, tuple(problems))
    try:
        problems += await _verify_content(image, parent_image, d, runtime_dir)
    except VirtBackupError as exc:
        problems.append(f"cannot read the image: {exc}")
    return DiskVerdict(name, tuple(problems))


async def _verify_content(
    image: Path, parent_image: Path | None, d: dict[str, Any], runtime_dir: Path
) -> list[str]:
    problems = []
    ranges = extents.ranges_from_json(d["ranges"])
    async with open_view(image, runtime_dir) as view:
        got = await digest_view(view, ranges, int(d["grid"]))
        if got.digest != d["digest"]:
            problems.append(
                f"content digest differs: recorded {d['digest'][:16]}…, now {got.digest[:16]}… "
                "(data this backup copied reads differently)"
            )
        for lo, hi in got.not_zero[:5]:
            problems.append(f"bytes {lo}-{hi} should read as zeroes but do not")
        spans = extents.subtract(await allocated_here(image), ranges)
        if spans:
            if parent_image is None:
                bad = await differing(view, None, spans)
            else:
                async with open_view(parent_image, runtime_dir) as base:
                    bad = await differing(view, base, spans)
            for lo, hi in bad[:5]:
                problems.append(
                    f"bytes from offset {lo} (up to {hi}) outside the copied ranges "
                    "differ from the parent's view"
                )
    return problems
