"""File-level restore and filesystem checks (issue 14, items 2 and 4): a
domain whose disks carry real partition tables (GPT and MBR) and
filesystems (ext4, vfat, xfs, and ext4 in an LVM volume group), built on
the host; two backups of two versions of its files, mounted side by side,
read-only; `umount` leaves no mount, loop device or helper behind; the
domain still starts; `verify --filesystems` passes on clean backups and
names a filesystem whose superblock the guest damaged. The daemon's
scheduled filesystem check is in test_live_restore.py (it shares that
test's daemon and its minute)."""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed import guest_disks
from testbed.cli import run_cli
from testbed.domains import DomainFactory, GuestDomain
from testbed.tools import run
from virtbackupd.cli.main import main as cli


@pytest.fixture
def fs_domain(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> Iterator[tuple[GuestDomain, dict[str, Path]]]:
    td, raws = guest_disks.create_fs_domain(domains, tmp_path)
    (config.parent / "policies" / "p.yaml").write_text(
        f"domains: [{td.name}]\nretention: {{keep_last: 1}}\n"
    )
    yield td, raws
    # A failed test must not leave mounts, helpers or loop devices behind.
    for h in holds(config):
        for point, _ in sorted(mounts_below(Path(h["directory"])), reverse=True):
            run("umount", point, check=False)
        for dev in h["devices"]:
            run("losetup", "--detach", dev, check=False)
        if h["helper_pid"]:
            run("kill", str(h["helper_pid"]), check=False)


def mounts_below(top: Path) -> list[tuple[str, str]]:
    """(mount point, its per-mount options) of everything mounted below `top`."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        f = line.split()
        if f[4] == str(top) or f[4].startswith(f"{top}/"):
            out.append((f[4], f[5]))
    return out


def holds(config: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in (config.parent / "backups").glob("*/.holds/*.json")]


def test_mount_two_backups_read_only_and_umount_leaves_nothing(
    fs_domain: tuple[GuestDomain, dict[str, Path]],
    config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    td, raws = fs_domain
    first = run_cli(config, capsys, "backup", td.name)
    guest_disks.write_version(td, raws, 2)
    second = run_cli(config, capsys, "backup", td.name)
    assert second["level"] == "incremental"  # the mount reads through the chain

    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    m1.mkdir()
    m2.mkdir()
    got1 = run_cli(config, capsys, "mount", td.name, str(m1), "--backup", first["id"])
    got2 = run_cli(config, capsys, "mount", td.name, str(m2))
    assert got2["backup"] == second["id"]
    want_volumes = set(guest_disks.expected(1))
    for got in (got1, got2):
        assert {v["volume"] for v in got["mounted"]} == want_volumes, got
        assert {v["fstype"] for v in got["mounted"]} == {"ext4", "vfat", "xfs"}
    for mnt, version in ((m1, 1), (m2, 2)):
        for where, text in guest_disks.expected(version).items():
            assert (mnt / where / "hello.txt").read_text() == text, where
            assert (mnt / where / "big.bin").read_bytes()[:1] == bytes([version])
        assert mnt.stat().st_mode & 0o777 == 0o700  # guest uids are not this host's users
        for point, options in mounts_below(mnt):
            assert options.split(",")[0] == "ro", (point, options)
        for where in ("vda/part1", "vda/part2", "vda/part3", "vda/part4/guestvg/data"):
            with pytest.raises(OSError) as exc:
                (mnt / where / "new.txt").write_text("x")
            assert exc.value.errno == errno.EROFS, where

    # Held: status lists both mounts; prune (keep_last 1) keeps both backups.
    status = run_cli(config, capsys, "status")
    assert {h["mountpoint"] for h in status["holds"]} == {str(m1), str(m2)}
    pruned = run_cli(config, capsys, "prune", td.name)
    kept = {v["id"]: v for v in pruned[0]["backups"]}
    assert kept[first["id"]]["keep"] and "held: mounted on" in str(kept[first["id"]]), pruned
    assert {b["id"] for b in run_cli(config, capsys, "list", td.name)} == {
        first["id"],
        second["id"],
    }

    # The domain starts while its backups are mounted.
    td.start()
    assert td.is_running()
    td.shutdown_hard()

    recorded = holds(config)
    helpers = [h["helper_pid"] for h in recorded]
    devices = [d for h in recorded for d in h["devices"]]
    assert len(helpers) == 2 and devices
    for mnt in (m1, m2):
        out = run_cli(config, capsys, "umount", str(mnt))
        assert out["mountpoint"] == str(mnt)
        assert mounts_below(mnt) == [] and list(mnt.iterdir()) == []
    assert holds(config) == []
    for pid in helpers:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
        )
    runtime = Path(config.read_text().split("runtime_dir: ")[1].split()[0])
    # Loop devices are machine-wide: another process may have attached the
    # number we freed. Ours are the ones still backed by our exports.
    listed = run("losetup", "--list", "--noheadings", "--raw", "--output", "NAME,BACK-FILE")
    ours = [
        line.split(" ", 1)[0]
        for line in listed.splitlines()
        if line.split(" ", 1)[0] in devices and str(runtime) in line
    ]
    assert not ours, listed
    assert list((runtime / "mounts").iterdir()) == []
    assert status["holds"] and run_cli(config, capsys, "status")["holds"] == []

    # Refusals: an unknown mount point, a non-empty folder.
    capsys.readouterr()
    assert cli(["-c", str(config), "umount", str(m1)]) == 2
    assert "is not a virtbackup mount" in capsys.readouterr().err
    (m1 / "x").write_text("x")
    assert cli(["-c", str(config), "mount", td.name, str(m1)]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_verify_filesystems_names_a_damaged_superblock(
    fs_domain: tuple[GuestDomain, dict[str, Path]],
    config: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    td, raws = fs_domain
    clean = run_cli(config, capsys, "backup", td.name)
    found = run_cli(config, capsys, "verify", td.name, "--filesystems")
    fs = {f["volume"]: f for f in found[0]["filesystems"]}
    assert set(fs) == set(guest_disks.expected(1)), fs
    assert all(f["ok"] for f in fs.values()), fs
    assert {f["fstype"] for f in fs.values()} == {"ext4", "vfat", "xfs"}

    guest_disks.damage_superblock(td, raws)
    damaged = run_cli(config, capsys, "backup", td.name)
    capsys.readouterr()
    rc = cli(["-c", str(config), "verify", td.name, "--filesystems", "--backup", damaged["id"]])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert f"{damaged['id']}: FAILED" in out
    assert "vda/part1 (ext4): DAMAGED: e2fsck exit" in out, out
    assert "vda/part3 (xfs): ok" in out and "vdb/part5 (vfat): ok" in out
    # The image itself is what was backed up: its digests hold.
    assert "  vda: ok" in out
    assert (
        cli(["-c", str(config), "verify", td.name, "--backup", clean["id"], "--filesystems"]) == 0
    )
    runtime = Path(config.read_text().split("runtime_dir: ")[1].split()[0])
    assert not list((runtime / "fscheck").iterdir())
