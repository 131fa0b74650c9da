"""The per-operation format check on real repositories: restore and prune
ask for the manifests they act on by operation, and a format version the
operation does not take is refused by file, version and what this
virtbackupd takes, before anything is written; reading (verify) is
unaffected. The table is narrowed here as a later version may narrow it
(today every operation takes formats 1 and 2; here restore and prune take
a format 3 alone, as a later version that dropped format 2 might)."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.repo_builder import BuiltDomain, MiB
from virtbackupd.adapters.repository import MANIFEST, PRUNE_JOURNAL
from virtbackupd.adapters.store import Store
from virtbackupd.core.policy import Retention
from virtbackupd.core.repository_format import versions
from virtbackupd.core.repository_format.versions import Operation
from virtbackupd.engine.restore import RestoreContext, restore_to_dir
from virtbackupd.engine.upkeep.prune import prune_domain
from virtbackupd.engine.upkeep.verify import verify_backup
from virtbackupd.errors import VirtBackupError


async def test_restore_and_prune_refuse_a_format_they_do_not_take_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = BuiltDomain(tmp_path, {"vda": 4 * MiB})
    async with Store.open(b.state_db) as store:
        b.write("vda", 0, MiB, 0x11)
        await b.backup(store)
        b.write("vda", MiB, MiB, 0x22)
        await b.backup(store)
    full, inc = b.ids
    monkeypatch.setattr(
        versions,
        "MANIFEST_VERSIONS",
        {**versions.MANIFEST_VERSIONS, Operation.RESTORE: frozenset({3}),
         Operation.PRUNE: frozenset({3})},
    )  # fmt: skip

    with pytest.raises(VirtBackupError) as restoring:
        await restore_to_dir(
            RestoreContext(b.folder(inc), ("vda",), b.runtime), tmp_path / "out", "raw"
        )
    said = str(restoring.value)
    assert said == (
        f"{b.folder(inc) / MANIFEST}: written in repository format 2; "
        "this virtbackupd can restore from backups of format 3 only"
    ), said
    assert not (tmp_path / "out" / "vda.raw").exists()

    async with Store.open(b.state_db) as store:
        with pytest.raises(VirtBackupError) as pruning:
            await prune_domain(
                store, b.repo.domain_dir(b.uuid), Retention(keep_last=1), None, b.runtime
            )
    said = str(pruning.value)
    assert "format 2; this virtbackupd can prune backups of format 3 only" in said, said
    assert str(b.folder(full) / MANIFEST) in said and "\n" not in said, said
    assert not (b.repo.domain_dir(b.uuid) / PRUNE_JOURNAL).exists()
    assert sorted(p.name for p in b.repo.domain_dir(b.uuid).iterdir() if p.name[0] != ".") == [
        full,
        inc,
    ]

    assert (await verify_backup(b.folder(inc), b.runtime)).ok  # reading is not narrowed
