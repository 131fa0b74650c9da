"""`virtbackup reindex`: rebuild the catalogue (state.db) from the
backup repository, the folders being the truth."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from virtbackupd.adapters.repository import Repository
from virtbackupd.adapters.store import Store, StoreDamagedError
from virtbackupd.cli.catalogue import policies, repositories, roots
from virtbackupd.cli.commands import Command, Needs, Session, no_arguments
from virtbackupd.config.daemon import DaemonConfig
from virtbackupd.engine.upkeep.catalogue import ForeignCatalogueError, check_identity, reconcile
from virtbackupd.errors import VirtBackupError


def _move_aside(config: DaemonConfig, why: str) -> Path:
    """The database files renamed beside themselves (kept for inspection,
    never deleted), so that a new one is built."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    moved = config.state_db.with_name(f"{config.state_db.name}.{why}-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        part = Path(f"{config.state_db}{suffix}")
        if part.exists():
            part.rename(Path(f"{moved}{suffix}"))
    return moved


async def run(args: argparse.Namespace, session: Session) -> int:
    """Rebuild the catalogue from the repository. A damaged database, or
    one describing another repository, is moved aside (kept for
    inspection, never deleted) and a new one built, which adopts the
    repositories it is built from."""
    config = session.config
    moved: Path | None = None
    try:
        async with Store.open(config.state_db, create=False) as probe:
            await probe.check_integrity()
            await check_identity(probe, repositories(config))
    except StoreDamagedError as exc:
        moved = _move_aside(config, "damaged")
        print(f"virtbackup: {exc.path}: damaged ({exc}); moved aside to {moved}", file=sys.stderr)
    except ForeignCatalogueError as exc:
        moved = _move_aside(config, "foreign")
        print(
            f"virtbackup: {exc.path}: describes repository {', '.join(exc.recorded)}, not the "
            f"one at {exc.root}; moved aside to {moved}",
            file=sys.stderr,
        )
    except VirtBackupError:
        pass  # no database yet: reindex creates it
    backups = attempts = 0
    unreadable: list[str] = []
    problems: list[str] = []
    async with Store.open(config.state_db) as store:
        await check_identity(store, repositories(config))
        for root in sorted(roots(config, policies(config))):
            found = await reconcile(store, Repository(root))
            backups += len(found.recorded)
            attempts += len(found.attempts)
            unreadable += found.unreadable
            problems += found.problems
    for line in problems:  # one line each, naming the file
        print(f"virtbackup: warning: {line}", file=sys.stderr)
    if args.json:
        out = {
            "added": backups + len(unreadable) + attempts,
            "backups": backups,
            "unreadable": unreadable,
            "failed_attempts": attempts,
            "problems": problems,
            "moved_aside": str(moved) if moved else None,
        }
        print(json.dumps(out))
    else:
        print(
            f"{backups} backup(s) and {attempts} failed attempt(s) recorded"
            + (
                f"; {len(unreadable)} unreadable backup(s) recorded as such "
                "(`virtbackup list` shows them and the backups built on them)"
                if unreadable
                else ""
            )
        )
    return 0


COMMAND = Command(
    "reindex",
    "rebuild the state database from the backup repository",
    no_arguments,
    run,
    needs=Needs.CONFIG,
)
