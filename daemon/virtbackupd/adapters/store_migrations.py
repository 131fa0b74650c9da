"""The state database's schema: ordered migrations, the schema version
being how many have run (PRAGMA user_version). Append only: a migration
that shipped is never changed, a new one goes at the end (store.py applies
them in one transaction)."""

from __future__ import annotations

from collections.abc import Sequence

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
    # 2: disks a backup does not hold, with the reason (nothing silently missing)
    """
    CREATE TABLE left_out_disks (
        backup_id TEXT NOT NULL REFERENCES backups(id) ON DELETE CASCADE,
        disk TEXT NOT NULL,
        reason TEXT NOT NULL,
        PRIMARY KEY (backup_id, disk)
    );
    """,
    # 3: stand-ins for backup folders whose manifest a rebuild could not read
    # (listed `unreadable`, never dropped: their children's rows point at them)
    """
    ALTER TABLE backups ADD COLUMN unreadable TEXT;
    """,
    # 4: why a checkpoint went (pruned on purpose, disks restored in place),
    # so that neither `checkpoints` nor a backup's reason calls it lost or
    # broken; SQLite changes a CHECK only by rebuilding the table
    """
    CREATE TABLE checkpoints_v4 (
        domain_uuid TEXT NOT NULL REFERENCES domains(uuid),
        name TEXT NOT NULL,
        parent TEXT,
        created TEXT NOT NULL,
        status TEXT NOT NULL
            CHECK (status IN ('active', 'deleted', 'pruned', 'overwritten')),
        xml TEXT NOT NULL,
        PRIMARY KEY (domain_uuid, name)
    );
    INSERT INTO checkpoints_v4 SELECT domain_uuid, name, parent, created, status, xml
        FROM checkpoints;
    DROP TABLE checkpoints;
    ALTER TABLE checkpoints_v4 RENAME TO checkpoints;
    """,
    # 5: the repositories (by the id in their .repository.json) the catalogue
    # describes, with the root each was last seen at: a catalogue copied
    # beside another repository is told apart
    """
    CREATE TABLE repositories (
        id TEXT PRIMARY KEY,
        root TEXT NOT NULL
    );
    """,
)
