"""Backup repositories built without libvirt, for the tests of what reads
and changes a repository (verify, restore, prune, the commit and the
catalogue): no VM is needed for those, so they run in seconds.

The "domain" is a set of qcow2 images written with qemu-io. Each backup
adds a persistent bitmap to them (the checkpoint), exports them read-only
with qemu-nbd (with the parent's bitmap for an incremental) and copies
them with the product's own copy engine into the product's repository,
committing through engine.upkeep.catalogue with an undo log: the same code as
an offline backup, less the libvirt checkpoint. The libvirt paths stay
covered by the integration tests.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from testbed.tools import qemu_io, run
from virtbackupd.adapters import qemu_img, qemu_nbd
from virtbackupd.adapters.qcow2_writer import new_image
from virtbackupd.adapters.repository import (
    DOMAIN_XML,
    Manifest,
    Repository,
    UndoKind,
    UndoLog,
    backing_of,
    disk_file,
    document_digests,
    new_backup_id,
)
from virtbackupd.adapters.store import Store
from virtbackupd.core.backup_documents import checkpoint_name
from virtbackupd.core.policy import Level
from virtbackupd.core.records import BackupRecord, BackupStatus
from virtbackupd.engine.backup import disk_records
from virtbackupd.engine.datapath.copy import CopyOptions, CopyResult, ZeroMode, copy_into
from virtbackupd.engine.recovery.undo import Undo
from virtbackupd.engine.upkeep.catalogue import commit_backup

MiB = 1024 * 1024


@dataclass
class BuiltDomain:
    """A repository of one domain's backups, and the reference images."""

    tmp: Path
    disks: dict[str, int]  # target -> size
    name: str = "built-vm"
    uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))
    refs: dict[str, dict[str, Path]] = field(default_factory=dict)  # id -> disk -> raw copy
    ids: list[str] = field(default_factory=list)
    last_checkpoint: str | None = None
    keep_references: bool = True  # a raw copy of every disk at every backup (the bench: no)

    def __post_init__(self) -> None:
        self.root = self.tmp / "repo"
        self.runtime = self.tmp / "run"
        self.state_db = self.tmp / "state" / "state.db"
        self.state_db.parent.mkdir(parents=True, exist_ok=True)
        self.repo = Repository(self.root)
        for disk, size in self.disks.items():
            run("qemu-img", "create", "-q", "-f", "qcow2", self.source(disk), str(size))

    def source(self, disk: str) -> Path:
        return self.tmp / f"src-{disk}.qcow2"

    def folder(self, backup_id: str) -> Path:
        return self.repo.final_dir(self.uuid, backup_id)

    def image(self, backup_id: str, disk: str) -> Path:
        return self.folder(backup_id) / disk_file(disk)

    def write(self, disk: str, offset: int, length: int, pattern: int) -> None:
        qemu_io(self.source(disk), f"write -P {pattern} {offset} {length}")

    def zero(self, disk: str, offset: int, length: int) -> None:
        qemu_io(self.source(disk), f"write -z {offset} {length}")

    async def backup(
        self,
        store: Store,
        level: Level | None = None,
        step: Callable[[str], None] | None = None,
        grid: int | None = None,
        whole: frozenset[str] = frozenset(),
    ) -> Manifest:
        """One backup of every disk: incremental on the last one's
        checkpoint unless `level` is FULL or there is none. `whole`: disks
        copied whole into an incremental as standalone images (what the
        job does with a raw disk under `raw: full`)."""
        started = datetime.now(UTC)
        backup_id = new_backup_id(started)
        cp = checkpoint_name(backup_id)
        parent_cp = self.last_checkpoint if level is not Level.FULL else None
        parent = self.ids[-1] if parent_cp else None
        lvl = Level.INCREMENTAL if parent else Level.FULL
        await store.see_domain(self.uuid, self.name, started)
        await store.start_backup(
            BackupRecord(
                backup_id, self.uuid, self.name, lvl, BackupStatus.RUNNING, cp, parent, started
            )
        )
        undo = Undo(self.repo, UndoLog(backup_id, self.name, self.uuid, lvl, started))
        partial = self.repo.partial_dir(self.uuid, backup_id)
        undo.note(UndoKind.PARTIAL, partial)
        self.repo.create_partial(self.uuid, backup_id)
        results: dict[str, CopyResult] = {}
        for disk, size in self.disks.items():
            src = self.source(disk)
            await qemu_img.bitmap(src, cp, add=True)
            target = partial / disk_file(disk)
            overlay = parent is not None and disk not in whole
            backing = backing_of(parent, disk) if parent and overlay else None
            since = parent_cp if overlay else None
            async with (
                qemu_nbd.serve(
                    src, runtime_dir=self.runtime, bitmaps=[since] if since else []
                ) as s,
                new_image(target, size, backing) as t,
            ):
                results[disk] = await copy_into(
                    s.address,
                    s.name,
                    t,
                    dirty_bitmap=since,
                    options=CopyOptions(
                        zero_mode=ZeroMode.WRITE_ZEROES if overlay else ZeroMode.SKIP,
                        request_size=grid or CopyOptions().request_size,
                    ),
                )
            # The image writer's work, checked every time: no error, no leak.
            run("qemu-img", "check", "-q", target)
        texts = {DOMAIN_XML: f"<domain><name>{self.name}</name></domain>\n"}
        manifest = Manifest(
            id=backup_id,
            domain_name=self.name,
            domain_uuid=self.uuid,
            level=lvl,
            reason="built by the test",
            checkpoint=cp,
            parent=parent,
            parent_checkpoint=parent_cp,
            started=started,
            finished=datetime.now(UTC),
            disks=disk_records(
                results, standalone=set(self.disks) if parent is None else set(whole)
            ),
            documents=document_digests(texts),
        )
        # The reference first: a crash test kills the process inside the commit.
        self.refs[backup_id] = {}
        for disk in self.disks if self.keep_references else ():
            ref = self.tmp / f"ref-{backup_id}-{disk}.raw"
            run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", self.source(disk), ref)
            self.refs[backup_id][disk] = ref
        await commit_backup(
            store,
            self.repo,
            manifest,
            texts,
            {name: r.pieces for name, r in results.items()},
            undo,
            step,
        )
        self.ids.append(backup_id)
        self.last_checkpoint = cp
        return manifest


