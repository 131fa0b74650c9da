"""The daemon lock (virtbackupd.daemon.single): one holder at a time, the
holder's pid named to whoever is refused, free again once the holder's
descriptor is closed (as the kernel closes it when the process dies)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from virtbackupd.daemon.single import LOCK_FILE, hold_daemon_lock
from virtbackupd.errors import DaemonRunningError


def test_the_lock_is_held_once_and_names_its_holder(tmp_path: Path) -> None:
    fd = hold_daemon_lock(tmp_path)
    try:
        with pytest.raises(DaemonRunningError) as refused:
            hold_daemon_lock(tmp_path)
        assert refused.value.pid == os.getpid()
        assert f"pid {os.getpid()}" in str(refused.value)
        assert str(tmp_path / LOCK_FILE) in str(refused.value)
    finally:
        os.close(fd)
    again = hold_daemon_lock(tmp_path)
    os.close(again)
    # The file stays: removing it would let two daemons lock two files.
    assert (tmp_path / LOCK_FILE).exists()


def test_a_lock_file_without_a_pid_yet_is_still_refused(tmp_path: Path) -> None:
    fd = hold_daemon_lock(tmp_path)
    try:
        os.ftruncate(fd, 0)  # the holder has locked and not yet written its pid
        with pytest.raises(DaemonRunningError) as refused:
            hold_daemon_lock(tmp_path)
        assert refused.value.pid is None
    finally:
        os.close(fd)
