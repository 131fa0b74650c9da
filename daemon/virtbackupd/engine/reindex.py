"""Rebuild the state store from the backup repository (after losing
state.db): every committed backup folder is self-describing."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from virtbackupd.adapters.store import Store
from virtbackupd.core.checkpoint_xml import Checkpoint
from virtbackupd.core.policy import Level
from virtbackupd.core.records import (
    BackupRecord,
    BackupStatus,
    CheckpointRecord,
    CheckpointStatus,
    LeftOutDisk,
)
from virtbackupd.engine.repository import disks_from_manifest, list_backups
from virtbackupd.errors import VirtBackupError


async def reindex(store: Store, root: Path) -> tuple[int, list[str]]:
    """Record every backup found under `root` that the store lacks.
    Returns how many were added and one problem line per unreadable folder.
    Partial folders (crashed backups) are never imported."""
    added, problems = 0, list[str]()
    known = {b.id for b in await store.backups()}
    found = []
    for domain_dir in sorted(root.iterdir()) if root.is_dir() else []:
        if not domain_dir.is_dir():
            continue
        found += list_backups(domain_dir, problems)
    # Oldest first, so that every parent is recorded before its children.
    found.sort(key=lambda fm: (fm[1]["started"], fm[1]["id"]))
    for folder, m in found:
        if m["id"] in known:
            continue
        started = datetime.fromisoformat(m["started"])
        parent = m.get("parent")
        if parent is not None and parent not in known:
            problems.append(f"{folder}: parent backup {parent} is missing; recorded without it")
            parent = None
        uuid, name = m["domain"]["uuid"], m["domain"]["name"]
        await store.see_domain(uuid, name, started)
        cp_file = folder / "checkpoint.xml"
        if m.get("checkpoint") and cp_file.exists():
            xml = cp_file.read_text()
            try:
                cp = Checkpoint.from_xml(xml, str(cp_file))
            except VirtBackupError as exc:
                problems.append(str(exc))
            else:
                await store.add_checkpoint(
                    CheckpointRecord(
                        uuid, m["checkpoint"], cp.parent, started, CheckpointStatus.ACTIVE, xml
                    )
                )
        disks = disks_from_manifest(m)
        await store.start_backup(
            BackupRecord(
                id=m["id"],
                domain_uuid=uuid,
                domain_name=name,
                level=Level(m["level"]),
                status=BackupStatus.RUNNING,
                checkpoint=m.get("checkpoint"),
                parent=parent,
                started=started,
                path=str(folder),
                left_out=tuple(
                    LeftOutDisk(str(x["name"]), str(x["reason"])) for x in m.get("left_out", [])
                ),
            )
        )
        await store.complete_backup(
            m["id"], datetime.fromisoformat(m["finished"]), str(folder), disks
        )
        known.add(m["id"])
        added += 1
    return added, problems
