"""The SQLite state store on real files: migrations, WAL, and records."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from virtbackupd.adapters.store import MIGRATIONS, Store, StoreDamagedError, StoreError
from virtbackupd.core.policy import Level
from virtbackupd.core.records import BackupRecord, BackupStatus, DiskRecord

NOW = datetime(2026, 11, 23, 20, 0, tzinfo=UTC)


def backup(i: str, parent: str | None = None) -> BackupRecord:
    return BackupRecord(
        i,
        "u1",
        "web",
        Level.FULL if parent is None else Level.INCREMENTAL,
        BackupStatus.RUNNING,
        f"virtbackupd-{i}",
        parent,
        NOW,
    )


async def test_schema_is_created_in_wal_mode_with_private_permissions(tmp_path: Path) -> None:
    db = tmp_path / "state" / "state.db"
    async with Store.open(db) as store:
        assert await store.schema_version() == len(MIGRATIONS)
    assert db.stat().st_mode & 0o777 == 0o600
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    con = sqlite3.connect(db)
    con.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    con.close()
    with pytest.raises(StoreError, match="newer than this virtbackupd"):
        async with Store.open(db):
            pass


async def test_backup_lifecycle(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "s.db") as store:
        await store.see_domain("u1", "web", NOW)
        await store.start_backup(backup("b1"))
        await store.set_progress("b1", 10, 100, 1.5, NOW)
        disk = DiskRecord("vda", "vda.qcow2", 100, 10, 10, 0, "d", 4, ())
        await complete(store, "b1", "/x/b1", [disk])
        await store.start_backup(backup("b2", "b1"))
        await store.fail_backup("b2", NOW, "boom")
        # A finished backup cannot be failed afterwards.
        await store.fail_backup("b1", NOW, "late")
        got = await store.backups("u1")
        assert [(b.id, b.status, b.error) for b in got] == [
            ("b1", BackupStatus.COMPLETE, None),
            ("b2", BackupStatus.FAILED, "boom"),
        ]
        assert got[0].disks == (disk,)
        assert got[0].bytes_written == 10
        web = await store.domain_by_name("web")
        assert web is not None and web.uuid == "u1"


async def test_foreign_keys_are_enforced(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "s.db") as store:
        with pytest.raises(StoreError, match="FOREIGN KEY"):
            await store.start_backup(backup("orphan"))  # no such domain


async def complete(store: Store, backup_id: str, path: str, disks: list[DiskRecord]) -> None:
    """What a commit records (engine.upkeep.catalogue): the whole row, disks and all."""
    got = await store.backup(backup_id)
    assert got is not None
    await store.record_backup(
        replace(
            got,
            status=BackupStatus.COMPLETE,
            finished=NOW,
            path=path,
            disks=tuple(disks),
            bytes_read=sum(d.bytes_read for d in disks),
            bytes_written=sum(d.bytes_written for d in disks),
        )
    )


def disk(name: str) -> DiskRecord:
    return DiskRecord(name, f"{name}.qcow2", 1 << 20, 1 << 20, 1 << 20, 0, "d", 1 << 20, ())


async def test_concurrent_jobs_commit_on_one_connection(tmp_path: Path) -> None:
    """Many jobs completing, failing and publishing progress at the same
    time on the daemon's one connection: each transaction stays whole (no
    "cannot start a transaction within a transaction", nothing lost)."""
    async with Store.open(tmp_path / "s.db") as store:
        await store.see_domain("u1", "web", NOW)
        ids = [f"b{i}" for i in range(40)]
        for i in ids:
            await store.start_backup(backup(i))

        async def finish(i: str, n: int) -> None:
            await store.set_progress(i, n, 100, 1.0, NOW)
            if n % 3:
                await complete(store, i, f"/r/{i}", [disk("vda"), disk("vdb")])
            else:
                await store.fail_backup(i, NOW, "boom")

        await asyncio.gather(*(finish(i, n) for n, i in enumerate(ids)))
        got = {b.id: b for b in await store.backups()}
        for n, i in enumerate(ids):
            if n % 3:
                assert got[i].status is BackupStatus.COMPLETE
                assert len(got[i].disks) == 2
            else:
                assert got[i].status is BackupStatus.FAILED
        assert await store.running_progress() == []


async def test_many_openers_of_a_new_database_create_it_once(tmp_path: Path) -> None:
    """The daemon and CLI commands opening a database that does not exist
    yet, at the same moment, on their own connections: each must find the
    schema whole (CI once saw "table domains already exists" when the CLI's
    backup and `status` both created it)."""
    path = tmp_path / "s.db"

    async def open_and_use(n: int) -> int:
        async with Store.open(path) as store:
            await store.see_domain(f"u{n}", f"vm{n}", NOW)
            return await store.schema_version()

    for _ in range(5):
        path.unlink(missing_ok=True)
        versions = await asyncio.gather(*(open_and_use(n) for n in range(8)))
        assert versions == [len(MIGRATIONS)] * 8
        async with Store.open(path) as store:
            assert all([await store.domain(f"u{n}") for n in range(8)])


async def test_a_cancelled_transaction_leaves_the_connection_usable(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "s.db") as store:
        await store.see_domain("u1", "web", NOW)
        await store.start_backup(backup("a"))
        task = asyncio.create_task(complete(store, "a", "/r/a", [disk("vda")]))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await store.start_backup(backup("b"))
        await complete(store, "b", "/r/b", [disk("vda")])
        record = await store.backup("b")
        assert record is not None and record.status is BackupStatus.COMPLETE


async def test_a_damaged_file_is_named_with_its_fix(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    db.write_bytes(b"this is no database, it was overwritten by something" * 100)
    with pytest.raises(StoreDamagedError) as err:
        async with Store.open(db):
            pass
    text = str(err.value)
    assert str(db) in text and "virtbackup reindex" in text and "\n" not in text


async def test_a_deleted_or_replaced_file_is_noticed(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    async with Store.open(db) as store:
        assert not store.replaced()
        db.unlink()
        assert store.replaced()
        db.write_bytes(b"")
        assert store.replaced()
