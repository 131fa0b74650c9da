"""Locks shared by every process on the host: one backup per domain, and
at most max_concurrent_backups backups at once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from virtbackupd.engine.locks import backup_owner_alive, backup_slot, domain_lock
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


def test_a_backup_owner_is_alive_while_its_process_runs_and_dead_once_it_died(
    tmp_path: Path,
) -> None:
    """`cancel`, `status` and `list` tell a running backup from one whose
    process died: a real process holds the domain's lock as a backup does,
    then is SIGKILLed; a lock naming a pid that now belongs to another
    process (pid reuse: another start time), or another activity, or no
    lock file at all (a reboot emptied the runtime dir) is a dead owner."""
    assert not backup_owner_alive(tmp_path, "u1")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time; from virtbackupd.engine.locks import domain_lock;"
            "from pathlib import Path;"
            "cm = domain_lock(Path(sys.argv[1]), 'u1', 'web', 'backup'); cm.__enter__();"
            "print('held', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        assert backup_owner_alive(tmp_path, "u1")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    assert not backup_owner_alive(tmp_path, "u1")

    lock = tmp_path / "locks" / "u1.lock"
    pid, what, started = lock.read_text().split()
    assert started.isdigit()
    assert (int(pid), what) == (holder.pid, "backup")
    me = os.getpid()
    mine = Path(f"/proc/{me}/stat").read_text().rsplit(")", 1)[1].split()[19]
    lock.write_text(f"{me} backup {mine}\n")
    assert backup_owner_alive(tmp_path, "u1")  # a live process that took the lock
    lock.write_text(f"{me} backup {int(mine) + 1}\n")
    assert not backup_owner_alive(tmp_path, "u1")  # the pid runs, but another process
    lock.write_text(f"{me} verify {mine}\n")
    assert not backup_owner_alive(tmp_path, "u1")  # a later job took the lock
    lock.write_text("")
    assert backup_owner_alive(tmp_path, "u1")  # being written: never call it dead
