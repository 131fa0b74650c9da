"""`virtbackup status` with neither the daemon nor libvirt to ask (the
config's libvirt_uri names a socket that does not exist, no daemon.json):
it says libvirt cannot be reached and what it therefore does not know,
and never calls a domain "no longer defined" for it; a policy file that
does not load is named with its line, and so is the domain it may govern."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from testbed.cli import run_cli
from testbed.repo_builder import BuiltDomain, MiB
from virtbackupd.adapters.store import Store
from virtbackupd.cli.main import main as cli
from virtbackupd.cli.status import Reach, render
from virtbackupd.daemon.status_file import STATUS_FILE, DaemonStatus, probe_status, write_status

NO_LIBVIRT = "qemu+unix:///system?socket=/nonexistent/virtbackupd-test/libvirt-sock"


async def one_backup(b: BuiltDomain) -> None:
    async with Store.open(b.state_db) as store:
        b.write("vda", 0, 64 * 1024, 0x31)
        await b.backup(store)


def test_status_says_libvirt_is_unreachable_and_names_a_broken_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    b = BuiltDomain(tmp_path, {"vda": MiB})
    asyncio.run(one_backup(b))
    (tmp_path / "policies").mkdir()
    broken = tmp_path / "policies" / "p.yaml"
    broken.write_text(f"domains: ['{b.name}']\nschedule: {{full: 'not cron'}}\n")
    config = tmp_path / "virtbackupd.yaml"
    config.write_text(
        f"state_dir: {b.state_db.parent}\nbackup_root: {b.root}\nruntime_dir: {b.runtime}\n"
        f"scratch_dir: {tmp_path / 'scratch'}\npolicy_dirs: [policies]\n"
        f"libvirt_uri: '{NO_LIBVIRT}'\n"
    )

    status = run_cli(config, capsys, "status")
    assert status["daemon"] is None
    assert status["libvirt"]["reachable"] is False
    assert status["libvirt"]["error"]
    row = next(r for r in status["domains"] if r["domain"] == b.name)
    assert row["defined"] is None, "not known, libvirt was not asked"
    assert f"{broken}:2:" in row["policy_on_disk"]
    assert f"{broken}:2:" in status["policy_files"][str(broken)]

    capsys.readouterr()
    assert cli(["-c", str(config), "status"]) == 0
    text = capsys.readouterr().out
    assert "no longer defined" not in text, text
    assert "daemon: not running" in text, text
    assert f"libvirt: {NO_LIBVIRT} NOT reachable" in text, text
    assert "which domains are defined, and which are unmanaged, is not known" in text, text
    assert f"policy file {broken}: rejected: {broken}:2:" in text, text
    assert "none governs it now" not in text, text


def test_a_status_file_that_cannot_be_read_is_said_not_taken_for_no_daemon(
    tmp_path: Path,
) -> None:
    """No file, or one a dead process left: no daemon runs. A file that is
    there and cannot be read: whether a daemon runs is not known, and
    `status` says so instead of "not running"."""
    assert probe_status(tmp_path) == (None, None)
    dead = DaemonStatus(2**22 + 1, "t", "qemu:///system", True, {})  # above pid_max
    write_status(tmp_path, dead)
    assert probe_status(tmp_path) == (None, None)
    (tmp_path / STATUS_FILE).write_text("{not json")
    daemon, why = probe_status(tmp_path)
    assert daemon is None and why is not None and str(tmp_path / STATUS_FILE) in why
    text = render(None, [], [], [], as_json=False, reach=Reach("qemu:///system", None, why))
    assert text.startswith(f"daemon: NOT known: {tmp_path / STATUS_FILE}"), text
    assert "not running" not in text, text
