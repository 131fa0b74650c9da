"""The SQLite state store (aiosqlite). All SQL of the project lives here
and in its two companions: store_migrations.py (the schema) and
store_rows.py (records to rows and back).

WAL mode, foreign keys on, schema versioned with PRAGMA user_version and
applied by ordered migrations. Timestamps are stored as ISO 8601 UTC text.

Concurrency: one connection per process, and every statement and every
transaction on it goes through one ``asyncio.Lock``. A connection has one
transaction state, so two jobs that interleave ``BEGIN ... COMMIT`` on it
would break each other ("cannot start a transaction within a transaction"),
and a lone write would silently join (or be rolled back with) another
job's transaction. Serializing costs nothing measurable: SQLite admits one
writer at a time anyway, and each call takes milliseconds against backups
that take minutes. Other processes (the CLI beside the daemon) use their
own connection; WAL and ``busy_timeout`` order them.

sqlite3 errors never leave this module raw: they become :class:`StoreError`
naming the file, and a damaged file names the fix (``virtbackup reindex``).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path

import aiosqlite

from virtbackupd.adapters import host_folders, store_rows
from virtbackupd.adapters.store_migrations import MIGRATIONS as MIGRATIONS  # tests read it
from virtbackupd.core.policy import Level
from virtbackupd.core.records import (
    BackupRecord,
    BackupStatus,
    CheckpointRecord,
    CheckpointStatus,
    DiskRecord,
    DomainRecord,
    RunningJob,
)
from virtbackupd.errors import VirtBackupError


class StoreError(VirtBackupError):
    """The state database cannot be opened or used, or is from a newer
    version. ``path`` is the database file."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class StoreDamagedError(StoreError):
    """The file is not a usable SQLite database (truncated, overwritten,
    corrupted pages)."""

    def __init__(self, path: Path, detail: str) -> None:
        super().__init__(
            path,
            f"the state database is damaged ({detail}); `virtbackup reindex` moves it "
            "aside and rebuilds it from the backup repository",
        )


def _translate(path: Path, exc: sqlite3.Error) -> StoreError:
    """sqlite3's DatabaseError family means the file itself is bad; the
    rest (locked, disk I/O, read-only) are reported as they are."""
    if isinstance(exc, sqlite3.DatabaseError) and not isinstance(
        exc, sqlite3.OperationalError | sqlite3.IntegrityError | sqlite3.ProgrammingError
    ):
        return StoreDamagedError(path, str(exc))
    text = str(exc)
    if "malformed" in text or "not a database" in text:
        return StoreDamagedError(path, text)
    return StoreError(path, f"state database error: {text}")


