"""The SQLite state store (aiosqlite). All SQL of the project lives here.

WAL mode, foreign keys on, schema versioned with PRAGMA user_version and
applied by ordered migrations. Timestamps are stored as ISO 8601 UTC text.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from virtbackupd.core.policy import Level
from virtbackupd.core.records import (
    BackupRecord,
    BackupStatus,
    CheckpointRecord,
    CheckpointStatus,
    DiskRecord,
    DomainRecord,
)
from virtbackupd.errors import VirtBackupError

MIGRATIONS: Sequence[str] = (
    # 1: the first schema
    """
    CREATE TABLE domains (
        uuid TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        first_seen TEXT NOT NULL,
        last_seen TEXT NOT NULL,
        undefined_at TEXT
    );
    CREATE TABLE checkpoints (
        domain_uuid TEXT NOT NULL REFERENCES domains(uuid),
        name TEXT NOT NULL,
        parent TEXT,
        created TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('active', 'deleted')),
        xml TEXT NOT NULL,
        PRIMARY KEY (domain_uuid, name)
    );
    CREATE TABLE backups (
        id TEXT PRIMARY KEY,
        domain_uuid TEXT NOT NULL REFERENCES domains(uuid),
        domain_name TEXT NOT NULL,
        level TEXT NOT NULL CHECK (level IN ('full', 'incremental')),
        status TEXT NOT NULL CHECK (status IN ('running', 'complete', 'failed')),
        checkpoint TEXT,
        parent_id TEXT REFERENCES backups(id),
        started TEXT NOT NULL,
        finished TEXT,
        error TEXT,
        bytes_read INTEGER NOT NULL DEFAULT 0,
        bytes_written INTEGER NOT NULL DEFAULT 0,
        path TEXT
    );
    CREATE INDEX backups_by_domain ON backups(domain_uuid, started);
    CREATE TABLE backup_disks (
        backup_id TEXT NOT NULL REFERENCES backups(id) ON DELETE CASCADE,
        disk TEXT NOT NULL,
        path TEXT NOT NULL,
        virtual_size INTEGER NOT NULL,
        bytes_read INTEGER NOT NULL,
        bytes_written INTEGER NOT NULL,
        bytes_zeroed INTEGER NOT NULL,
        digest TEXT NOT NULL,
        grid INTEGER NOT NULL,
        ranges TEXT NOT NULL,
        PRIMARY KEY (backup_id, disk)
    );
    CREATE TABLE progress (
        backup_id TEXT PRIMARY KEY REFERENCES backups(id) ON DELETE CASCADE,
        done INTEGER NOT NULL,
        total INTEGER NOT NULL,
        rate REAL NOT NULL,
        updated TEXT NOT NULL
    );
    """,
)


class StoreError(VirtBackupError):
    """The state database cannot be opened or is from a newer version."""


def _ts(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value else None


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _req(value: str) -> datetime:
    return datetime.fromisoformat(value)


class Store:
    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path

    # --- lifecycle ---------------------------------------------------------------
    @classmethod
    @asynccontextmanager
    async def open(cls, path: Path) -> AsyncIterator[Store]:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            db = await aiosqlite.connect(path, isolation_level=None)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"{path}: cannot open the state database: {exc}") from exc
        try:
            db.row_factory = aiosqlite.Row
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA foreign_keys=ON")
            await db.execute("PRAGMA busy_timeout=10000")
            store = cls(db, path)
            await store._migrate()
            path.chmod(0o600)
            yield store
        finally:
            await db.close()

    async def _migrate(self) -> None:
        (version,) = await self._one("PRAGMA user_version")
        if version > len(MIGRATIONS):
            raise StoreError(
                f"{self.path}: schema version {version} is newer than this virtbackupd "
                f"({len(MIGRATIONS)}); upgrade virtbackupd"
            )
        for number in range(version, len(MIGRATIONS)):
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                # Migrations hold no ';' inside literals, so splitting is safe,
                # and unlike executescript() it keeps them in one transaction.
                for stmt in MIGRATIONS[number].split(";"):
                    if stmt.strip():
                        await self._db.execute(stmt)
                await self._db.execute(f"PRAGMA user_version = {number + 1}")
                await self._db.execute("COMMIT")
            except BaseException:
                await self._db.execute("ROLLBACK")
                raise

    async def _one(self, sql: str, *args: object) -> aiosqlite.Row:
        async with self._db.execute(sql, args) as cur:
            row = await cur.fetchone()
        assert row is not None
        return row

    async def schema_version(self) -> int:
        return int((await self._one("PRAGMA user_version"))[0])

    # --- domains -------------------------------------------------------------------
    async def see_domain(self, uuid: str, name: str, now: datetime) -> None:
        await self._db.execute(
            """INSERT INTO domains(uuid, name, first_seen, last_seen) VALUES (?, ?, ?, ?)
               ON CONFLICT(uuid) DO UPDATE SET name = excluded.name,
                   last_seen = excluded.last_seen, undefined_at = NULL""",
            (uuid, name, _ts(now), _ts(now)),
        )

    async def domain(self, uuid: str) -> DomainRecord | None:
        async with self._db.execute("SELECT * FROM domains WHERE uuid = ?", (uuid,)) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        return DomainRecord(
            row["uuid"],
            row["name"],
            _req(row["first_seen"]),
            _req(row["last_seen"]),
            _dt(row["undefined_at"]),
        )

    async def domain_by_name(self, name: str) -> DomainRecord | None:
        async with self._db.execute(
            "SELECT uuid FROM domains WHERE name = ? ORDER BY last_seen DESC LIMIT 1", (name,)
        ) as cur:
            row = await cur.fetchone()
        return await self.domain(row["uuid"]) if row else None

    # --- checkpoints -----------------------------------------------------------------
    async def add_checkpoint(self, cp: CheckpointRecord) -> None:
        await self._db.execute(
            """INSERT OR REPLACE INTO checkpoints(domain_uuid, name, parent, created, status, xml)
               VALUES (?, ?, ?, ?, ?, ?)""",
            (cp.domain_uuid, cp.name, cp.parent, _ts(cp.created), cp.status.value, cp.xml),
        )

    async def set_checkpoint_status(
        self, domain_uuid: str, name: str, status: CheckpointStatus
    ) -> None:
        await self._db.execute(
            "UPDATE checkpoints SET status = ? WHERE domain_uuid = ? AND name = ?",
            (status.value, domain_uuid, name),
        )

    async def checkpoints(self, domain_uuid: str) -> list[CheckpointRecord]:
        async with self._db.execute(
            "SELECT * FROM checkpoints WHERE domain_uuid = ? ORDER BY created, name",
            (domain_uuid,),
        ) as cur:
            rows = await cur.fetchall()
        return [
            CheckpointRecord(
                r["domain_uuid"],
                r["name"],
                r["parent"],
                _req(r["created"]),
                CheckpointStatus(r["status"]),
                r["xml"],
            )
            for r in rows
        ]

    # --- backups -----------------------------------------------------------------------
    async def start_backup(self, b: BackupRecord) -> None:
        await self._db.execute(
            """INSERT INTO backups(id, domain_uuid, domain_name, level, status, checkpoint,
                   parent_id, started, path) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                b.id,
                b.domain_uuid,
                b.domain_name,
                b.level.value,
                BackupStatus.RUNNING.value,
                b.checkpoint,
                b.parent,
                _ts(b.started),
                b.path,
            ),
        )

    async def replan_backup(self, backup_id: str, level: Level, parent: str | None) -> None:
        """A running backup changed level (its incremental became a full)."""
        await self._db.execute(
            "UPDATE backups SET level = ?, parent_id = ? WHERE id = ? AND status = 'running'",
            (level.value, parent, backup_id),
        )

    async def complete_backup(
        self, backup_id: str, finished: datetime, path: str, disks: Sequence[DiskRecord]
    ) -> None:
        """Record the disks and mark the backup complete, in one transaction."""
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            for d in disks:
                await self._db.execute(
                    """INSERT INTO backup_disks(backup_id, disk, path, virtual_size, bytes_read,
                           bytes_written, bytes_zeroed, digest, grid, ranges)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (
                        backup_id,
                        d.disk,
                        d.path,
                        d.virtual_size,
                        d.bytes_read,
                        d.bytes_written,
                        d.bytes_zeroed,
                        d.digest,
                        d.grid,
                        d.ranges,
                    ),
                )
            await self._db.execute(
                """UPDATE backups SET status = 'complete', finished = ?, path = ?,
                       bytes_read = ?, bytes_written = ? WHERE id = ?""",
                (
                    _ts(finished),
                    path,
                    sum(d.bytes_read for d in disks),
                    sum(d.bytes_written for d in disks),
                    backup_id,
                ),
            )
            await self._db.execute("DELETE FROM progress WHERE backup_id = ?", (backup_id,))
            await self._db.execute("COMMIT")
        except BaseException:
            await self._db.execute("ROLLBACK")
            raise

    async def rechain_backup(
        self, backup_id: str, parent: str | None, disks: Sequence[DiskRecord]
    ) -> None:
        """A merge gave the backup another parent and grew its ranges."""
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            await self._db.execute(
                "UPDATE backups SET parent_id = ? WHERE id = ?", (parent, backup_id)
            )
            for d in disks:
                await self._db.execute(
                    """UPDATE backup_disks SET digest = ?, grid = ?, ranges = ?
                       WHERE backup_id = ? AND disk = ?""",
                    (d.digest, d.grid, d.ranges, backup_id, d.disk),
                )
            await self._db.execute("COMMIT")
        except BaseException:
            await self._db.execute("ROLLBACK")
            raise

    async def delete_backup(self, backup_id: str) -> None:
        """Forget a pruned backup (its children were re-parented first)."""
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            await self._db.execute(
                "UPDATE backups SET parent_id = NULL WHERE parent_id = ?", (backup_id,)
            )
            await self._db.execute("DELETE FROM progress WHERE backup_id = ?", (backup_id,))
            await self._db.execute("DELETE FROM backup_disks WHERE backup_id = ?", (backup_id,))
            await self._db.execute("DELETE FROM backups WHERE id = ?", (backup_id,))
            await self._db.execute("COMMIT")
        except BaseException:
            await self._db.execute("ROLLBACK")
            raise

    async def fail_backup(self, backup_id: str, finished: datetime, error: str) -> None:
        await self._db.execute(
            """UPDATE backups SET status = 'failed', finished = ?, error = ?
               WHERE id = ? AND status = 'running'""",
            (_ts(finished), error, backup_id),
        )
        await self._db.execute("DELETE FROM progress WHERE backup_id = ?", (backup_id,))

    async def set_progress(
        self, backup_id: str, done: int, total: int, rate: float, now: datetime
    ) -> None:
        await self._db.execute(
            """INSERT INTO progress(backup_id, done, total, rate, updated) VALUES (?, ?, ?, ?, ?)
               ON CONFLICT(backup_id) DO UPDATE SET done = excluded.done,
                   total = excluded.total, rate = excluded.rate, updated = excluded.updated""",
            (backup_id, done, total, rate, _ts(now)),
        )

    async def running_progress(self) -> list[dict[str, Any]]:
        """Running backups with their last published progress."""
        async with self._db.execute(
            """SELECT b.id, b.domain_name, p.done, p.total, p.rate, p.updated
               FROM backups b JOIN progress p ON p.backup_id = b.id
               WHERE b.status = 'running' ORDER BY b.started"""
        ) as cur:
            rows = await cur.fetchall()
        return [
            {
                "backup_id": r[0],
                "domain": r[1],
                "done": r[2],
                "total": r[3],
                "rate": r[4],
                "updated": r[5],
            }
            for r in rows
        ]

    async def backups(
        self,
        domain_uuid: str | None = None,
        status: BackupStatus | None = None,
        backup_id: str | None = None,
    ) -> list[BackupRecord]:
        sql = "SELECT * FROM backups WHERE 1=1"
        args: list[object] = []
        if backup_id is not None:
            sql += " AND id = ?"
            args.append(backup_id)
        if domain_uuid is not None:
            sql += " AND domain_uuid = ?"
            args.append(domain_uuid)
        if status is not None:
            sql += " AND status = ?"
            args.append(status.value)
        sql += " ORDER BY started, id"
        async with self._db.execute(sql, args) as cur:
            rows = await cur.fetchall()
        out = []
        for r in rows:
            async with self._db.execute(
                "SELECT * FROM backup_disks WHERE backup_id = ? ORDER BY disk", (r["id"],)
            ) as cur:
                disks = await cur.fetchall()
            out.append(
                BackupRecord(
                    id=r["id"],
                    domain_uuid=r["domain_uuid"],
                    domain_name=r["domain_name"],
                    level=Level(r["level"]),
                    status=BackupStatus(r["status"]),
                    checkpoint=r["checkpoint"],
                    parent=r["parent_id"],
                    started=_req(r["started"]),
                    finished=_dt(r["finished"]),
                    error=r["error"],
                    bytes_read=r["bytes_read"],
                    bytes_written=r["bytes_written"],
                    path=r["path"],
                    disks=tuple(
                        DiskRecord(
                            d["disk"],
                            d["path"],
                            d["virtual_size"],
                            d["bytes_read"],
                            d["bytes_written"],
                            d["bytes_zeroed"],
                            d["digest"],
                            d["grid"],
                            d["ranges"],
                        )
                        for d in disks
                    ),
                )
            )
        return out

    async def backup(self, backup_id: str) -> BackupRecord | None:
        found = await self.backups(backup_id=backup_id)
        return found[0] if found else None
