"""Retention and merging on real backup chains: kept points restore
byte-identical after pruning, a prune killed at any step is finished by the
next one without losing a kept point, and the chain limit is met by
merging instead of a new full backup."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from testbed.cli import run_cli
from testbed.domains import DomainFactory, GuestDomain, MiB
from testbed.guest import GuestWriter
from testbed.tools import qemu_img_compare, qemu_img_info
from virtbackupd.adapters import repository
from virtbackupd.adapters.store import Store
from virtbackupd.config.daemon import load_config
from virtbackupd.core.policy import Retention
from virtbackupd.engine.prune import prune_domain

Refs = dict[str, dict[str, Path]]


def build_chain(
    td: GuestDomain, config: Path, capsys: pytest.CaptureFixture[str], tmp: Path, n: int
) -> tuple[list[dict], Refs]:  # type: ignore[type-arg]
    """A full and n-1 incrementals, each after different guest writes, and
    a copy of the reference images at each point."""
    guest = GuestWriter(td)
    records, refs = [], {}
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
    assert sum(op.startswith("commit") for op in dry["operations"]) == 4
    assert sorted(p.name for p in domain_dir.iterdir()) == ids  # a dry run changes nothing

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

    done = run_cli(config, capsys, "prune", td.name)[0]
    assert done["replayed_interrupted_prune"] is True
    # The domain runs: the pruned backups' checkpoints (and bitmaps) went too.
    pruned_cps = {r["checkpoint"] for r in records[:4]}
    assert set(done["removed_checkpoints"]) == pruned_cps
    assert not pruned_cps & {c.getName() for c in td.dom.listAllCheckpoints(0)}
    assert not journal.exists()
    assert sorted(p.name for p in domain_dir.iterdir()) == ids[4:]
    assert_points_restore(domain_dir, refs, ids[4:])
    assert "backing-filename" not in qemu_img_info(domain_dir / ids[4] / "vda.qcow2")

    listed = run_cli(config, capsys, "list", td.name)
    assert [(b["id"], b["parent"]) for b in listed] == [(ids[4], None), (ids[5], ids[4])]
    verdicts = run_cli(config, capsys, "verify", td.name)
    assert all(v["ok"] for v in verdicts), verdicts
    # Restores through the CLI too, and the chain carries on incrementally.
    run_cli(config, capsys, "restore", td.name, "--backup", ids[4], "--to", str(tmp_path / "r"))
    qemu_img_compare(refs[ids[4]]["vda"], tmp_path / "r" / "vda.qcow2", "raw", "qcow2")
    GuestWriter(td).write("vda", 9 * MiB, MiB, 0x77)
    nxt = run_cli(config, capsys, "backup", td.name)
    assert nxt["level"] == "incremental" and nxt["parent"] == ids[5]


class Interrupted(BaseException):
    """Stands for the process dying right after a step."""


def test_prune_interrupted_after_every_step_loses_nothing(
    domains: DomainFactory, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    td = domains.create(qcow2_sizes=[16 * MiB, 8 * MiB])
    policy(config, td, "")
    records, refs = build_chain(td, config, capsys, tmp_path, 5)
    ids = [r["id"] for r in records]
    domain_dir = Path(records[0]["path"]).parent
    cfg = load_config(config)
    kept = ids[2:]

    def stop_at_new_step(crashed: list[str]) -> Callable[[str], None]:
        """Die right after the first step no earlier run died after."""

        def hook(label: str) -> None:
            if label not in crashed:
                crashed.append(label)
                raise Interrupted(label)

        return hook

    async def run(hook: Callable[[str], None]) -> None:
        async with Store.open(cfg.state_db) as store:
            await prune_domain(
                store,
                domain_dir,
                Retention(keep_last=3),
                1,  # chain limit: the newest ends one overlay above its base
                cfg.runtime_dir,
                step=hook,
            )

    crashed: list[str] = []
    for _ in range(100):
        try:
            asyncio.run(run(stop_at_new_step(crashed)))
        except Interrupted:
            assert_points_restore(domain_dir, refs, kept)
            continue
        break
    # Died once after every step: journal, each commit, move, rebase,
    # manifest, hide, removal, the store update and dropping the journal.
    kinds = {label.split()[0] for label in crashed}
    assert kinds == {
        "journal",
        "committed",
        "moved",
        "manifest",
        "rebased",
        "hid",
        "removed",
        "store",
    }, crashed
    assert len(crashed) >= 15, crashed
    assert not (domain_dir / repository.PRUNE_JOURNAL).exists()
    assert sorted(p.name for p in domain_dir.iterdir() if not p.name.startswith(".")) == kept
    assert_points_restore(domain_dir, refs, kept)
    listed = run_cli(config, capsys, "list", td.name)
    # ids[4] skipped ids[3] to meet the chain limit: both now build on ids[2].
    assert [(b["id"], b["parent"]) for b in listed] == [
        (ids[2], None),
        (ids[3], ids[2]),
        (ids[4], ids[2]),
    ]
    verdicts = run_cli(config, capsys, "verify", td.name)
    assert all(v["ok"] for v in verdicts), verdicts


def test_chain_limit_is_met_by_merging_not_by_a_new_full(
    domains: DomainFactory, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    td = domains.create(qcow2_sizes=[16 * MiB, 8 * MiB])
    policy(config, td, "", "chain: {max_incrementals: 2}\n")
    records, refs = build_chain(td, config, capsys, tmp_path, 5)
    assert [r["level"] for r in records] == ["full"] + ["incremental"] * 4
    ids = [r["id"] for r in records]
    domain_dir = Path(records[0]["path"]).parent
    run_cli(config, capsys, "prune", td.name)
    listed = {b["id"]: b["parent"] for b in run_cli(config, capsys, "list", td.name)}
    depth, cur = 0, ids[-1]
    while listed[cur] is not None:
        depth, cur = depth + 1, listed[cur]
    assert depth == 2
    assert_points_restore(domain_dir, refs, ids)  # nothing was lost
