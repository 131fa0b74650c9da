"""A `virtbackup backup` SIGKILLed at random instants (issue 25): the job
writes its undo log before its catalogue record and before each step it
takes, so whatever instant the process dies at, a record still "running"
has an undo log, and the next backup's clean-up (the replay of that log,
engine.recovery.leftovers) leaves no running record, no undo log, no partial
folder and no checkpoint nothing vouches for; the next backup restores
byte-exact."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path

import pytest

from testbed.daemon import spawn_cli
from testbed.domains import DomainFactory, MiB
from testbed.guest import GuestWriter
from testbed.tools import assert_restores
from virtbackupd.adapters.libvirt_conn import Libvirt
from virtbackupd.adapters.repository import Repository
from virtbackupd.adapters.store import Store
from virtbackupd.config.daemon import load_config
from virtbackupd.core.policy import Policy
from virtbackupd.core.records import BackupStatus
from virtbackupd.engine.backup import BackupContext, backup_domain
from virtbackupd.errors import BackupFailedError


async def _cli_backup(config: Path, name: str) -> asyncio.subprocess.Process:
    return await spawn_cli(
        config,
        "backup",
        name,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def test_a_backup_killed_at_random_instants_leaves_nothing_running(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    """VBT_BACKUP_KILL_SEED replays the instants, VBT_BACKUP_KILLS sets
    how many rounds; each instant is drawn over the length of a whole
    `virtbackup backup` (process start to exit) measured first."""
    seed = int(os.environ.get("VBT_BACKUP_KILL_SEED", random.randrange(1 << 30)))
    kills = int(os.environ.get("VBT_BACKUP_KILLS", "3"))
    print(f"VBT_BACKUP_KILL_SEED={seed}")
    rnd = random.Random(seed)
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[32 * MiB])
    guest = GuestWriter(td)
    (config.parent / "policies" / "slow.yaml").write_text(
        f"domains: [{td.name}]\nbandwidth: 8MiB\n"
    )
    cfg = load_config(config)
    repo = Repository(cfg.backup_root)
    uuid = td.dom.UUIDString()

    proc = await _cli_backup(config, td.name)  # the full the rounds build on
    assert await proc.wait() == 0
    # The span: a whole incremental as each round takes it, process start
    # to exit (the kills land anywhere in it, or just after).
    await asyncio.to_thread(guest.write, "vda", 0, 16 * MiB, 0x20)
    began = time.monotonic()
    proc = await _cli_backup(config, td.name)
    assert await proc.wait() == 0
    span = time.monotonic() - began
    print(f"kills land within {span:.2f} s of the start")

    for n in range(1, kills + 1):
        await asyncio.to_thread(guest.write, "vda", (n % 2) * 16 * MiB, 16 * MiB, 0x20 + n)
        proc = await _cli_backup(config, td.name)
        at = rnd.uniform(0, span)
        await asyncio.sleep(at)
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        await proc.wait()
        async with Store.open(cfg.state_db) as store:
            running = {r.id for r in await store.backups(uuid, status=BackupStatus.RUNNING)}
            logged = {u.backup_id for u in repo.undo_logs(uuid)}
            left = [
                u.steps[-1].kind.value if u.steps else "no step yet" for u in repo.undo_logs(uuid)
            ]
            print(f"kill {n}: SIGKILL {at:.2f} s after the start; left undo logs {left}")
            # Whatever the instant: no record without the log that cleans it.
            assert running <= logged, (running, logged)
            lv = await Libvirt.open(cfg.libvirt_uri)
            try:
                ctx = BackupContext(cfg, store, lv, Policy(Path("test"), domains=(td.name,)))
                nxt = await backup_domain(ctx, td.name)
            finally:
                await lv.close()
            records = await store.backups(uuid)
        assert not [r for r in records if r.status is BackupStatus.RUNNING], records
        for r in records:
            if r.id in running:
                assert r.status is BackupStatus.FAILED and "interrupted" in (r.error or "")
        assert not repo.undo_logs(uuid)
        assert not list(repo.domain_dir(uuid).glob("*.partial"))
        own = {c.getName() for c in td.dom.listAllCheckpoints()}
        vouched = {r.checkpoint for r in records if r.status is BackupStatus.COMPLETE}
        assert {c for c in own if c.startswith("virtbackupd-")} <= vouched
        assert_restores(Path(nxt.path or ""), [(d.disk, d.path) for d in nxt.disks], td, tmp_path)


async def test_a_failure_before_the_undo_log_leaves_no_running_record(
    domains: DomainFactory, config: Path
) -> None:
    """The undo log is written before the catalogue's record, and a
    failure there goes through the job's one failure path: the backup
    fails as a backup (BackupFailedError) and leaves no record "running"
    (before issue 25 the record was written first and stayed "running"
    until the domain's next job swept it)."""
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[8 * MiB], start=False)
    cfg = load_config(config)
    repo = Repository(cfg.backup_root)
    uuid = td.dom.UUIDString()
    undo_dir = repo.domain_dir(uuid) / ".undo"
    undo_dir.parent.mkdir(parents=True)
    undo_dir.write_text("a file where the undo logs' folder goes\n")
    async with Store.open(cfg.state_db) as store:
        lv = await Libvirt.open(cfg.libvirt_uri)
        try:
            ctx = BackupContext(cfg, store, lv, Policy(Path("test"), domains=(td.name,)))
            with pytest.raises(BackupFailedError, match=r"\.undo"):
                await backup_domain(ctx, td.name)
            assert not await store.backups(uuid, status=BackupStatus.RUNNING)
            undo_dir.unlink()
            done = await backup_domain(ctx, td.name)
        finally:
            await lv.close()
    assert done.status is BackupStatus.COMPLETE
