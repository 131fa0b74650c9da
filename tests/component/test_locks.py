"""Locks shared by every process on the host: one backup per domain, and
at most max_concurrent_backups backups at once."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from virtbackupd.engine.locks import backup_slot, domain_lock
from virtbackupd.errors import BackupBusyError


def test_domain_lock_is_exclusive_across_processes(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time; sys.path.insert(0, sys.argv[1]);"
            "from virtbackupd.engine.locks import domain_lock;"
            "from pathlib import Path;"
            "cm = domain_lock(Path(sys.argv[2]), 'u1', 'web'); cm.__enter__();"
            "print('held', flush=True); time.sleep(30)",
            "daemon",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(
                BackupBusyError, match=f"another backup of web is running \\(process {holder.pid}"
            ),
            domain_lock(tmp_path, "u1", "web"),
        ):
            pass
        with domain_lock(tmp_path, "u2", "db"):
            pass  # another domain is free
    finally:
        holder.kill()
        holder.communicate()
    with domain_lock(tmp_path, "u1", "web"):
        pass  # released by the kernel when its holder died


async def test_backup_slots_bound_concurrency(tmp_path: Path) -> None:
    order: list[str] = []
    waits: list[str] = []

    async def job(name: str, hold: float) -> None:
        async with backup_slot(tmp_path, 1, lambda: waits.append(name)):
            order.append(f"{name}+")
            await asyncio.sleep(hold)
            order.append(f"{name}-")

    await asyncio.gather(job("a", 0.6), job("b", 0.1))
    assert order == ["a+", "a-", "b+", "b-"]
    assert waits == ["b"]
