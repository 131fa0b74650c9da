"""`policy check` against the domains' disks (issue 24 item 6): a governed
domain none of whose disks its policy would back up (here its only disk is
raw under `raw: skip`) is an error, exit 2, naming the file, the domain
and the disk's reason: every scheduled backup of it would fail. The same
domain under `raw: full` passes."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.domains import DomainFactory, MiB
from virtbackupd.cli.main import main as cli


def test_policy_check_refuses_a_domain_whose_every_disk_is_skipped(
    domains: DomainFactory, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    td = domains.create(qcow2_sizes=[], raw_size=4 * MiB, start=False)
    policy = config.parent / "policies" / "p.yaml"
    policy.write_text(f"domains: [{td.name}]\ndisks: {{raw: skip}}\n")
    capsys.readouterr()
    assert cli(["-c", str(config), "policy", "check"]) == 2
    err = capsys.readouterr().err
    assert f"{policy}: domain '{td.name}' would have nothing backed up" in err, err
    assert "vda: raw disk" in err and "raw: skip" in err, err

    policy.write_text(f"domains: [{td.name}]\ndisks: {{raw: full}}\n")
    assert cli(["-c", str(config), "policy", "check"]) == 0, capsys.readouterr().err
