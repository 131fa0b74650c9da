"""A CLI backup whose process died (SIGKILL mid-copy, as the OOM killer or
an operator's `kill -9` does) seen by the operator's commands, each run as
its own process: `status` and `list` say "interrupted" instead of showing
it running with an ETA, and `cancel` cleans it up from its undo log at
once instead of waiting for an answer that never comes."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import libvirt

from testbed.daemon import spawn_cli
from testbed.domains import DomainFactory, MiB, wait_until
from testbed.guest import GuestWriter
from testbed.tools import assert_restores
from virtbackupd.adapters.repository import Repository
from virtbackupd.config.daemon import load_config


async def virtbackup(config: Path, *args: str, json_out: bool = True) -> tuple[int, Any, str]:
    proc = await spawn_cli(config, *(["--json"] if json_out else []), *args)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=300)
    text = out.decode()
    parsed = json.loads(text) if json_out and text.strip() else text
    assert proc.returncode is not None
    return proc.returncode, parsed, err.decode()


def own_checkpoints(dom: libvirt.virDomain) -> set[str]:
    return {c.getName() for c in dom.listAllCheckpoints() if c.getName().startswith("virtbackupd-")}


async def test_a_backup_whose_process_died_is_interrupted_and_cancel_cleans_it_up(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    td = domains.create(qcow2_sizes=[64 * MiB])
    guest = GuestWriter(td)
    guest.write("vda", 0, MiB, 0x0A)
    (config.parent / "policies" / "p.yaml").write_text(f"domains: [{td.name}]\n")
    rc, full, err = await virtbackup(config, "backup", td.name)
    assert rc == 0, err
    guest.write("vda", 2 * MiB, 40 * MiB, 0x0B)
    # Slow (40 MiB at 1 MiB/s): the copy is surely running when it is killed.
    (config.parent / "policies" / "p.yaml").write_text(f"domains: [{td.name}]\nbandwidth: 1MiB\n")
    proc = await spawn_cli(
        config,
        "backup",
        td.name,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    cfg = load_config(config)
    wait_until(
        lambda: any((cfg.runtime_dir / "jobs").glob("*/nbd.sock")), 120, what="copy to start"
    )
    await asyncio.sleep(2)  # some progress published: an ETA to show
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    assert td.dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE  # its pull job is orphaned
    assert len(own_checkpoints(td.dom)) == 2

    rc, status, err = await virtbackup(config, "status")
    assert rc == 0, err
    [job] = status["running"]
    assert job["interrupted"] is True and job["eta_s"] is None, job
    rc, text, err = await virtbackup(config, "status", json_out=False)
    assert rc == 0, err
    assert f"interrupted: {td.name} {job['backup_id']}" in text, text
    rc, listed, err = await virtbackup(config, "list", td.name)
    assert rc == 0, err
    assert {x["id"]: x["state"] for x in listed}[job["backup_id"]] == "interrupted"

    started = time.monotonic()
    rc, cancelled, err = await virtbackup(config, "cancel", td.name)
    took = time.monotonic() - started
    assert rc == 0, err
    assert took < 60, f"cancel took {took:.0f} s"  # it used to wait 120 s, then fail
    assert cancelled["id"] == job["backup_id"]
    assert cancelled["status"] == "failed" and "interrupted" in cancelled["error"]
    # Cleaned up from the undo log, as the failing job itself would have.
    assert td.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE
    assert own_checkpoints(td.dom) == {full["checkpoint"]}
    repo = Repository(cfg.backup_root)
    assert not repo.undo_logs(full["domain_uuid"])
    assert not list(repo.domain_dir(full["domain_uuid"]).glob("*.partial"))
    rc, status, err = await virtbackup(config, "status")
    assert rc == 0 and status["running"] == [], (status, err)

    # The chain goes on from the last complete backup, and restores exact.
    (config.parent / "policies" / "p.yaml").write_text(f"domains: [{td.name}]\n")
    rc, nxt, err = await virtbackup(config, "backup", td.name)
    assert rc == 0, err
    assert (nxt["level"], nxt["parent"]) == ("incremental", full["id"])
    assert_restores(Path(nxt["path"]), [(d["name"], d["path"]) for d in nxt["disks"]], td, tmp_path)
