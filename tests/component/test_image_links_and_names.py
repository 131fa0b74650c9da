"""A backup's image files are regular files in its own folder, and the
backing names inside them are checked before any QEMU tool opens the chain
(issue 23, found by a hostile tester on main): `virtbackup mount` handed
the chain to qemu-storage-daemon unchecked (a host file system shown as
the guest's, a FIFO hung the command and left its helper behind), and a
top image replaced by a symbolic link to a qcow2 outside the repository
was verified "ok" and mounted. Refused in one line naming the file, with
nothing left behind (no helper process, mount, hold or loop device)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from testbed.cli import cli_in_thread
from testbed.repo_builder import BuiltDomain, write_cli_config
from testbed.tools import run
from virtbackupd.adapters.store import Store

MiB = 1024 * 1024


async def _built(tmp_path: Path) -> tuple[BuiltDomain, Path]:
    b = BuiltDomain(tmp_path, {"vda": 8 * MiB})
    async with Store.open(b.state_db) as store:
        b.write("vda", 0, MiB, 0x11)
        await b.backup(store)
        b.write("vda", MiB, MiB, 0x22)
        await b.backup(store)
    config = write_cli_config(b, tmp_path)
    return b, config


def _loop_devices() -> str:
    return subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout


def _helpers(under: Path) -> list[str]:
    found = subprocess.run(["pgrep", "-af", "qemu-storage-daemon"], capture_output=True, text=True)
    return [line for line in found.stdout.splitlines() if str(under) in line]


def _nothing_left(b: BuiltDomain, mountpoint: Path, loops_before: str) -> None:
    assert not os.path.ismount(mountpoint) and not any(mountpoint.iterdir())
    mounts = b.runtime / "mounts"
    assert not mounts.exists() or not any(mounts.iterdir()), list(mounts.iterdir())
    holds = b.folder(b.ids[0]).parent / ".holds"
    assert not holds.exists() or not any(holds.iterdir()), list(holds.iterdir())
    assert _loop_devices() == loops_before
    assert not _helpers(b.root), _helpers(b.root)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("target", ["host file", "fifo"])
async def test_mount_refuses_a_backing_name_out_of_the_chain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str
) -> None:
    b, config = await _built(tmp_path)
    if target == "fifo":
        name = str(tmp_path / "fifo")
        os.mkfifo(name)
    else:
        name = str(tmp_path / "fs.raw")
        run("qemu-img", "create", "-q", "-f", "raw", name, str(8 * MiB))
    image = b.image(b.ids[1], "vda")
    run("qemu-img", "rebase", "-q", "-u", "-b", name, "-F", "raw", image)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    loops = _loop_devices()
    rc, text = (await cli_in_thread(capsys, config, "mount", b.name, str(mountpoint))).joined()
    assert rc == 1, text
    assert f"{image}: backing file name {name!r}" in text, text
    assert len(text.strip().splitlines()) == 1, text
    _nothing_left(b, mountpoint, loops)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("command", ["verify", "restore", "mount", "prune"])
async def test_a_top_image_that_is_a_link_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """The newest backup's vda.qcow2 replaced by a link to a copy of
    itself outside the repository (same content, so checks of content
    alone pass)."""
    b, config = await _built(tmp_path)
    image = b.image(b.ids[1], "vda")
    outside = tmp_path / "outside.qcow2"
    run("qemu-img", "convert", "-q", "-O", "qcow2", image, outside)
    image.unlink()
    image.symlink_to(outside)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    to = tmp_path / "r"
    loops = _loop_devices()
    args = {
        "verify": ["verify", b.name, "--backup", b.ids[1]],
        "restore": ["restore", b.name, "--backup", b.ids[1], "--to", str(to)],
        "mount": ["mount", b.name, str(mountpoint), "--backup", b.ids[1]],
        "prune": ["prune", b.name],
    }[command]
    rc, text = (await cli_in_thread(capsys, config, *args)).joined()
    assert rc in (1, 2), text
    assert f"{image}: is a symbolic link; a backup's images are never followed" in text, text
    assert image.is_symlink() and outside.is_file()
    assert not to.exists() or not any(to.iterdir())
    _nothing_left(b, mountpoint, loops)
