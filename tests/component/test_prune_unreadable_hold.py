"""A hold file prune cannot read (a newer virtbackup's format, a damaged
file) may keep backups in use: prune refuses, naming the file, and removes
nothing; once the file reads or is gone, prune goes on. Before, the hold
was logged as refused and prune removed what it might have held (found by
issue 25's hostile tester)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed.repo_builder import BuiltDomain, MiB
from virtbackupd.adapters.store import Store
from virtbackupd.core.policy import Retention
from virtbackupd.engine.upkeep.prune import prune_domain
from virtbackupd.errors import VirtBackupError


async def test_prune_refuses_while_a_hold_cannot_be_read(tmp_path: Path) -> None:
    b = BuiltDomain(tmp_path, {"vda": 4 * MiB})
    async with Store.open(b.state_db) as store:
        for i in range(3):
            b.write("vda", i * MiB, MiB, 0x11 + i)
            await b.backup(store)
    holds = b.repo.domain_dir(b.uuid) / ".holds"
    holds.mkdir(exist_ok=True)
    future = holds / "h9.json"
    future.write_text(json.dumps({"format": "virtbackupd-hold", "format_version": 99}))
    before = sorted(p.name for p in b.repo.domain_dir(b.uuid).iterdir())

    async with Store.open(b.state_db) as store:
        with pytest.raises(VirtBackupError) as pruning:
            await prune_domain(
                store, b.repo.domain_dir(b.uuid), Retention(keep_last=1), None, b.runtime
            )
        said = str(pruning.value)
        assert str(future) in said and "nothing is pruned" in said and "\n" not in said, said
        assert sorted(p.name for p in b.repo.domain_dir(b.uuid).iterdir()) == before

        future.unlink()
        await prune_domain(
            store, b.repo.domain_dir(b.uuid), Retention(keep_last=1), None, b.runtime
        )
    kept = sorted(p.name for p in b.repo.domain_dir(b.uuid).iterdir() if p.name[0] != ".")
    assert kept == [b.ids[-1]], kept
