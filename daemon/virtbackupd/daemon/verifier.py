"""Scheduled verification (`schedule.verify`, `schedule.verify_filesystems`
in a policy), one domain at a time, beside the backups."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import structlog

from virtbackupd.adapters.store import Store
from virtbackupd.config.daemon import DaemonConfig
from virtbackupd.core.records import BackupRecord, BackupStatus
from virtbackupd.engine.upkeep.verify import verify_filesystems, verify_recorded
from virtbackupd.errors import VirtBackupError

VERIFY = "verify"  # the schedule kinds beside the backup levels
VERIFY_FS = "verify_filesystems"

log = structlog.get_logger("virtbackupd.daemon")


async def verify_loop(
    store: Store,
    queue: asyncio.Queue[tuple[str, str]],
    config_of: Callable[[], DaemonConfig],
    name_of: Callable[[str], str],
) -> None:
    """Scheduled verification, one domain at a time, never during a
    backup or prune of that domain (what is left waits for the next
    schedule)."""
    while True:
        uuid, kind = await queue.get()
        name = name_of(uuid)
        config = config_of()  # read at each check: a reload may change it
        try:
            backups = await store.backups(uuid, status=BackupStatus.COMPLETE)
            if kind == VERIFY_FS:
                await _check_filesystems(config, store, name, backups[-1:])
                continue
            bad = [
                verdict.as_json()
                async for _, verdict in verify_recorded(config, store, backups)
                if not verdict.ok
            ]
        except VirtBackupError as exc:
            log.warning("scheduled verify skipped", domain=name, error=str(exc))
            continue
        except Exception as exc:  # a bug: logged, the verifier lives on
            log.error("scheduled verify crashed", domain=name, exc_info=exc)
            continue
        if bad:
            log.error("verify failed", domain=name, backups=len(backups), failed=bad)
        else:
            log.info("verify done", domain=name, backups=len(backups))


async def _check_filesystems(
    config: DaemonConfig, store: Store, name: str, backups: Sequence[BackupRecord]
) -> None:
    """The scheduled `verify --filesystems` of the newest backup."""
    for b in backups:
        found, notes = await verify_filesystems(config, store, b)
        bad = [f"{f.label} ({f.fstype}): {f.detail}" for f in found if f.ok is False]
        if bad:
            log.error(
                "filesystem check failed", domain=name, backup_id=b.id, damaged=bad, notes=notes
            )
        else:
            checked = [f.label for f in found if f.ok]
            log.info(
                "filesystem check done", domain=name, backup_id=b.id, clean=checked, notes=notes
            )