async def build_chain(tmp: Path, backups: int, size: int = 8 * MiB) -> BuiltDomain:
    """A domain with one disk vda and a chain of `backups` backups, the
    i-th taken after writing MiB i with the byte 0x11 * (i + 1)."""
    b = BuiltDomain(tmp, {"vda": size})
    async with Store.open(b.state_db) as store:
        for i in range(backups):
            b.write("vda", i * MiB, MiB, 0x11 * (i + 1))
            await b.backup(store)
    return b


def copy_built(template: tuple[Path, BuiltDomain], tmp_path: Path) -> BuiltDomain:
    """A case's own copy of a template repository (built once per module),
    its catalogue pointing at the copy's folders (the copied one names the
    template's)."""
    origin, built = template
    shutil.copytree(origin, tmp_path / "t", symlinks=True)
    b = BuiltDomain.__new__(BuiltDomain)
    b.__dict__.update(built.__dict__)
    b.tmp = tmp_path / "t"
    b.__post_init__()
    with contextlib.closing(sqlite3.connect(b.state_db)) as db, db:
        db.execute("UPDATE backups SET path = replace(path, ?, ?)", (str(origin), str(b.tmp)))
    return b


def write_cli_config(b: BuiltDomain, folder: Path) -> Path:
    """A daemon config in `folder` over `b`'s repository, with one policy
    (keep_last: 1) naming its domain, for running the CLI on it."""
    policies = folder / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "p.yaml").write_text(f"domains: [{b.name}]\nretention: {{keep_last: 1}}\n")
    config = folder / "vb.yaml"
    config.write_text(
        f"state_dir: {b.state_db.parent}\nbackup_root: {b.root}\nruntime_dir: {b.runtime}\n"
        f"policy_dirs: [{policies}]\npriority: normal\n"
    )
    return config
