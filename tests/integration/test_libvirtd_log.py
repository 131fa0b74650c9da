"""libvirtd's own log gets nothing from our routine work on a running
domain. A pull-mode job whose scratch files libvirt creates itself ends
with libvirt deleting them and then restoring their security labels
(libvirt 9.0's order), which logs "unable to stat ... .scratch" and
"Unable to restore security label" each time: the live restore's check
did that on every run. Scratch files are ours (REUSE_EXTERNAL) and removed
only after libvirt has finished with them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from testbed.daemon import cli
from testbed.domains import DomainFactory, MiB
from testbed.host import LIBVIRTD_LOG
from virtbackupd.adapters.libvirt_conn import Libvirt
from virtbackupd.config.daemon import load_config
from virtbackupd.engine.restore.live_check import MovedDisks, check_moved


def libvirtd_errors(start: int, about: str) -> list[str]:
    with LIBVIRTD_LOG.open("rb") as f:
        f.seek(start)
        new = f.read().decode(errors="replace").splitlines()
    return [x for x in new if about in x and (": error :" in x or ": warning :" in x)]


async def test_an_online_backup_and_a_live_check_leave_libvirtd_s_log_alone(
    domains: DomainFactory, config: Path
) -> None:
    assert LIBVIRTD_LOG.exists(), f"libvirtd's log is not at {LIBVIRTD_LOG} (see TESTBED.md)"
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[16 * MiB])
    (config.parent / "policies" / "p.yaml").write_text(f"domains: [{td.name}]\n")
    cfg = load_config(config)
    start = LIBVIRTD_LOG.stat().st_size
    rc, out, err = await cli(config, "--json", "backup", td.name)
    assert rc == 0, err
    backup = json.loads(out)
    work = cfg.scratch_dir / "live-check-test"
    async with await Libvirt.open(cfg.libvirt_uri) as lv:
        ref = await lv.domain(td.name)
        moved = MovedDisks(Path(backup["path"]), ("vda",), None, work, cfg.runtime_dir)
        [result] = await check_moved(lv, ref, moved)
    assert result.ok, result
    assert not work.exists()
    noise = libvirtd_errors(start, str(cfg.scratch_dir))
    assert not noise, "\n".join(noise)
