"""The store says why a checkpoint went (schema 4, issue 24 item 6): a
database of schema 3 is brought up with its checkpoint rows kept, and the
new states (pruned, overwritten) are stored and read back."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from virtbackupd.adapters.store import MIGRATIONS, Store
from virtbackupd.core.records import CheckpointStatus


def schema_3_with_checkpoints(db: Path) -> None:
    con = sqlite3.connect(db)
    for migration in MIGRATIONS[:3]:
        con.executescript(migration)
    con.execute("INSERT INTO domains VALUES ('u', 'web', 't0', 't0', NULL)")
    for name, status in (("virtbackupd-a", "deleted"), ("virtbackupd-b", "active")):
        con.execute(
            "INSERT INTO checkpoints VALUES ('u', ?, NULL, '2026-12-07T00:00:00+00:00', ?, '<x/>')",
            (name, status),
        )
    con.execute("PRAGMA user_version = 3")
    con.commit()
    con.close()


async def test_schema_3_is_migrated_and_keeps_its_checkpoints(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    schema_3_with_checkpoints(db)
    async with Store.open(db) as store:
        assert await store.schema_version() == len(MIGRATIONS)
        rows = {c.name: c.status for c in await store.checkpoints("u")}
        assert rows == {
            "virtbackupd-a": CheckpointStatus.DELETED,
            "virtbackupd-b": CheckpointStatus.ACTIVE,
        }
        await store.set_checkpoint_status("u", "virtbackupd-a", CheckpointStatus.PRUNED)
        await store.set_checkpoint_status("u", "virtbackupd-b", CheckpointStatus.OVERWRITTEN)
        rows = {c.name: c.status for c in await store.checkpoints("u")}
        assert rows == {
            "virtbackupd-a": CheckpointStatus.PRUNED,
            "virtbackupd-b": CheckpointStatus.OVERWRITTEN,
        }
