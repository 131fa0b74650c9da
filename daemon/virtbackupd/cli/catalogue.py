"""The catalogue (state.db) seen from the CLI: `virtbackup reindex`, and
saying so when it is empty beside a repository that holds backups."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from virtbackupd.adapters.store import Store, StoreDamagedError
from virtbackupd.config.daemon import DaemonConfig
from virtbackupd.config.policy import load_policies, policy_files
from virtbackupd.core.policy import Policy
from virtbackupd.engine.reindex import reindex
from virtbackupd.engine.repository import count_backup_folders
from virtbackupd.errors import VirtBackupError


def policies(config: DaemonConfig, quiet: bool = False) -> list[Policy]:
    """The policies that load; the others are warned about on stderr."""
    found, errors = load_policies(policy_files(config.policy_dirs))
    for e in [] if quiet else errors:
        print(f"virtbackup: warning: {e}", file=sys.stderr)
    return found


def roots(config: DaemonConfig, policies: Sequence[Policy]) -> set[Path]:
    return {config.backup_root} | {p.target for p in policies if p.target}


async def reindex_command(args: argparse.Namespace, config: DaemonConfig) -> int:
    """Rebuild the catalogue from the repository. A damaged database is
    moved aside (kept for inspection, never deleted) and a new one built."""
    moved: Path | None = None
    try:
        async with Store.open(config.state_db, create=False) as probe:
            await probe.check_integrity()
    except StoreDamagedError as exc:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        moved = config.state_db.with_name(f"{config.state_db.name}.damaged-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            part = Path(f"{config.state_db}{suffix}")
            if part.exists():
                part.rename(Path(f"{moved}{suffix}"))
        print(f"virtbackup: {exc.path}: damaged ({exc}); moved aside to {moved}", file=sys.stderr)
    except VirtBackupError:
        pass  # no database yet: reindex creates it
    total = 0
    async with Store.open(config.state_db) as store:
        for root in sorted(roots(config, policies(config))):
            added, problems = await reindex(store, root)
            total += added
            for line in problems:
                print(f"virtbackup: warning: {line}", file=sys.stderr)
    if args.json:
        print(json.dumps({"added": total, "moved_aside": str(moved) if moved else None}))
    else:
        print(f"{total} backup(s) added")
    return 0


async def warn_if_catalogue_empty(config: DaemonConfig, store: Store) -> None:
    """An empty catalogue beside a repository that holds backups (state.db
    lost or replaced): say so, instead of showing nothing."""
    if await store.backups():
        return
    found = sum(count_backup_folders(r) for r in roots(config, policies(config, quiet=True)))
    if found:
        print(
            f"virtbackup: warning: {store.path} records no backup, but the repository holds "
            f"{found} backup folder(s); `virtbackup reindex` rebuilds the catalogue",
            file=sys.stderr,
        )
