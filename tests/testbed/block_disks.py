"""Raw block-device disks for test-bed domains: loop devices over zeroed
files, released when the test ends (loop numbers are machine-wide)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

from testbed.domains import Disk, GuestDomain
from testbed.tools import run


@contextlib.contextmanager
def loop_devices() -> Iterator[list[str]]:
    """A list to append loop devices to; each is detached afterwards."""
    made: list[str] = []
    try:
        yield made
    finally:
        for dev in made:
            subprocess.run(["losetup", "-d", dev], capture_output=True)


def add_block_disk(
    td: GuestDomain,
    loops: list[str],
    size: int,
    target: str = "vdc",
    *,
    discard: bool = False,
    reference: bool = True,
) -> Disk:
    """Give the (shut-off) domain a raw block-device disk `target`: a loop
    device over a zeroed file; with `reference`, a zeroed reference image
    beside it (what the disk holds until a test writes to both)."""
    backing = td.workdir / f"{target}.loop"
    with backing.open("wb") as f:
        f.truncate(size)
    dev = run("losetup", "--find", "--show", backing).strip()
    loops.append(dev)
    unmap = " discard='unmap'" if discard else ""
    xml = td.dom.XMLDesc(0).replace(
        "</devices>",
        f"<disk type='block' device='disk'><driver name='qemu' type='raw'{unmap}/>"
        f"<source dev='{dev}'/><target dev='{target}' bus='virtio'/></disk></devices>",
    )
    td.dom = td.conn.defineXML(xml)
    ref = td.workdir / f"{target}.reference.raw" if reference else None
    if ref is not None:
        with ref.open("wb") as f:
            f.truncate(size)
    disk = Disk(target, Path(dev), "raw", size, reference=ref)
    td.disks.append(disk)
    return disk
