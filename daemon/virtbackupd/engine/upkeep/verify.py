"""Verifying backups in the repository, one folder at a time.

Each disk image of a backup is checked for:

1. qcow2 consistency (`qemu-img check`);
2. its place in the chain: the backing file is the one the manifest says
   (the parent's image, or none where the disk is stored standalone:
   adapters.repository.allowed_backings), it exists, and the virtual size
   is the recorded one;
3. the content digest recorded at backup time, recomputed over the
   recorded ranges of the image's view (the image with its backing chain);
   the ZERO ranges must still read as zeroes;
4. the bytes the image holds beyond those ranges (qcow2 allocates whole
   clusters, so a small write leaves copied-up bytes around it): they must
   equal what the parent's view (zeroes for a standalone image) shows there.

So a flipped byte in any data cluster of any image is found, and named by
backup and disk (and offset, where the check can tell).

While an interrupted prune is pending (the domain's prune journal exists),
the files are between two of the prune's consistent states: only what a
restore reads is promised. Each backup is then checked as a restore reads
it (engine.restore.chain.damage_as_restored: the chain's recorded piece hashes
against the view, no image written), and its verdict says the prune is
pending and what finishes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from virtbackupd.adapters import qemu_img
from virtbackupd.adapters.qcow2_reader import Qcow2ReadError, check_backing_names
from virtbackupd.adapters.repository import PRUNE_JOURNAL, Repository, read_manifest, read_pieces
from virtbackupd.adapters.store import Store
from virtbackupd.config.daemon import DaemonConfig
from virtbackupd.core import extents
from virtbackupd.core.records import BackupRecord, DiskRecord
from virtbackupd.core.repository_format.codec import RepositoryFormatError
from virtbackupd.core.repository_format.manifest import Manifest, allowed_backings
from virtbackupd.engine.datapath.content import allocated_here, differing, digest_view, open_view
from virtbackupd.engine.domain_job import domain_job
from virtbackupd.engine.guest_view import FsVerdict, check_filesystems
from virtbackupd.engine.restore.chain import damage_as_restored
from virtbackupd.errors import VirtBackupError

PRUNE_PENDING = "an interrupted prune is pending"


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
    # Backups it restores through that are damaged, with what is wrong
    # with each: a backup is only as good as its chain.
    damaged_ancestors: tuple[str, ...] = ()
    ancestor_problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # what the operator should know, not damage

    @property
    def ok(self) -> bool:
        return self.layer_ok and not self.damaged_ancestors

    @property
    def layer_ok(self) -> bool:
        """This backup's own images and files, apart from its ancestors."""
        return not self.problems and all(d.ok for d in self.disks)

    def as_json(self) -> dict[str, object]:
        return {
            "backup": self.backup_id,
            "path": str(self.folder),
            "ok": self.ok,
            "problems": [*self.problems, *self.ancestor_problems],
            "damaged_ancestors": list(self.damaged_ancestors),
            "notes": list(self.notes),
            "disks": [
                {"disk": d.disk, "ok": d.ok, "problems": list(d.problems)} for d in self.disks
            ],
        }


class Verifier:
    """Verifies backups with their chains; each layer is read once per run."""

    def __init__(self, runtime_dir: Path) -> None:
        self.runtime_dir = runtime_dir
        self.layers: dict[tuple[Path, tuple[str, ...] | None], BackupVerdict] = {}

    async def backup(self, folder: Path, disks: Sequence[str] | None = None) -> BackupVerdict:
        """Check one backup folder and every backup it restores through;
        never raises for what it finds wrong."""
        repo = Repository.of_backup(folder)
        try:
            journal = repo.journal(folder.parent.name)
        except VirtBackupError as exc:
            unreadable = f"prune journal unreadable: {exc}"
            return BackupVerdict(folder.name, folder, problems=(unreadable,))
        if journal is not None:
            return await self.as_restored(folder, disks)
        own = await self.layer(folder, disks)
        try:
            chain = repo.chain(folder)
        except VirtBackupError as exc:
            return BackupVerdict(
                own.backup_id, folder, own.disks, (*own.problems, f"chain unreadable: {exc}")
            )
        damaged, lines = [], []
        # The disks read through the next older layer: a disk stored
        # standalone in a newer layer reads nothing older.
        through = _read_through(chain[0].manifest, set(disks) if disks is not None else None)
        for ancestor in chain[1:]:
            verdict = await self.layer(ancestor.folder, disks)
            first = [
                *verdict.problems,
                *(f"{d.disk}: {p}" for d in verdict.disks if d.disk in through for p in d.problems),
            ]
            through = _read_through(ancestor.manifest, through)
            if first:
                damaged.append(ancestor.manifest.id)
                lines.append(
                    f"restores through backup {ancestor.manifest.id}, which is damaged ({first[0]})"
                )
        return BackupVerdict(
            own.backup_id, folder, own.disks, own.problems, tuple(damaged), tuple(lines)
        )

    async def as_restored(self, folder: Path, disks: Sequence[str] | None) -> BackupVerdict:
        """A backup of a domain whose prune was interrupted: checked as a
        restore reads it."""
        try:
            manifest = read_manifest(folder)
        except VirtBackupError as exc:
            return BackupVerdict(folder.name, folder, problems=(f"manifest unreadable: {exc}",))
        verdicts = []
        for d in manifest.disks:
            if disks is not None and d.disk not in disks:
                continue
            try:
                found = await damage_as_restored(folder, d.disk, self.runtime_dir)
            except VirtBackupError as exc:
                found = (str(exc),)
            verdicts.append(DiskVerdict(d.disk, found))
        note = (
            f"{PRUNE_PENDING} ({folder.parent / PRUNE_JOURNAL}): checked as a restore reads "
            f"it; the next `virtbackup prune` or backup of {manifest.domain_name} finishes it"
        )
        return BackupVerdict(manifest.id, folder, tuple(verdicts), notes=(note,))

    async def layer(self, folder: Path, disks: Sequence[str] | None = None) -> BackupVerdict:
        key = (folder.resolve(), tuple(disks) if disks is not None else None)
        if key not in self.layers:
            self.layers[key] = await verify_layer(folder, self.runtime_dir, disks)
        return self.layers[key]


