"""The catalogue (state.db) seen from the CLI: `virtbackup reindex`, and
saying so when it is empty beside a repository that holds backups."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from virtbackupd.adapters.repository import Repository
from virtbackupd.adapters.store import Store, StoreDamagedError
from virtbackupd.config.daemon import DaemonConfig
from virtbackupd.config.policy import LoadedPolicies, load_policies, policy_files
from virtbackupd.core.policy import Policy
from virtbackupd.engine.catalogue import ForeignCatalogueError, check_identity, reconcile
from virtbackupd.errors import VirtBackupError


def policies(config: DaemonConfig, quiet: bool = False) -> list[Policy]:
    """The policies that load; the others are warned about on stderr."""
    return policy_set(config, quiet).policies


def policy_set(config: DaemonConfig, quiet: bool = False) -> LoadedPolicies:
    """The policy folders as read now; every problem is warned about on
    stderr (a command acting on one domain refuses it when a file that
    does not load may govern it: LoadedPolicies.refusal)."""
    loaded = load_policies(policy_files(config.policy_dirs))
    for e in [] if quiet else loaded.errors:
        print(f"virtbackup: warning: {e}", file=sys.stderr)
    return loaded


def roots(config: DaemonConfig, policies: Sequence[Policy]) -> set[Path]:
    return {config.backup_root} | {p.target for p in policies if p.target}


def repositories(config: DaemonConfig, quiet: bool = True) -> list[Repository]:
    return [Repository(root) for root in sorted(roots(config, policies(config, quiet)))]


async def check_catalogue(config: DaemonConfig, store: Store) -> None:
    """Refuse a catalogue that describes another repository (copied or
    moved beside this backup_root), before anything reads it."""
    await check_identity(store, repositories(config))


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


async def reindex_command(args: argparse.Namespace, config: DaemonConfig) -> int:
    """Rebuild the catalogue from the repository. A damaged database, or
    one describing another repository, is moved aside (kept for
    inspection, never deleted) and a new one built, which adopts the
    repositories it is built from."""
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


async def reconcile_catalogue(config: DaemonConfig, store: Store) -> None:
    """The folders are the truth: before a command reads the catalogue, it
    is brought in line with them (cheap: only what disagrees is read), and
    what changed is said."""
    for root in sorted(roots(config, policies(config, quiet=True))):
        found = await reconcile(store, Repository(root))
        if found.recorded or found.attempts:
            print(
                f"virtbackup: warning: {store.path} lacked {len(found.recorded)} backup(s) and "
                f"{len(found.attempts)} failed attempt(s) that {root} holds; recorded them "
                "(`virtbackup reindex` does the same)",
                file=sys.stderr,
            )
        if found.vanished:
            print(
                f"virtbackup: warning: the folders of {', '.join(found.vanished)} are gone from "
                f"{root}; no longer listed",
                file=sys.stderr,
            )
        for line in found.problems:
            print(f"virtbackup: warning: {line}", file=sys.stderr)
