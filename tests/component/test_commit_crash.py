"""A backup's commit killed at every step (a real SIGKILL of a real
process): afterwards either a complete backup recorded as complete, or
nothing trusted; the catalogue and the folders agree; and a lost or
damaged catalogue is rebuilt, failed attempts included."""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import UTC, datetime
from pathlib import Path

import pytest

from testbed.repo_builder import BuiltDomain, MiB
from testbed.tools import qemu_img_compare, run
from virtbackupd.adapters.repository import UndoKind, UndoLog
from virtbackupd.adapters.store import Store
from virtbackupd.core.policy import Level
from virtbackupd.core.records import BackupRecord, BackupStatus
from virtbackupd.engine.recovery.leftovers import INTERRUPTED, settle
from virtbackupd.engine.recovery.undo import Images, ReplayContext, Undo, replay
from virtbackupd.engine.upkeep.catalogue import reconcile

STEPS = ["metadata written", "renamed", "catalogue updated", "undo log dropped"]


def killed_at(b: BuiltDomain, step: str) -> None:
    """Take a backup in a child process that SIGKILLs itself right after
    `step` of the commit."""

    def hook(label: str) -> None:
        if label == step:
            os.kill(os.getpid(), signal.SIGKILL)

    async def child() -> None:
        async with Store.open(b.state_db) as store:
            await b.backup(store, step=hook)

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            asyncio.run(child())
        finally:
            os._exit(3)  # never reached when the hook fires
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


async def agree(b: BuiltDomain, store: Store) -> set[str]:
    """The catalogue's complete backups are exactly the backup folders."""
    folders = {s.manifest.id for s in b.repo.backups(b.uuid)}
    complete = {r.id for r in await store.backups(b.uuid, status=BackupStatus.COMPLETE)}
    assert complete == folders
    assert not list(b.repo.domain_dir(b.uuid).glob("*.partial"))
    assert not b.repo.undo_logs(b.uuid)
    assert not await store.backups(b.uuid, status=BackupStatus.RUNNING)
    return folders


@pytest.mark.parametrize("step", STEPS)
async def test_a_commit_killed_at_any_step_leaves_all_or_nothing(tmp_path: Path, step: str) -> None:
    b = BuiltDomain(tmp_path, {"vda": 8 * MiB})
    async with Store.open(b.state_db) as store:
        b.write("vda", 0, MiB, 0x41)
        await b.backup(store)
    b.write("vda", 2 * MiB, MiB, 0x42)
    killed_at(b, step)
    new = {p.name.split("-", 1)[1].rsplit("-vda", 1)[0] for p in tmp_path.glob("ref-*-vda.raw")}
    (new_id,) = new - set(b.ids)
    async with Store.open(b.state_db) as store:
        await settle(store, b.repo, b.uuid, datetime.now(UTC))
        await reconcile(store, b.repo)
        folders = await agree(b, store)
        rec = await store.backup(new_id)
        assert rec is not None
        if step == "metadata written":  # before the rename: nothing trusted
            assert folders == {b.ids[0]}
            assert rec.status is BackupStatus.FAILED and rec.error == INTERRUPTED
            assert [a.backup_id for a in b.repo.attempts(b.uuid)] == [new_id]
        else:  # after it: complete, and it restores
            assert folders == {b.ids[0], new_id}
            assert rec.status is BackupStatus.COMPLETE and rec.parent == b.ids[0]
            out = tmp_path / "restored.raw"
            run("qemu-img", "convert", "-O", "raw", b.image(new_id, "vda"), out)
            qemu_img_compare(tmp_path / f"ref-{new_id}-vda.raw", out, "raw", "raw")


FAILED_ID = "20261207T000000.000Z-fa11"


async def test_a_lost_or_damaged_catalogue_is_rebuilt_with_failed_attempts(
    tmp_path: Path,
) -> None:
    b = BuiltDomain(tmp_path, {"vda": 8 * MiB})
    async with Store.open(b.state_db) as store:
        for i in range(3):
            b.write("vda", i * MiB, MiB, 0x50 + i)
            await b.backup(store)
        # A failed attempt: its undo log replayed as a failing job does.
        now = datetime.now(UTC)
        await store.start_backup(
            BackupRecord(FAILED_ID, b.uuid, b.name, Level.INCREMENTAL, BackupStatus.RUNNING,
                         None, b.ids[-1], now)
        )  # fmt: skip
        undo = Undo(
            b.repo,
            UndoLog(
                FAILED_ID,
                b.name,
                b.uuid,
                Level.INCREMENTAL,
                now,
                parent=b.ids[-1],
            ),
        )
        undo.note(UndoKind.PARTIAL, b.repo.partial_dir(b.uuid, FAILED_ID))
        b.repo.create_partial(b.uuid, FAILED_ID)
        undoing = ReplayContext(None, store, b.repo, None, images=Images.LEAVE)
        await replay(undoing, undo.log, "the disk fell off", now)
        before = {r.id: r for r in await store.backups(b.uuid)}
    assert before[FAILED_ID].status is BackupStatus.FAILED

    for damage in ("delete", "garbage"):
        for f in b.state_db.parent.glob("state.db*"):
            f.unlink()
        if damage == "garbage":
            b.state_db.write_bytes(b"\0garbage" * 512)
            b.state_db.rename(b.state_db.with_name("state.db.damaged"))
        async with Store.open(b.state_db) as store:
            found = await reconcile(store, b.repo)  # what `virtbackup reindex` runs
            assert not found.problems
            assert len(found.recorded) + len(found.attempts) == len(before)
            after = {r.id: r for r in await store.backups(b.uuid)}
            assert after.keys() == before.keys()
            for backup_id, rec in before.items():
                got = after[backup_id]
                assert (got.status, got.parent, got.level, got.error) == (
                    rec.status, rec.parent, rec.level, rec.error
                )  # fmt: skip
                assert [d.digest for d in got.disks] == [d.digest for d in rec.disks]
            # The chain goes on from the catalogue that was rebuilt.
            b.write("vda", 5 * MiB, MiB, 0x60)
            nxt = await b.backup(store)
            assert nxt.parent == b.ids[-2]
            await agree(b, store)
            before = {r.id: r for r in await store.backups(b.uuid)}
    out = tmp_path / "last.raw"
    run("qemu-img", "convert", "-O", "raw", b.image(b.ids[-1], "vda"), out)
    qemu_img_compare(b.refs[b.ids[-1]]["vda"], out, "raw", "raw")
