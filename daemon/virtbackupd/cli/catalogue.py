"""The catalogue (state.db) seen from the CLI: the policies and the
repositories they name, the check that the catalogue describes this
repository, and bringing it in line with the folders (`virtbackup
reindex` rebuilds it: cli.commands.reindex)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from virtbackupd.adapters.repository import Repository
from virtbackupd.adapters.store import Store
from virtbackupd.config.daemon import DaemonConfig
from virtbackupd.config.policy import LoadedPolicies, load_policies, policy_files
from virtbackupd.core.policy import Policy
from virtbackupd.engine.upkeep.catalogue import check_identity, reconcile


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
