"""A daemon lock file that is not a regular file (hostile-tester finding:
``<runtime_dir>/daemon.lock`` made a symbolic link, a FIFO or a folder gave
a Python traceback: ELOOP, EINVAL from ftruncate, IsADirectoryError). The
daemon refuses to start in one line naming the file and what to do, exit
code 2, and leaves what is there as it was. The real daemon entry point in
this process, on a config using libvirt's test:///default driver (the
lock is taken before libvirt is touched)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from virtbackupd.daemon.main import main
from virtbackupd.daemon.single import LOCK_FILE


def _link(lock: Path) -> None:
    victim = lock.parent / "victim"
    victim.write_text("keep\n")
    victim.chmod(0o600)
    lock.symlink_to(victim)


def _fifo(lock: Path) -> None:
    os.mkfifo(lock, 0o600)


def _folder(lock: Path) -> None:
    lock.mkdir(mode=0o700)


@pytest.mark.parametrize(
    ("plant", "what"),
    [(_link, "is a symbolic link"), (_fifo, "is a FIFO"), (_folder, "is a folder")],
    ids=["link", "fifo", "folder"],
)
def test_a_lock_that_is_not_a_regular_file_is_refused_in_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    plant: Callable[[Path], None],
    what: str,
) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o711)
    lock = runtime / LOCK_FILE
    plant(lock)
    before = lock.lstat()
    config = tmp_path / "vb.yaml"
    config.write_text(
        f"state_dir: {tmp_path / 'state'}\nbackup_root: {tmp_path / 'backups'}\n"
        f"runtime_dir: {runtime}\nlibvirt_uri: 'test:///default'\n"
    )
    capsys.readouterr()
    rc = main(["-c", str(config)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"{lock}: {what}" in lines[0]
    assert "remove it" in lines[0]
    after = lock.lstat()
    assert (after.st_ino, after.st_mode, after.st_uid) == (
        before.st_ino,
        before.st_mode,
        before.st_uid,
    )
    if stat.S_ISLNK(before.st_mode):
        victim = runtime / "victim"
        assert victim.read_text() == "keep\n"
        assert stat.S_IMODE(victim.stat().st_mode) == 0o600
