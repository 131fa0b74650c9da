"""A job's scratch folder is removed only once libvirt has given its files
their labels back (their `trusted.libvirt.security.*` attributes, which
libvirt's remember_owner sets while QEMU may use a file, are gone): libvirt
9.0 says the job ended before it restores the last disk's scratch file, and
a file removed before that puts "unable to stat" / "Unable to restore
security label" into libvirtd's log. Real files and extended attributes."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from virtbackupd.engine import scratch

DAC = scratch.LIBVIRT_LABEL_XATTR + "dac"


def labelled_folder(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "vda.scratch").write_bytes(b"")
    held = folder / "vdb.scratch"
    held.write_bytes(b"")
    try:
        os.setxattr(held, DAC, b"+0:+0")
    except OSError as exc:  # not root, or a file system without trusted xattrs
        pytest.skip(f"cannot set {DAC}: {exc}")
    return folder, held


async def test_the_folder_stays_until_libvirt_gives_the_label_back(tmp_path: Path) -> None:
    folder, held = labelled_folder(tmp_path)
    removal = asyncio.create_task(scratch.release(folder, timeout=60))
    await asyncio.sleep(0.5)
    assert not removal.done() and held.exists()
    os.removexattr(held, DAC)  # what libvirt does when it restores the owner
    await asyncio.wait_for(removal, 10)
    assert not folder.exists()


async def test_a_label_never_given_back_is_waited_for_a_bounded_time(tmp_path: Path) -> None:
    folder, _ = labelled_folder(tmp_path)
    await asyncio.wait_for(scratch.release(folder, timeout=0.3), 10)
    assert not folder.exists()


async def test_nothing_labelled_or_nothing_there_is_removed_at_once(tmp_path: Path) -> None:
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "vda.scratch").write_bytes(b"")
    await asyncio.wait_for(scratch.release(folder, timeout=60), 1)
    assert not folder.exists()
    await asyncio.wait_for(scratch.release(tmp_path / "never-made", timeout=60), 1)


async def test_a_cancelled_wait_still_removes_the_folder(tmp_path: Path) -> None:
    folder, _ = labelled_folder(tmp_path)
    removal = asyncio.create_task(scratch.release(folder, timeout=60))
    await asyncio.sleep(0.1)
    removal.cancel()
    with pytest.raises(asyncio.CancelledError):
        await removal
    assert not folder.exists()
