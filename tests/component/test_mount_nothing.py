"""`mount` of a backup with nothing mountable (issue 24 item 6): it fails
(exit 1, docs/cli.md) with the reason for each volume, and leaves no hold,
mount, loop device or helper behind: a hold on nothing to look at would
keep prune off the chain until someone thought of `umount`."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.repo_builder import BuiltDomain, MiB
from virtbackupd.adapters import kernel_mounts
from virtbackupd.adapters.store import Store
from virtbackupd.engine.guest_view import mount_backup, release_mount
from virtbackupd.errors import InputError, VirtBackupError


async def test_mount_with_nothing_mountable_fails_and_holds_nothing(tmp_path: Path) -> None:
    b = BuiltDomain(tmp_path, {"vda": 4 * MiB})  # a blank disk: no partition, no filesystem
    async with Store.open(b.state_db) as store:
        await b.backup(store)
    folder = b.folder(b.ids[-1])
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    try:
        with pytest.raises(VirtBackupError) as caught:
            await mount_backup(b.repo, folder, ["vda"], mountpoint, b.runtime)
    finally:
        left = b.repo.holds()
        for hold in left:  # what the old behaviour kept: released, so nothing lingers
            await release_mount(b.repo, hold)
    assert left == []
    assert not isinstance(caught.value, InputError)  # the operation failed: exit 1
    message = str(caught.value)
    assert "no filesystem could be mounted" in message and "vda" in message, message
    assert "nothing is left mounted or held" in message
    assert kernel_mounts.mounts_under(mountpoint) == []
    assert not kernel_mounts.is_mount_point(mountpoint)
    assert kernel_mounts.loops_backed_under(b.runtime) == []
    assert list(mountpoint.iterdir()) == []