async def verify_recorded(
    config: DaemonConfig, store: Store, backups: Sequence[BackupRecord]
) -> AsyncIterator[tuple[BackupRecord, BackupVerdict]]:
    """Verify recorded backups one by one, each inside its domain's job
    (engine.domain_job: no prune merges what is being read). Backups
    without a folder, or that an interrupted prune is removing, are no
    backups any more."""
    verifier = Verifier(config.runtime_dir)
    for b in backups:
        if b.path is None:
            continue
        folder = Path(b.path)
        repo = Repository.of_backup(folder)
        if b.id in repo.being_removed(folder.parent.name):
            continue
        async with domain_job(config, store, repo, b.domain_uuid, b.domain_name, "verify"):
            verdict = await verifier.backup(folder)
        yield b, verdict


async def verify_filesystems(
    config: DaemonConfig, store: Store, b: BackupRecord
) -> tuple[list[FsVerdict], list[str]]:
    """`verify --filesystems` of one backup (the CLI's, and the daemon's
    `schedule.verify_filesystems`): each filesystem's read-only check,
    inside the domain's job (no prune rewrites the chain meanwhile)."""
    assert b.path is not None
    folder = Path(b.path)
    repo = Repository.of_backup(folder)
    async with domain_job(config, store, repo, b.domain_uuid, b.domain_name, "verify"):
        manifest = repo.backup(folder.parent.name, b.id).manifest
        disks = [d.disk for d in manifest.disks]
        return await check_filesystems(folder, disks, config.runtime_dir)


async def verify_backup(
    folder: Path, runtime_dir: Path, disks: Sequence[str] | None = None
) -> BackupVerdict:
    """One backup with its chain (see :class:`Verifier`)."""
    return await Verifier(runtime_dir).backup(folder, disks)


async def verify_layer(
    folder: Path, runtime_dir: Path, disks: Sequence[str] | None = None
) -> BackupVerdict:
    """Check one backup folder's own images; never raises for what it finds."""
    try:
        manifest = read_manifest(folder)
    except VirtBackupError as exc:
        return BackupVerdict(folder.name, folder, problems=(f"manifest unreadable: {exc}",))
    verdicts = []
    for d in manifest.disks:
        if disks is not None and d.disk not in disks:
            continue
        verdicts.append(await _verify_disk(folder, manifest, d, runtime_dir))
    return BackupVerdict(manifest.id, folder, tuple(verdicts))


async def _verify_disk(
    folder: Path, manifest: Manifest, d: DiskRecord, runtime_dir: Path
) -> DiskVerdict:
    name = d.disk
    image = folder / d.path
    problems: list[str] = []
    if not image.is_file():
        return DiskVerdict(name, (f"image {image} is missing",))
    if d.pieces is not None:
        try:
            read_pieces(folder, d)
        except RepositoryFormatError as exc:
            problems.append(f"piece hashes: {exc}")
    try:
        # Before qemu-img check opens what the image names (a host file, a FIFO).
        await asyncio.to_thread(check_backing_names, image)
    except Qcow2ReadError as exc:
        return DiskVerdict(name, (*problems, str(exc)))
    try:
        await qemu_img.check(image)
    except VirtBackupError as exc:
        problems.append(f"qemu-img check: {exc}")
    try:
        info = await qemu_img.info(image)
    except VirtBackupError as exc:
        return DiskVerdict(name, (*problems, f"qemu-img info: {exc}"))
    if info.virtual_size != d.virtual_size:
        problems.append(f"virtual size is {info.virtual_size}, the manifest says {d.virtual_size}")
    allowed = allowed_backings(manifest, d)
    backing = info.backing_filename
    if backing not in allowed:
        problems.append(f"backing file is {backing!r}, the manifest needs {_either(allowed)}")
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


def _read_through(manifest: Manifest, disks: set[str] | None) -> set[str]:
    """Those of `disks` (None: all) whose image in this backup may be an
    overlay on its parent's."""
    return {
        d.disk
        for d in manifest.disks
        if (disks is None or d.disk in disks) and allowed_backings(manifest, d) != (None,)
    }


def _either(allowed: Sequence[str | None]) -> str:
    words = [
        "none (a standalone image)" if a is None else f"{a!r} (the parent's image)" for a in allowed
    ]
    return " or ".join(words)


async def _verify_content(
    image: Path, parent_image: Path | None, d: DiskRecord, runtime_dir: Path
) -> list[str]:
    problems = []
    ranges = list(d.ranges)
    async with open_view(image, runtime_dir) as view:
        got = await digest_view(view, ranges, d.grid)
        if got.digest != d.digest:
            problems.append(
                f"content digest differs: recorded {d.digest[:16]}…, now {got.digest[:16]}… "
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
