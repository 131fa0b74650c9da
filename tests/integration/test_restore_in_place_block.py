"""`restore --in-place` of a domain with a block-device disk (issue 24,
item 5): the device is written as `--to-device` writes it, the file disk
is replaced as before; both equal the state backed up (qemu-img compare
against the oracle at that instant)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.block_disks import add_block_disk, loop_devices
from testbed.cli import run_cli
from testbed.domains import DomainFactory, MiB
from testbed.guest import GuestWriter
from testbed.tools import run


@pytest.fixture
def loops() -> Iterator[list[str]]:
    with loop_devices() as made:
        yield made


def test_in_place_writes_a_block_device_disk(
    domains: DomainFactory,
    config: Path,
    capsys: pytest.CaptureFixture[str],
    loops: list[str],
) -> None:
    td = domains.create(qcow2_sizes=[8 * MiB], start=False)
    vdc = add_block_disk(td, loops, 4 * MiB)
    td.start()
    guest = GuestWriter(td)
    guest.write("vda", 0, MiB, 0x11)
    guest.write("vdc", MiB, MiB, 0x22)
    backup = run_cli(config, capsys, "backup", td.name)
    backed_up = {}
    for d in td.data_disks:
        assert d.reference is not None
        backed_up[d.target] = td.workdir / f"{d.target}.at-backup.raw"
        shutil.copyfile(d.reference, backed_up[d.target])
    # Written after the backup: the restore must take it back on both disks.
    guest.write("vda", 2 * MiB, MiB, 0x33)
    guest.write("vdc", 0, 2 * MiB, 0x44)
    td.shutdown_hard()

    out = run_cli(config, capsys, "restore", td.name, "--in-place")
    assert out["backup"] == backup["id"]
    assert sorted(d["disk"] for d in out["disks"]) == ["vda", "vdc"]
    vda = td.disk("vda")
    run("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", vda.path, backed_up["vda"])
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", vdc.path, backed_up["vdc"])
    td.start()  # the domain runs on its restored disks
