"""What a live restore opens in the repository for QEMU's user, and that it
is taken back: folders get o+x (traversal, not listing) for the time of the
move, the chain's images go back to root 0600 when the hold is released,
and a folder above the repository that others cannot traverse is refused
by name before anything is made. No libvirt: the repository is built with
the product's own code (testbed.repo_builder)."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from testbed.repo_builder import BuiltDomain, MiB
from virtbackupd.adapters.repository import Hold, HoldKind, Repository
from virtbackupd.adapters.store import Store
from virtbackupd.engine.restore import live_access as live_restore
from virtbackupd.errors import RestoreError


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A folder every user may traverse down to (pytest's own are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="vb-live-", dir="/var/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


async def test_folders_are_opened_for_the_move_and_closed_after(open_tmp: Path) -> None:
    tmp_path = open_tmp
    b = BuiltDomain(tmp_path, {"vda": 4 * MiB})
    async with Store.open(b.state_db) as store:
        for i in range(2):
            b.write("vda", i * MiB, 64 * 1024, 0x40 + i)
            await b.backup(store)
    repo, folder = b.repo, b.folder(b.ids[1])
    b.repo.root.chmod(0o700)
    chain = [b.repo.root, folder.parent, b.folder(b.ids[0]), folder]
    opened = live_restore.open_for_qemu(repo, folder)
    assert set(opened) == set(chain)
    assert all(mode(p) & 0o011 == 0o011 for p in chain)
    images = [f for p in chain[2:] for f in p.glob("*.qcow2")]
    for image in images:  # what libvirt does when the domain starts
        os.chown(image, 64055, 64055)
    hold = Hold(
        "live-x",
        HoldKind.LIVE_RESTORE,
        b.uuid,
        b.ids[1],
        datetime.now(UTC),
        "live",
        new_domain="u",
        disks=("vda",),
        directory=str(tmp_path),
        opened=tuple(map(str, opened)),
    )
    repo.add_hold(hold)
    # A second live restore of the older backup still needs part of the chain.
    other = Hold(
        "live-y",
        HoldKind.LIVE_RESTORE,
        b.uuid,
        b.ids[0],
        datetime.now(UTC),
        "live",
        new_domain="v",
        disks=("vda",),
        directory=str(tmp_path),
        opened=(),
    )
    repo.add_hold(other)
    live_restore.release(repo, hold)
    assert mode(folder) == 0o700 and mode(b.repo.root) & 0o011 == 0o011
    assert (folder / "vda.qcow2").stat().st_uid == 0
    assert b.folder(b.ids[0]).stat().st_mode & 0o011  # still read by live-y
    assert (b.folder(b.ids[0]) / "vda.qcow2").stat().st_uid == 64055
    live_restore.release(repo, other)
    assert [mode(p) for p in chain] == [0o700] * 4
    for image in images:
        assert (image.stat().st_uid, mode(image)) == (0, 0o600)
    assert repo.holds() == []


def test_a_closed_folder_above_the_repository_is_refused(open_tmp: Path) -> None:
    tmp_path = open_tmp
    above = tmp_path / "private"
    above.mkdir(mode=0o700)
    repo = Repository(above / "backups")
    (repo.root / "dom" / "b1").mkdir(parents=True)
    with pytest.raises(RestoreError, match=f"{above} .*closed to other users .*chmod o\\+x"):
        live_restore.open_for_qemu(repo, repo.root / "dom" / "b1")
