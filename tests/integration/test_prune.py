"""Retention and merging on a real domain's backup chain through the CLI:
kept points restore byte-identical after pruning, a prune killed (SIGKILL)
after its journal is finished by the next one, the pruned backups'
checkpoints leave libvirt, and the chain carries on. The prune killed at
every step and the chain limit run without a VM:
tests/component/test_prune_repo.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from testbed.cli import run_cli
from testbed.domains import DomainFactory, GuestDomain, MiB
from testbed.guest import GuestWriter
from testbed.tools import qemu_img_compare, qemu_img_info
from virtbackupd.adapters import repository

Refs = dict[str, dict[str, Path]]


def build_chain(
    td: GuestDomain, config: Path, capsys: pytest.CaptureFixture[str], tmp: Path, n: int
) -> tuple[list[dict[str, Any]], Refs]:
    """A full and n-1 incrementals, each after different guest writes, and
    a copy of the reference images at each point."""
    guest = GuestWriter(td)
    records: list[dict[str, Any]] = []
    refs: Refs = {}
    for i in range(n):
        guest.write("vda", (i % 4) * 4 * MiB, MiB + i * 64 * 1024, 0x30 + i)
        if i % 2:
            guest.zero("vda", (i % 4) * 4 * MiB, 256 * 1024)
        guest.write("vdb", i * MiB, 512 * 1024, 0x60 + i)
        rec = run_cli(config, capsys, "backup", td.name)
        assert rec["status"] == "complete"
        records.append(rec)
        refs[rec["id"]] = {}
        for d in td.data_disks:
            assert d.reference is not None
            copy = tmp / f"ref-{rec['id']}-{d.target}.raw"
            shutil.copyfile(d.reference, copy)
            refs[rec["id"]][d.target] = copy
    return records, refs


def assert_points_restore(domain_dir: Path, refs: Refs, ids: list[str]) -> None:
    """Each backup's chain reads exactly like the reference at its time
    (plain qemu-img, following the backing files)."""
    for backup_id in ids:
        for disk, ref in refs[backup_id].items():
            qemu_img_compare(ref, domain_dir / backup_id / f"{disk}.qcow2", "raw", "qcow2")


def policy(config: Path, td: GuestDomain, retention: str, chain: str = "") -> None:
    (config.parent / "policies" / "p.yaml").write_text(
        f"domains: [{td.name}]\nretention: {{{retention}}}\n{chain}"
    )


def test_keep_last_two_merges_and_a_killed_prune_is_finished(
    domains: DomainFactory, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    td = domains.create(qcow2_sizes=[16 * MiB, 8 * MiB])
    policy(config, td, "")  # no rule yet: everything is kept
    records, refs = build_chain(td, config, capsys, tmp_path, 6)
    ids = [r["id"] for r in records]
    domain_dir = Path(records[0]["path"]).parent

    out = run_cli(config, capsys, "prune", td.name, "--dry-run")
    assert all(b["keep"] for b in out[0]["backups"]) and out[0]["operations"] == []

    policy(config, td, "keep_last: 2")
    dry = run_cli(config, capsys, "prune", td.name, "--dry-run")[0]
    assert [b["id"] for b in dry["backups"] if b["keep"]] == ids[4:]
    assert sum(op.startswith("consolidate") for op in dry["operations"]) == 4
    assert sorted(p.name for p in domain_dir.iterdir() if p.name[0] != ".") == ids  # dry run

    # Killed (SIGKILL) as soon as its journal is on disk, then run again.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "virtbackupd.cli.main", "-c", str(config), "prune", td.name],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    journal = domain_dir / repository.PRUNE_JOURNAL
    deadline = time.monotonic() + 60
    while not journal.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert journal.exists(), "the prune finished before it could be killed"
    assert_points_restore(domain_dir, refs, ids[4:])
    # `list` tells the truth meanwhile: what the prune removes is no restore point.
    states = {b["id"]: b["state"] for b in run_cli(config, capsys, "list", td.name)}
    assert [states[i] for i in ids] == ["pruning"] * 4 + ["complete"] * 2

    done = run_cli(config, capsys, "prune", td.name)[0]
    assert done["replayed_interrupted_prune"] is True
    # The domain runs: the pruned backups' checkpoints (and bitmaps) went too.
    pruned_cps = {r["checkpoint"] for r in records[:4]}
    assert set(done["removed_checkpoints"]) == pruned_cps
    assert not pruned_cps & {c.getName() for c in td.dom.listAllCheckpoints(0)}
    assert not journal.exists()
    assert sorted(p.name for p in domain_dir.iterdir() if p.name[0] != ".") == ids[4:]
    assert_points_restore(domain_dir, refs, ids[4:])
    assert "backing-filename" not in qemu_img_info(domain_dir / ids[4] / "vda.qcow2")

    listed = run_cli(config, capsys, "list", td.name)
    assert [(b["id"], b["parent"]) for b in listed] == [(ids[4], None), (ids[5], ids[4])]
    # Taken as an incremental, stored now as a standalone image, sized as such.
    assert (listed[0]["level"], listed[0]["stored"]) == ("incremental", "standalone")
    assert (listed[1]["stored"], listed[1]["backing"]) == ("overlay", ids[4])
    assert listed[0]["size_on_disk"] > listed[0]["bytes_written"]
    verdicts = run_cli(config, capsys, "verify", td.name)
    assert all(v["ok"] for v in verdicts), verdicts
    # Restores through the CLI too, and the chain carries on incrementally.
    run_cli(config, capsys, "restore", td.name, "--backup", ids[4], "--to", str(tmp_path / "r"))
    qemu_img_compare(refs[ids[4]]["vda"], tmp_path / "r" / "vda.qcow2", "raw", "qcow2")
    GuestWriter(td).write("vda", 9 * MiB, MiB, 0x77)
    nxt = run_cli(config, capsys, "backup", td.name)
    assert nxt["level"] == "incremental" and nxt["parent"] == ids[5]
