"""Rebuild the catalogue (state.db) from the backup repository after
losing or damaging it: every committed backup folder is self-describing,
and failed attempts are kept in the repository too (engine.catalogue)."""

from __future__ import annotations

from pathlib import Path

from virtbackupd.adapters.repository import Repository
from virtbackupd.adapters.store import Store
from virtbackupd.engine.catalogue import reconcile


async def reindex(store: Store, root: Path) -> tuple[int, list[str]]:
    """Record every backup and failed attempt under `root` that the store
    lacks. Returns how many were added and one problem line per
    unreadable file. Partial folders (crashed backups) are never imported."""
    found = await reconcile(store, Repository(root))
    return len(found.recorded) + len(found.attempts), found.problems