def file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path` now, None if there is none."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class Store:
    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self._lock = asyncio.Lock()
        self.path = path
        self.identity = file_identity(path)

    # --- lifecycle ---------------------------------------------------------------
    @classmethod
    @asynccontextmanager
    async def open(cls, path: Path, create: bool = True) -> AsyncIterator[Store]:
        """Open (and migrate) the database; `create=False` refuses to make
        a new empty one where none is."""
        host_folders.make_folder(path.parent)
        if not create and not path.exists():
            raise StoreError(path, "no state database here")
        try:
            db = await aiosqlite.connect(path, isolation_level=None)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(path, f"cannot open the state database: {exc}") from exc
        try:
            db.row_factory = aiosqlite.Row
            store = cls(db, path)
            await store._execute("PRAGMA busy_timeout=10000")
            await store._enter_wal()
            await store._execute("PRAGMA foreign_keys=ON")
            await store._migrate()
            host_folders.set_owner(path, mode=0o600)
            yield store
        finally:
            await db.close()

    async def _enter_wal(self) -> None:
        """Switch to WAL (a no-op once the file is in WAL). Switching a new
        file needs a lock that another process opening it at the same
        moment may hold, and SQLite answers that with "database is locked"
        without waiting on the busy timeout: so wait here, as long as the
        busy timeout would."""
        deadline = time.monotonic() + 10
        while True:
            try:
                await self._execute("PRAGMA journal_mode=WAL")
            except StoreError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
            else:
                return

    def replaced(self) -> bool:
        """Whether the file at our path is no longer the one we opened
        (deleted, or replaced by another file): writes would go to a file
        nobody else sees."""
        return file_identity(self.path) != self.identity

    async def check_integrity(self) -> None:
        """Raise StoreDamagedError unless SQLite's quick_check passes."""
        rows = await self._fetchall("PRAGMA quick_check")
        problems = [str(r[0]) for r in rows if str(r[0]) != "ok"]
        if problems:
            raise StoreDamagedError(self.path, "; ".join(problems[:3]))

    async def _migrate(self) -> None:
        """Bring the schema up to date. The version is read inside the
        IMMEDIATE transaction that applies the migrations: two processes
        opening a new database at once (the daemon and a CLI command, or
        two commands) must not both see version 0 and both create it."""

        async def upgrade() -> None:
            async with self._db.execute("PRAGMA user_version") as cur:
                row = await cur.fetchone()
            version = int(row[0]) if row else 0
            if version > len(MIGRATIONS):
                raise StoreError(
                    self.path,
                    f"schema version {version} is newer than this virtbackupd "
                    f"({len(MIGRATIONS)}); upgrade virtbackupd",
                )
            for number in range(version, len(MIGRATIONS)):
                # Migrations hold no ';' inside literals, so splitting is
                # safe, and unlike executescript() it keeps them inside this
                # one transaction.
                for stmt in MIGRATIONS[number].split(";"):
                    if stmt.strip():
                        await self._db.execute(stmt)
                await self._db.execute(f"PRAGMA user_version = {number + 1}")

        await asyncio.shield(self._immediate(upgrade))

    # --- repositories -------------------------------------------------------------
    async def repository_ids(self) -> dict[str, str]:
        """The id of each repository the catalogue describes -> its root."""
        rows = await self._fetchall("SELECT id, root FROM repositories")
        return {str(r["id"]): str(r["root"]) for r in rows}

    async def record_repository(self, root: Path, repository_id: str) -> None:
        await self._transaction(
            [
                (
                    "INSERT INTO repositories(id, root) VALUES (?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET root = excluded.root",
                    (repository_id, str(root)),
                )
            ]
        )

    # --- the one way to the connection ------------------------------------------
    async def _execute(self, sql: str, args: Sequence[object] = ()) -> None:
        async with self._lock:
            try:
                await self._db.execute(sql, args)
            except sqlite3.Error as exc:
                raise _translate(self.path, exc) from exc

    async def _fetchall(self, sql: str, args: Sequence[object] = ()) -> list[aiosqlite.Row]:
        async with self._lock:
            try:
                async with self._db.execute(sql, args) as cur:
                    return list(await cur.fetchall())
            except sqlite3.Error as exc:
                raise _translate(self.path, exc) from exc

    async def _one(self, sql: str, *args: object) -> aiosqlite.Row:
        rows = await self._fetchall(sql, args)
        assert rows
        return rows[0]

    async def _transaction(self, statements: Iterable[tuple[str, Sequence[object]]]) -> None:
        """Run the statements in one IMMEDIATE transaction, alone on the
        connection; all or nothing. Once begun it runs to its end even if
        the caller is cancelled (it takes milliseconds): a cancelled job
        must never leave the shared connection inside its transaction."""
        todo = list(statements)

        async def run() -> None:
            for sql, args in todo:
                await self._db.execute(sql, args)

        await asyncio.shield(self._immediate(run))

    async def _immediate(self, body: Callable[[], Awaitable[None]]) -> None:
        """`body` inside BEGIN IMMEDIATE ... COMMIT, alone on the connection;
        rolled back if it raises."""
        async with self._lock:
            try:
                await self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise _translate(self.path, exc) from exc
            try:
                await body()
                await self._db.execute("COMMIT")
            except BaseException as exc:
                await self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise _translate(self.path, exc) from exc
                raise

    async def schema_version(self) -> int:
        return int((await self._one("PRAGMA user_version"))[0])

    # --- domains -------------------------------------------------------------------
    async def see_domain(self, uuid: str, name: str, now: datetime) -> None:
        await self._execute(
            """INSERT INTO domains(uuid, name, first_seen, last_seen) VALUES (?, ?, ?, ?)
               ON CONFLICT(uuid) DO UPDATE SET name = excluded.name,
                   last_seen = excluded.last_seen, undefined_at = NULL""",
            (uuid, name, store_rows.ts(now), store_rows.ts(now)),
        )

    async def domain(self, uuid: str) -> DomainRecord | None:
        rows = await self._fetchall("SELECT * FROM domains WHERE uuid = ?", (uuid,))
        if not rows:
            return None
        row = rows[0]
        return DomainRecord(
            row["uuid"],
            row["name"],
            store_rows.req(row["first_seen"]),
            store_rows.req(row["last_seen"]),
            store_rows.dt(row["undefined_at"]),
        )

    async def domain_by_name(self, name: str) -> DomainRecord | None:
        rows = await self._fetchall(
            "SELECT uuid FROM domains WHERE name = ? ORDER BY last_seen DESC LIMIT 1", (name,)
        )
        return await self.domain(rows[0]["uuid"]) if rows else None

    async def domains_named(self, name: str) -> list[DomainRecord]:
        """Every domain that has borne `name`: named so now in the
        catalogue, or backed up under it (a VM re-created under the same
        name has a new UUID; a renamed one kept its UUID); oldest first."""
        rows = await self._fetchall(
            """SELECT uuid FROM domains WHERE name = ?
               UNION SELECT DISTINCT domain_uuid FROM backups WHERE domain_name = ?""",
            (name, name),
        )
        found = [d for r in rows if (d := await self.domain(r["uuid"])) is not None]
        return sorted(found, key=lambda d: (d.first_seen, d.uuid))

    # --- checkpoints -----------------------------------------------------------------
    async def set_checkpoint_status(
        self, domain_uuid: str, name: str, status: CheckpointStatus
    ) -> None:
        await self._execute(
            "UPDATE checkpoints SET status = ? WHERE domain_uuid = ? AND name = ?",
            (status.value, domain_uuid, name),
        )

    async def checkpoints(self, domain_uuid: str) -> list[CheckpointRecord]:
        rows = await self._fetchall(
            "SELECT * FROM checkpoints WHERE domain_uuid = ? ORDER BY created, name",
            (domain_uuid,),
        )
        return [
            CheckpointRecord(
                r["domain_uuid"],
                r["name"],
                r["parent"],
                store_rows.req(r["created"]),
                CheckpointStatus(r["status"]),
                r["xml"],
            )
            for r in rows
        ]

    # --- backups -----------------------------------------------------------------------
    async def start_backup(self, b: BackupRecord) -> None:
        statements: list[store_rows.Statement] = [
            (
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
                    store_rows.ts(b.started),
                    b.path,
                ),
            )
        ]
        statements += store_rows.left_out_rows(b)
        await self._transaction(statements)

    async def record_backup(
        self, b: BackupRecord, checkpoint: CheckpointRecord | None = None
    ) -> None:
        """Make the catalogue say what the repository says of one backup
        (committed or failed), whatever it said before: the domain, the
        checkpoint, the row, its disks and left-out disks, in one
        transaction. Used at commit, after a crash, and by reindex."""
        statements = [store_rows.domain_seen(b)]
        if checkpoint is not None:
            statements.append(store_rows.checkpoint_row(checkpoint))
        statements += [
            ("DELETE FROM backup_disks WHERE backup_id = ?", (b.id,)),
            ("DELETE FROM left_out_disks WHERE backup_id = ?", (b.id,)),
            ("DELETE FROM progress WHERE backup_id = ?", (b.id,)),
            store_rows.backup_row(b),
            *store_rows.disk_rows(b),
            *store_rows.left_out_rows(b),
        ]
        await self._transaction(statements)

    async def replan_backup(self, backup_id: str, level: Level, parent: str | None) -> None:
        """A running backup changed level (its incremental became a full)."""
        await self._execute(
            "UPDATE backups SET level = ?, parent_id = ? WHERE id = ? AND status = 'running'",
            (level.value, parent, backup_id),
        )

    async def rechain_backup(
        self, backup_id: str, parent: str | None, disks: Sequence[DiskRecord]
    ) -> None:
        """A merge gave the backup another parent and grew its ranges."""
        statements: list[store_rows.Statement] = [
            ("UPDATE backups SET parent_id = ? WHERE id = ?", (parent, backup_id))
        ]
        statements += [
            (
                """UPDATE backup_disks SET digest = ?, grid = ?, ranges = ?
                   WHERE backup_id = ? AND disk = ?""",
                (d.digest, d.grid, store_rows.ranges_json(d.ranges), backup_id, d.disk),
            )
            for d in disks
        ]
        await self._transaction(statements)

    async def delete_backup(self, backup_id: str) -> None:
        """Forget a pruned backup (its children were re-parented first)."""
        await self._transaction(
            [
                ("UPDATE backups SET parent_id = NULL WHERE parent_id = ?", (backup_id,)),
                ("DELETE FROM progress WHERE backup_id = ?", (backup_id,)),
                ("DELETE FROM backup_disks WHERE backup_id = ?", (backup_id,)),
                ("DELETE FROM left_out_disks WHERE backup_id = ?", (backup_id,)),
                ("DELETE FROM backups WHERE id = ?", (backup_id,)),
            ]
        )

    async def fail_backup(self, backup_id: str, finished: datetime, error: str) -> None:
        await self._transaction(
            [
                (
                    """UPDATE backups SET status = 'failed', finished = ?, error = ?
                       WHERE id = ? AND status = 'running'""",
                    (store_rows.ts(finished), error, backup_id),
                ),
                ("DELETE FROM progress WHERE backup_id = ?", (backup_id,)),
            ]
        )

    async def set_progress(
        self, backup_id: str, done: int, total: int, rate: float, now: datetime
    ) -> None:
        await self._execute(
            """INSERT INTO progress(backup_id, done, total, rate, updated) VALUES (?, ?, ?, ?, ?)
               ON CONFLICT(backup_id) DO UPDATE SET done = excluded.done,
                   total = excluded.total, rate = excluded.rate, updated = excluded.updated""",
            (backup_id, done, total, rate, store_rows.ts(now)),
        )

    async def running_progress(self) -> list[RunningJob]:
        """Running backups with their last published progress (zero until
        the job has published any)."""
        rows = await self._fetchall(
            """SELECT b.id, b.domain_name, b.domain_uuid, b.level, b.started,
                      p.done, p.total, p.rate, p.updated
               FROM backups b LEFT JOIN progress p ON p.backup_id = b.id
               WHERE b.status = 'running' ORDER BY b.started"""
        )
        return [
            RunningJob(
                backup_id=r["id"],
                domain=r["domain_name"],
                domain_uuid=r["domain_uuid"],
                level=Level(r["level"]),
                started=store_rows.req(r["started"]),
                done=r["done"] or 0,
                total=r["total"] or 0,
                rate=r["rate"] or 0.0,
                updated=store_rows.dt(r["updated"]),
            )
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
        rows = await self._fetchall(sql, args)
        out = []
        for r in rows:
            disks = await self._fetchall(
                "SELECT * FROM backup_disks WHERE backup_id = ? ORDER BY disk", (r["id"],)
            )
            left_out = await self._fetchall(
                "SELECT disk, reason FROM left_out_disks WHERE backup_id = ? ORDER BY disk",
                (r["id"],),
            )
            out.append(store_rows.backup_record(r, disks, left_out))
        return out

    async def backup(self, backup_id: str) -> BackupRecord | None:
        found = await self.backups(backup_id=backup_id)
        return found[0] if found else None
