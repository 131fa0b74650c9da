"""Restore onto a block device (issue 14, item 3): a backup's disk written
straight onto a loop device that held other data, byte-identical to the
reference, the bytes beyond the disk left alone; refused on a smaller
device, on a device with a mounted file system, on a disk of a running
domain, and on what is not a block device."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from testbed.cli import run_cli
from testbed.domains import PREFIX, DomainFactory, MiB, remove_domain
from testbed.guest import GuestWriter
from testbed.tools import run
from virtbackupd.cli.main import main as cli


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for dev in made:
        subprocess.run(["umount", dev], capture_output=True)
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def loop_device(loops: list[str], path: Path, size: int, fill: int) -> str:
    path.write_bytes(bytes([fill]) * size)
    dev = run("losetup", "--find", "--show", path).strip()
    loops.append(dev)
    return dev


def refused(config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli(["-c", str(config), "restore", *args])
    return rc, capsys.readouterr().err


def test_restore_onto_a_block_device(
    domains: DomainFactory,
    config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    loops: list[str],
    libvirt_conn: libvirt.virConnect,
) -> None:
    td = domains.create(qcow2_sizes=[16 * MiB])
    (config.parent / "policies" / "p.yaml").write_text(f"domains: [{td.name}]\n")
    guest = GuestWriter(td)
    guest.write("vda", 0, 3 * MiB, 0x31)
    run_cli(config, capsys, "backup", td.name)
    guest.write("vda", 8 * MiB, MiB, 0x32)
    guest.zero("vda", MiB, 512 * 1024)
    inc = run_cli(config, capsys, "backup", td.name)
    assert inc["level"] == "incremental"
    ref = td.disk("vda").reference
    assert ref is not None

    # Larger than the disk and full of other data: the disk's zeroes are
    # written as zeroes; what lies beyond the disk stays as it was.
    big = loop_device(loops, tmp_path / "big.img", 20 * MiB, 0xAA)
    out = run_cli(config, capsys, "restore", td.name, "--disk", "vda", "--to-device", big)
    assert out["backup"] == inc["id"] and out["damage"] == []
    with Path(big).open("rb") as f:
        written = f.read(20 * MiB)
    assert written[: 16 * MiB] == ref.read_bytes()
    assert written[16 * MiB :] == bytes([0xAA]) * (4 * MiB)

    small = loop_device(loops, tmp_path / "small.img", 8 * MiB, 0)
    rc, err = refused(config, capsys, td.name, "--disk", "vda", "--to-device", small)
    assert rc == 1 and "smaller than disk vda" in err and "nothing written" in err, err

    mounted = loop_device(loops, tmp_path / "fs.img", 16 * MiB, 0)
    run("mkfs.ext4", "-q", mounted)
    (tmp_path / "mnt").mkdir()
    run("mount", mounted, tmp_path / "mnt")
    rc, err = refused(config, capsys, td.name, "--disk", "vda", "--to-device", mounted)
    assert rc == 1 and f"mounted on {tmp_path / 'mnt'}" in err, err
    assert (tmp_path / "mnt" / "lost+found").is_dir()  # untouched

    # A disk of a running domain (a block disk of a second, throw-away domain).
    used = loop_device(loops, tmp_path / "used.img", 16 * MiB, 0)
    name = f"{PREFIX}{os.getpid()}-blockdisk"
    xml = (
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
        f"<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
        f"<source dev='{used}'/><target dev='vda' bus='virtio'/></disk>"
        "<memballoon model='none'/></devices></domain>"
    )
    dom = libvirt_conn.defineXML(xml)
    try:
        dom.create()
        rc, err = refused(config, capsys, td.name, "--disk", "vda", "--to-device", used)
        assert rc == 1 and f"is a disk of running domain {name}" in err, err
    finally:
        remove_domain(libvirt_conn, name)

    rc, err = refused(config, capsys, td.name, "--disk", "vda", "--to-device", str(ref))
    assert rc == 2 and "is not a block device" in err, err
    rc, err = refused(config, capsys, td.name, "--to-device", big)
    assert rc == 2 and "--disk TARGET" in err, err
