"""A new operator's first online backup on a host where nothing exists yet
(issue 24, item 1): no state_dir, no unit that ever made one."""

from __future__ import annotations

import asyncio
import shutil
import stat

from testbed.daemon import cli
from testbed.domains import WORK_ROOT, DomainFactory, MiB
from testbed.guest import GuestWriter
from testbed.tools import qemu_img_compare


async def test_the_first_online_backup_creates_its_state_dir_and_restores(
    domains: DomainFactory,
) -> None:
    """The CLI made the missing state_dir 0700 and then refused its own
    default scratch_dir inside it ("QEMU (uid 64055) cannot reach it,
    because …/state is mode 0700"). Now the state_dir that holds the
    scratch_dir is made 0711 (QEMU passes, nobody lists), the backup
    works and its restore equals the disk."""
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[8 * MiB])
    await asyncio.to_thread(GuestWriter(td).write, "vda", MiB, 2 * MiB, 0x5A)
    home = WORK_ROOT / f"{td.name}-fresh"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    try:
        state = home / "state"  # missing, with every folder below it
        (home / "policies").mkdir()
        config = home / "virtbackupd.yaml"
        config.write_text(
            f"state_dir: {state}\nruntime_dir: {home / 'run'}\npolicy_dirs: [{home / 'policies'}]\n"
        )
        rc, _, err = await cli(config, "backup", td.name)
        assert rc == 0, err
        assert stat.S_IMODE(state.stat().st_mode) == 0o711
        assert stat.S_IMODE((state / "backups").stat().st_mode) == 0o700
        out = home / "restored"
        rc, _, err = await cli(config, "restore", td.name, "--to", str(out), "--format", "raw")
        assert rc == 0, err
        ref = td.disk("vda").reference
        assert ref is not None
        (image,) = [p for p in out.iterdir() if p.name.startswith("vda")]
        await asyncio.to_thread(qemu_img_compare, ref, image, "raw", "raw")
    finally:
        shutil.rmtree(home, ignore_errors=True)
