"""`virtbackup cancel` of a backup whose process dies or died, without
libvirt (tests/integration/test_dead_owner.py has the libvirt case): the
owner is a real process holding the domain's lock as a backup does, the
record and the undo log are real, and cancel runs as its own process."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from virtbackupd.adapters.repository import Repository, UndoKind, UndoLog, UndoStep
from virtbackupd.adapters.store import Store
from virtbackupd.core.policy import Level
from virtbackupd.core.records import BackupRecord, BackupStatus

UUID = "6a1f0b5e-1111-4222-8333-944455556666"


def setup(tmp: Path, *steps: UndoStep) -> tuple[Path, Repository, str]:
    """A config whose libvirt cannot be reached, and a backup recorded
    running with its undo log and partial folder."""
    cfg = tmp / "virtbackupd.yaml"
    (tmp / "policies").mkdir()
    cfg.write_text(
        f"state_dir: {tmp / 'state'}\nbackup_root: {tmp / 'repo'}\nruntime_dir: {tmp / 'run'}\n"
        f"scratch_dir: {tmp / 'scratch'}\npolicy_dirs: [{tmp / 'policies'}]\n"
        f"libvirt_uri: qemu+unix:///system?socket={tmp / 'no-libvirt.sock'}\n"
    )
    repo = Repository(tmp / "repo")
    now = datetime.now(UTC)
    backup_id = "20261207T120000.000Z-abcd"
    partial = repo.create_partial(UUID, backup_id)

    async def record() -> None:
        async with Store.open(tmp / "state" / "state.db") as store:
            await store.see_domain(UUID, "vm", now)
            await store.start_backup(
                BackupRecord(
                    backup_id, UUID, "vm", Level.FULL, BackupStatus.RUNNING, None, None, now,
                    path=str(repo.final_dir(UUID, backup_id)),
                )
            )  # fmt: skip

    asyncio.run(record())
    repo.write_undo(
        UndoLog(
            backup_id,
            "vm",
            UUID,
            Level.FULL,
            now,
            (UndoStep(UndoKind.PARTIAL, str(partial)), *steps),
        )
    )
    return cfg, repo, backup_id


def cancel(cfg: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "virtbackupd.cli.main", "-c", str(cfg), "--json", "cancel", "vm"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cancel_notices_an_owner_that_dies_while_it_waits_and_cleans_up(tmp_path: Path) -> None:
    cfg, repo, backup_id = setup(tmp_path)
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time; from virtbackupd.engine.locks import domain_lock;"
            "from pathlib import Path;"
            "cm = domain_lock(Path(sys.argv[1]), sys.argv[2], 'vm', 'backup'); cm.__enter__();"
            "print('held', flush=True); time.sleep(300)",
            str(tmp_path / "run"),
            UUID,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None
    assert owner.stdout.readline().strip() == "held"
    owner.stdout.close()
    proc = cancel(cfg)
    request = tmp_path / "run" / "cancel" / UUID
    deadline = time.monotonic() + 60
    while not request.exists():  # cancel asked the live owner and waits
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    owner.send_signal(signal.SIGKILL)  # it dies instead of answering
    owner.wait()
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    done = json.loads(out)
    assert (done["id"], done["status"]) == (backup_id, "failed")
    assert "interrupted" in done["error"]
    assert not repo.undo_logs(UUID)
    assert not repo.partial_dir(UUID, backup_id).exists()
    assert not request.exists()  # no stale request for the domain's next backup


def test_cancel_without_libvirt_says_what_is_left_for_the_next_backup(tmp_path: Path) -> None:
    cfg, repo, backup_id = setup(tmp_path, UndoStep(UndoKind.CHECKPOINT, name="virtbackupd-x"))
    proc = cancel(cfg)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1
    assert "libvirt cannot be reached" in err and backup_id in err, err
    assert "Traceback" not in err
    assert repo.undo_logs(UUID)  # kept: its checkpoint must still be deleted
