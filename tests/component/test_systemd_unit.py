"""The systemd unit passes `systemd-analyze verify`, and its exposure
(`systemd-analyze security`) stays as low as the job allows."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "virtbackupd.service"
#: 2.4 with the relaxations docs/operations.md explains (root with three
#: capabilities, block devices, network for remote NBD). Raise only with a
#: reason written there.
MAX_EXPOSURE = 2.4


def _installed_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's virtbackupd
    (verify checks that the command exists)."""
    unit = tmp_path / "virtbackupd.service"
    exe = REPO / ".venv" / "bin" / "virtbackupd"
    unit.write_text(UNIT.read_text().replace("/usr/bin/virtbackupd", str(exe)))
    return unit


def test_unit_verifies(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(_installed_copy(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr


def test_unit_exposure_is_low(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(_installed_copy(tmp_path))],
        capture_output=True,
        text=True,
        check=True,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d)", proc.stdout + proc.stderr)
    assert m, proc.stdout
    exposure = float(m.group(1))
    print(f"systemd-analyze security exposure: {exposure}")
    assert exposure <= MAX_EXPOSURE


def test_unit_promises() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "Restart=on-failure",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "After=libvirtd.service virtqemud.service",
    ):
        assert line in text
    tmpfiles = (REPO / "systemd" / "virtbackupd.tmpfiles.conf").read_text()
    assert "d /run/virtbackupd 0711 root root -" in tmpfiles


def test_unit_and_process_agree_on_yielding_to_guests() -> None:
    """Backups yield to the VMs: the unit's priority settings are the ones
    the daemon applies itself (`priority: low`, the default), and the
    scratch folder is on disk, reachable by QEMU, in the unit and tmpfiles."""
    from virtbackupd.adapters.priority import LOW
    from virtbackupd.config.daemon import DaemonConfig

    text = UNIT.read_text()
    assert f"Nice={LOW.nice}\n" in text
    assert f"IOSchedulingClass={LOW.io_class}\n" in text
    assert f"IOSchedulingPriority={LOW.io_level}\n" in text
    assert "StateDirectoryMode=0711" in text
    tmpfiles = (REPO / "systemd" / "virtbackupd.tmpfiles.conf").read_text()
    scratch = DaemonConfig(Path("x")).scratch_dir
    assert scratch.is_relative_to("/var/lib/virtbackupd")  # on disk, not /run
    assert f"d {scratch} 0711 root root -" in tmpfiles
    assert "d /run/virtbackupd/hook 0700 root root -" in tmpfiles
