"""The scratch reservation of online backups against real qemu-img and
qemu-io, on a small tmpfs: once reserved, a scratch image takes every write
copy-before-write can make (the whole disk, data and zeroes) on a file
system with no byte free, and reads what it was not given from its backing
(the disk, as libvirt attaches it); a reservation that cannot fit is
refused with the numbers and leaves no file."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.tools import run
from virtbackupd.adapters import qemu_img
from virtbackupd.engine import scratch
from virtbackupd.engine.scratch import ScratchFile
from virtbackupd.errors import ScratchSpaceError

MiB = 1 << 20


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "scratch"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def _fill(folder: Path) -> None:
    """Take every byte left, as another tenant of the file system might."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\xff" * (64 * 1024))
    except OSError:
        pass
    finally:
        os.close(fd)


async def test_a_reserved_scratch_image_never_needs_more_space(
    tmp_path: Path, small_fs: Path
) -> None:
    disk = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", disk, str(32 * MiB))
    run("qemu-io", "-c", f"write -P 0xaa 0 {24 * MiB}", disk)
    path = small_fs / "vda.scratch"
    reserved = await scratch.reserve(
        {"vda": ScratchFile("vda", path, 32 * MiB)}, small_fs, "web01", None
    )
    assert reserved == await qemu_img.measure_preallocated(32 * MiB, scratch.SCRATCH_OPTIONS)
    assert path.stat().st_blocks * 512 >= 32 * MiB  # the space is the file's now
    _fill(small_fs)
    assert scratch.measure(small_fs).free == 0
    opts = f"driver=qcow2,file.filename={path},backing.driver=qcow2,backing.file.filename={disk}"
    # What copy-before-write writes: old data of every cluster, and zeroes.
    out = run(
        "qemu-io",
        "--image-opts",
        "-c",
        f"read -P 0xaa 0 {24 * MiB}",  # untouched blocks read through to the disk
        "-c",
        f"write -P 0xbb {4 * MiB} {20 * MiB}",
        "-c",
        f"write -z {24 * MiB} {4 * MiB}",
        "-c",
        f"write -P 0xcc {28 * MiB} {4 * MiB}",
        "-c",
        f"read -P 0xaa 0 {4 * MiB}",
        opts,
    )
    assert "failed" not in out and out.count("wrote") == 3, out
    assert "No space" not in run("qemu-img", "check", path)


async def test_a_reservation_that_does_not_fit_is_refused_and_leaves_nothing(
    small_fs: Path,
) -> None:
    files = {
        "vda": ScratchFile("vda", small_fs / "vda.scratch", 16 * MiB),
        "vdb": ScratchFile("vdb", small_fs / "vdb.scratch", 1024 * MiB),
    }
    with pytest.raises(ScratchSpaceError) as err:
        await scratch.reserve(files, small_fs, "web01", None)
    assert "reserves 1041 MiB" in str(err.value)
    assert f"40 MiB free of 40 MiB in {small_fs}" in str(err.value)
    assert list(small_fs.iterdir()) == []


async def test_a_reservation_taken_from_under_it_is_refused_and_leaves_nothing(
    small_fs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Room seen, then taken by someone else before the image is created:
    the creation itself fails, before any backup began."""
    seen = scratch.measure(small_fs)
    monkeypatch.setattr(scratch, "measure", lambda folder: seen)
    _fill(small_fs)
    path = small_fs / "vda.scratch"
    with pytest.raises(ScratchSpaceError, match=r"cannot reserve 33 MiB for disk vda of web01"):
        await scratch.reserve({"vda": ScratchFile("vda", path, 32 * MiB)}, small_fs, "web01", None)
    assert not path.exists()
