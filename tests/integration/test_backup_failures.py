"""Failure semantics of the backup engine against real libvirtd and QEMU:
a failed backup never looks complete, leaves no checkpoint a later
incremental could trust, and the next backup restores byte-exact."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import libvirt
import pytest
import structlog.testing

from testbed.daemon import spawn_cli
from testbed.domains import DomainFactory, GuestDomain, MiB, wait_until
from testbed.guest import GuestWriter
from testbed.tools import assert_restores, qemu_img_info
from virtbackupd.adapters.libvirt_conn import Libvirt
from virtbackupd.adapters.store import Store
from virtbackupd.config.daemon import load_config
from virtbackupd.core.policy import Level, Policy, Quiesce
from virtbackupd.core.records import BackupRecord, BackupStatus
from virtbackupd.engine.backup import BackupContext, backup_domain
from virtbackupd.errors import BackupBusyError, BackupFailedError


@asynccontextmanager
async def engine(
    config: Path, name: str, bandwidth: int | None = None
) -> AsyncIterator[BackupContext]:
    cfg = load_config(config)
    async with Store.open(cfg.state_db) as store:
        lv = await Libvirt.open(cfg.libvirt_uri)
        try:
            yield BackupContext(
                cfg, store, lv, Policy(Path("test"), domains=(name,), bandwidth=bandwidth)
            )
        finally:
            await lv.close()


def restore_matches(rec: BackupRecord, td: GuestDomain, tmp: Path) -> None:
    assert_restores(Path(rec.path or ""), [(d.disk, d.path) for d in rec.disks], td, tmp)


def own_checkpoints(td: GuestDomain) -> set[str]:
    return {
        c.getName() for c in td.dom.listAllCheckpoints() if c.getName().startswith("virtbackupd-")
    }


async def _wait_copying(ctx: BackupContext) -> None:
    for _ in range(400):
        running = await ctx.store.backups(status=BackupStatus.RUNNING)
        if running and any((ctx.config.runtime_dir / "jobs").glob("*/nbd.sock")):
            await asyncio.sleep(0.5)
            return
        await asyncio.sleep(0.05)
    raise AssertionError("backup never started copying")


async def test_cancelled_transfer_leaves_nothing_trusted(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    td = domains.create(qcow2_sizes=[32 * MiB])
    guest = GuestWriter(td)
    guest.write("vda", 0, 2 * MiB, 0x01)
    async with engine(config, td.name) as ctx:
        full = await backup_domain(ctx, td.name)
    guest.write("vda", 4 * MiB, 16 * MiB, 0x02)
    async with engine(config, td.name, bandwidth=2 * MiB) as ctx:
        task = asyncio.create_task(backup_domain(ctx, td.name))
        await _wait_copying(ctx)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        failed = (await ctx.store.backups())[-1]
        assert failed.status is BackupStatus.FAILED
        assert failed.error == "cancelled"
    assert own_checkpoints(td) == {full.checkpoint}, "the failed backup's checkpoint is gone"
    assert td.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE
    assert not list(Path(full.path or "").parent.glob("*.partial"))
    guest.write("vda", 30 * MiB, MiB, 0x03)
    async with engine(config, td.name) as ctx:
        nxt = await backup_domain(ctx, td.name)
    assert nxt.level is Level.INCREMENTAL
    assert nxt.parent == full.id, "built on the last complete backup"
    restore_matches(nxt, td, tmp_path)


async def test_job_ended_by_someone_else_fails_the_backup(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    td = domains.create(qcow2_sizes=[32 * MiB])
    GuestWriter(td).write("vda", 0, 16 * MiB, 0x05)
    async with engine(config, td.name, bandwidth=2 * MiB) as ctx:
        task = asyncio.create_task(backup_domain(ctx, td.name))
        await _wait_copying(ctx)
        td.dom.abortJob()  # another tool (or an operator) ends our job
        with pytest.raises(BackupFailedError):
            await task
        rec = (await ctx.store.backups())[-1]
        assert rec.status is BackupStatus.FAILED
    assert own_checkpoints(td) == set()
    async with engine(config, td.name) as ctx:
        again = await backup_domain(ctx, td.name)
    assert again.level is Level.FULL
    restore_matches(again, td, tmp_path)


async def test_second_backup_of_a_domain_is_refused_while_one_runs(
    domains: DomainFactory, config: Path
) -> None:
    td = domains.create(qcow2_sizes=[32 * MiB])
    GuestWriter(td).write("vda", 0, 8 * MiB, 0x06)
    async with engine(config, td.name, bandwidth=2 * MiB) as ctx:
        task = asyncio.create_task(backup_domain(ctx, td.name))
        await _wait_copying(ctx)
        async with engine(config, td.name) as ctx2:
            with pytest.raises(BackupBusyError, match="another backup of"):
                await backup_domain(ctx2, td.name)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_qemu_crash_makes_the_next_backup_full_on_its_own(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    td = domains.create(qcow2_sizes=[32 * MiB])
    guest = GuestWriter(td)
    guest.write("vda", 0, 2 * MiB, 0x07)
    async with engine(config, td.name) as ctx:
        await backup_domain(ctx, td.name)
        await backup_domain(ctx, td.name)
    # A checkpoint of another tool: it must survive our crash cleanup.
    td.dom.checkpointCreateXML(
        "<domaincheckpoint><name>nightly</name>"
        "<disks><disk name='vda' checkpoint='bitmap'/></disks></domaincheckpoint>",
        0,
    )
    guest.write("vda", 8 * MiB, MiB, 0x08)
    pid = int(Path(f"/run/libvirt/qemu/{td.name}.pid").read_text())
    os.kill(pid, signal.SIGKILL)  # a host crash, as QEMU sees it
    wait_until(lambda: not td.dom.isActive(), what="domain to stop")
    td.start()
    async with engine(config, td.name) as ctx:
        rec = await backup_domain(ctx, td.name)
        assert rec.level is Level.FULL
        manifest = (Path(rec.path or "") / "manifest.json").read_text()
        assert "inconsistent" in manifest
    assert own_checkpoints(td) == {rec.checkpoint}, "the broken checkpoints were deleted"
    assert "nightly" in {c.getName() for c in td.dom.listAllCheckpoints()}, "not ours: kept"
    restore_matches(rec, td, tmp_path)
    guest.write("vda", 20 * MiB, MiB, 0x09)
    async with engine(config, td.name) as ctx:
        nxt = await backup_domain(ctx, td.name)
    assert nxt.level is Level.INCREMENTAL
    restore_matches(nxt, td, tmp_path)
    td.shutdown_hard()  # QEMU writes its bitmaps to the image on close
    data = qemu_img_info(td.disk("vda").path)["format-specific"]["data"]
    bitmaps = {b["name"] for b in data.get("bitmaps", [])}
    own = {b for b in bitmaps if b.startswith("virtbackupd-")}
    assert own == {rec.checkpoint, nxt.checkpoint}, "our broken bitmaps left the image too"


async def test_another_tools_backup_job_is_reported_not_disturbed(
    domains: DomainFactory, config: Path
) -> None:
    td = domains.create(qcow2_sizes=[16 * MiB])
    sock = td.workdir / "other.sock"
    td.dom.backupBegin(
        f"<domainbackup mode='pull'><server transport='unix' socket='{sock}'/></domainbackup>",
        None,
        0,
    )
    try:
        async with engine(config, td.name) as ctx:
            with pytest.raises(BackupBusyError, match="did not start"):
                await backup_domain(ctx, td.name)
            assert await ctx.store.backups() == [], "nothing recorded, nothing half-made"
        assert td.dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE, "their job still runs"
        assert sock.exists()
    finally:
        td.dom.abortJob()


async def test_quiesce_without_guest_agent(domains: DomainFactory, config: Path) -> None:
    """`always` fails clearly and leaves nothing; `auto` proceeds unfrozen."""
    td = domains.create(qcow2_sizes=[16 * MiB])
    cfg = load_config(config)
    async with Store.open(cfg.state_db) as store:
        lv = await Libvirt.open(cfg.libvirt_uri)
        try:
            strict = Policy(Path("t"), domains=(td.name,), quiesce=Quiesce.ALWAYS)
            with pytest.raises(BackupFailedError, match="quiesce is 'always' but the guest agent"):
                await backup_domain(BackupContext(cfg, store, lv, strict), td.name)
            assert own_checkpoints(td) == set()
            assert (await store.backups())[-1].status is BackupStatus.FAILED
            relaxed = Policy(Path("t"), domains=(td.name,), quiesce=Quiesce.AUTO)
            with structlog.testing.capture_logs() as logs:
                rec = await backup_domain(BackupContext(cfg, store, lv, relaxed), td.name)
            assert rec.status is BackupStatus.COMPLETE
            # No agent channel: said once at info level, not warned on every backup.
            said = [(e["log_level"], e["event"]) for e in logs if "quiesce" in e["event"]]
            assert said == [("info", "no guest agent channel; backing up without quiesce")]
        finally:
            await lv.close()


async def test_killed_backup_process_is_cleaned_up_by_the_next_backup(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    """SIGKILL during the copy leaves a running libvirt job, a checkpoint, a
    partial folder and a 'running' record; the next backup cleans all of it
    and builds on the last complete backup."""
    td = domains.create(qcow2_sizes=[32 * MiB])
    guest = GuestWriter(td)
    guest.write("vda", 0, MiB, 0x0A)
    async with engine(config, td.name) as ctx:
        full = await backup_domain(ctx, td.name)
    guest.write("vda", 2 * MiB, 16 * MiB, 0x0B)
    (config.parent / "policies" / "slow.yaml").write_text(
        f"domains: [{td.name}]\nbandwidth: 2MiB\n"
    )
    proc = await spawn_cli(
        config,
        "backup",
        td.name,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    cfg = load_config(config)
    wait_until(lambda: any((cfg.runtime_dir / "jobs").glob("*/nbd.sock")), what="copy to start")
    await asyncio.sleep(1)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    assert td.dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE, "the orphaned job still runs"
    assert len(own_checkpoints(td)) == 2
    (config.parent / "policies" / "slow.yaml").unlink()
    async with engine(config, td.name) as ctx:
        nxt = await backup_domain(ctx, td.name)
        records = await ctx.store.backups()
    killed = records[1]
    assert killed.status is BackupStatus.FAILED
    assert "interrupted" in (killed.error or "")
    assert nxt.level is Level.INCREMENTAL
    assert nxt.parent == full.id
    assert own_checkpoints(td) == {full.checkpoint, nxt.checkpoint}
    assert not list(Path(full.path or "").parent.glob("*.partial"))
    restore_matches(nxt, td, tmp_path)
