"""engine.recovery.leftovers: what is left of the RUNNING-record sweep (issue 25).
A backup writes its undo log before its record now, so a record still
"running" without an undo log comes only from an older version that died
between the two: it left the record and nothing else, and the next job
on the domain marks it failed."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import cast

from virtbackupd.adapters.libvirt_conn import DomainRef, Libvirt
from virtbackupd.adapters.repository import Repository
from virtbackupd.adapters.store import Store
from virtbackupd.config.daemon import load_config
from virtbackupd.core.policy import Level
from virtbackupd.core.records import BackupRecord, BackupStatus
from virtbackupd.engine.recovery.leftovers import INTERRUPTED, clean_leftovers

UUID = "6a1f0b5e-2222-4222-8333-944455556666"


async def test_an_older_versions_running_record_without_undo_log_is_failed(
    tmp_path: Path,
) -> None:
    cfg_file = tmp_path / "virtbackupd.yaml"
    (tmp_path / "policies").mkdir()
    cfg_file.write_text(
        f"state_dir: {tmp_path / 'state'}\nbackup_root: {tmp_path / 'repo'}\n"
        f"runtime_dir: {tmp_path / 'run'}\nscratch_dir: {tmp_path / 'scratch'}\n"
        f"policy_dirs: [{tmp_path / 'policies'}]\n"
    )
    config = load_config(cfg_file)
    repo = Repository(config.backup_root)
    now = datetime.now(UTC)
    backup_id = "20261207T120000.000Z-01d1"
    async with Store.open(config.state_db) as store:
        await store.see_domain(UUID, "vm", now)
        await store.start_backup(
            BackupRecord(backup_id, UUID, "vm", Level.FULL, BackupStatus.RUNNING, None, None, now)
        )
        # No freeze record and no undo log: libvirt is never asked.
        never_called = cast("Libvirt", None)
        cleaned = await clean_leftovers(
            never_called, store, DomainRef("vm", UUID), config, repo, now
        )
        rec = await store.backup(backup_id)
    assert cleaned == [backup_id]
    assert rec is not None
    assert rec.status is BackupStatus.FAILED and rec.error == INTERRUPTED
