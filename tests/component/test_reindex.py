"""Disaster recovery over a damaged repository: state.db lost, then
`virtbackup reindex`, `list`, `verify` and `restore` run as an operator
would, over real qcow2 chains with references to compare against.

The repository holds what an ordinary life leaves plus the damage a
crash or a bad disk leaves: a failed attempt whose planned parent was
pruned since, a torn (truncated) manifest in the middle of a chain, a
manifest with wrong types, one in an unknown format, and a missing image.
Reindex must complete and name each problem with its file; nothing
built on a damaged backup may vanish from `list`; verify must fail
naming the file; restore without --backup must never quietly restore an
older backup than the newest (docs/restore.md: it refuses and names the
newest restorable one); and all of this must read the same whether the
catalogue survived or was rebuilt.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from testbed.repo_builder import BuiltDomain, MiB
from testbed.tools import qemu_img_compare
from virtbackupd.adapters.repository import FailedAttempt
from virtbackupd.adapters.store import Store
from virtbackupd.cli.main import main as cli
from virtbackupd.core.policy import Level


def write_config(tmp: Path, root: Path, state_db: Path) -> Path:
    cfg = tmp / "virtbackupd.yaml"
    (tmp / "policies").mkdir(exist_ok=True)
    cfg.write_text(
        f"state_dir: {state_db.parent}\nbackup_root: {root}\nruntime_dir: {tmp / 'run'}\n"
        f"scratch_dir: {tmp / 'scratch'}\npolicy_dirs: [{tmp / 'policies'}]\n"
        "libvirt_uri: test:///nowhere\n"
    )
    return cfg


def virtbackup(cfg: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any, str]:
    """`virtbackup -c CFG --json ARGS`: exit status, parsed stdout, stderr."""
    capsys.readouterr()
    rc = cli(["-c", str(cfg), "--json", *args])
    out, err = capsys.readouterr()
    return rc, json.loads(out) if out.strip() else None, err


def lose_catalogue(state_db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{state_db}{suffix}").unlink(missing_ok=True)


class Damaged:
    """Two domains in one repository, damaged as the module says."""

    def __init__(self, tmp: Path) -> None:
        self.a = BuiltDomain(tmp / "a", {"vda": 8 * MiB}, name="vm-a")
        self.b = BuiltDomain(tmp / "b", {"vda": 8 * MiB}, name="vm-b")
        self.root = self.a.root
        self.b.root, self.b.repo = self.a.root, self.a.repo  # one repository

    async def build(self) -> None:
        async with Store.open(self.a.state_db) as store:
            for i in range(5):  # a0 full, a1..a4 incrementals
                self.a.write("vda", i * MiB, MiB, 0x10 + i)
                await self.a.backup(store)
            for i, level in enumerate([None, None, Level.FULL, None, None]):
                self.b.write("vda", i * MiB + 512 * 1024, MiB, 0x40 + i)
                await self.b.backup(store, level)

    def damage(self) -> dict[str, Path]:
        """Tear, mistype and remove; the file each problem must be named by."""
        a, b = self.a, self.b
        now = datetime.now(UTC)
        # An interrupted backup, then retention pruned its planned parent.
        a.repo.record_attempt(
            FailedAttempt(
                "20200101T000000.000Z-dead",
                a.name,
                a.uuid,
                Level.INCREMENTAL,
                now - timedelta(days=400),
                now - timedelta(days=400),
                "interrupted: the backup process died",
                parent="20191231T000000.000Z-0000",
            )
        )
        torn = a.folder(a.ids[2]) / "manifest.json"
        torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
        typed = b.folder(b.ids[1]) / "manifest.json"
        doc = json.loads(typed.read_text())
        doc["disks"][0]["virtual_size"] = "eight mebibytes"
        typed.write_text(json.dumps(doc))
        missing = b.image(b.ids[3], "vda")
        missing.unlink()
        unknown = b.folder(b.ids[4]) / "manifest.json"
        doc = json.loads(unknown.read_text())
        doc["format_version"] = 99
        unknown.write_text(json.dumps(doc))
        # Restore never reads checkpoint.xml: a torn one costs only the checkpoint.
        xml = a.folder(a.ids[1]) / "checkpoint.xml"
        xml.write_bytes(b"<domaincheckpoint><name>virtbackupd-\xff")
        return {a.ids[2]: torn, b.ids[1]: typed, b.ids[3]: missing, b.ids[4]: unknown}

    @property
    def torn_checkpoint(self) -> Path:
        return self.a.folder(self.a.ids[1]) / "checkpoint.xml"


@pytest.fixture
def damaged(tmp_path: Path) -> Damaged:
    d = Damaged(tmp_path)
    asyncio.run(d.build())
    return d


def states(listed: list[dict[str, Any]]) -> dict[str, str]:
    return {x["id"]: x["state"] for x in listed}


def test_reindex_over_a_damaged_repository_names_each_problem_and_blocks_nothing(
    damaged: Damaged, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = damaged.a, damaged.b
    cfg = write_config(tmp_path, damaged.root, a.state_db)
    blame = damaged.damage()
    rc, kept_view, err = virtbackup(cfg, capsys, "list")
    assert rc == 0, err

    lose_catalogue(a.state_db)
    rc, out, err = virtbackup(cfg, capsys, "reindex")
    assert rc == 0, err
    assert "FOREIGN KEY" not in err and "Traceback" not in err
    problems = [line for line in err.splitlines() if line.startswith("virtbackup:")]
    for path in [*blame.values(), damaged.torn_checkpoint]:
        naming = [line for line in problems if str(path) in line]
        assert len(naming) == 1, (path, err)
    assert len(problems) == len(blame) + 1, err  # one line each, nothing else
    # Every folder and the attempt are in the catalogue again.
    assert (out["backups"], out["failed_attempts"]) == (7, 1)
    assert sorted(out["unreadable"]) == sorted(blame.keys() - {b.ids[3]})

    rc, listed, err = virtbackup(cfg, capsys, "list", "--all")
    assert rc == 0, err
    got = states(listed)
    assert got == {
        a.ids[0]: "complete",
        a.ids[1]: "complete",
        a.ids[2]: "unreadable",
        a.ids[3]: "unreadable-chain",
        a.ids[4]: "unreadable-chain",
        b.ids[0]: "complete",
        b.ids[1]: "unreadable",
        b.ids[2]: "complete",
        b.ids[3]: "unreadable",
        b.ids[4]: "unreadable",
        "20200101T000000.000Z-dead": "failed",
    }
    problem = {x["id"]: x["problem"] for x in listed}
    for backup_id, path in blame.items():
        assert str(path) in problem[backup_id]
    for above in a.ids[3:]:
        assert a.ids[2] in problem[above] and str(blame[a.ids[2]]) in problem[above]
    # The same damage reads the same whether the catalogue survived or not.
    assert states(kept_view) == {k: v for k, v in got.items() if v != "failed"}

    # status's last good backup is one that can be restored.
    rc, status, err = virtbackup(cfg, capsys, "status")
    assert rc == 0, err
    rows = {r["domain"]: r for r in status["domains"]}
    assert (rows[a.name]["last_good"], rows[b.name]["last_good"]) == (a.ids[1], b.ids[2])
    assert str(blame[a.ids[2]]) in rows[a.name]["newest_unrestorable"]
    assert rows[b.name]["newest_unrestorable"].startswith(b.ids[4])

    rc, verdicts, err = virtbackup(cfg, capsys, "verify", a.name)
    assert rc == 1, err
    bad = {v["backup"] for v in verdicts if not v["ok"]}
    assert bad == {a.ids[2], a.ids[3], a.ids[4]}
    assert str(blame[a.ids[2]]) in json.dumps(verdicts)

    # Restore without --backup: refused, naming the damage and the way out.
    out_dir = tmp_path / "restored"
    rc, _, err = virtbackup(cfg, capsys, "restore", a.name, "--to", str(out_dir))
    assert rc == 1
    assert len(err.strip().splitlines()) == 1, err
    assert a.ids[4] in err and str(blame[a.ids[2]]) in err and f"--backup {a.ids[1]}" in err
    assert not out_dir.exists() or not any(out_dir.iterdir())
    rc, _, err = virtbackup(cfg, capsys, "restore", b.name, "--to", str(out_dir))
    assert rc == 1 and f"--backup {b.ids[2]}" in err and str(blame[b.ids[4]]) in err, err

    # The way out works, byte-identical to what the domain held then.
    for dom, good in ((a, a.ids[1]), (b, b.ids[2])):
        dest = tmp_path / f"restored-{dom.name}"
        rc, done, err = virtbackup(
            cfg, capsys, "restore", dom.name, "--backup", good, "--to", str(dest)
        )
        assert rc == 0, err
        qemu_img_compare(dom.refs[good]["vda"], done["disks"][0]["path"], "raw", "qcow2")


def test_a_catalogue_kept_and_a_rebuilt_one_pick_alike_and_a_repaired_manifest_counts_again(
    damaged: Damaged, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The stand-in a rebuild writes for a torn manifest is re-read on
    every command: once the file is put back, the backup is whole again
    and the newest backup restores without --backup."""
    a = damaged.a
    cfg = write_config(tmp_path, damaged.root, a.state_db)
    torn = a.folder(a.ids[2]) / "manifest.json"
    good = torn.read_bytes()
    torn.write_bytes(good[:100])
    rc, _, err = virtbackup(cfg, capsys, "restore", a.name, "--to", str(tmp_path / "x"))
    assert rc == 1 and f"--backup {a.ids[1]}" in err, err  # catalogue kept
    lose_catalogue(a.state_db)
    rc, _, err = virtbackup(cfg, capsys, "reindex")
    assert rc == 0, err
    rc, _, err = virtbackup(cfg, capsys, "restore", a.name, "--to", str(tmp_path / "x"))
    assert rc == 1 and f"--backup {a.ids[1]}" in err, err  # catalogue rebuilt
    torn.write_bytes(good)
    rc, listed, err = virtbackup(cfg, capsys, "list", a.name)
    assert rc == 0, err
    assert set(states(listed).values()) == {"complete"}
    assert next(x for x in listed if x["id"] == a.ids[2])["level"] == "incremental"
    dest = tmp_path / "newest"
    rc, done, err = virtbackup(cfg, capsys, "restore", a.name, "--to", str(dest))
    assert rc == 0, err
    assert done["backup"] == a.ids[4]
    qemu_img_compare(a.refs[a.ids[4]]["vda"], done["disks"][0]["path"], "raw", "qcow2")


def test_reindex_killed_at_random_instants_is_finished_by_the_next_one(
    damaged: Damaged, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`reindex` SIGKILLed at seeded random instants (half over its whole
    run, half once its database exists: the part that writes), with
    state.db lost before each: the next reindex completes, nothing is
    called damaged, and list and restore read as after an undisturbed one.
    Replay: VIRTBACKUP_REINDEX_SEED=<seed> (and _ITERATIONS)."""
    a, b = damaged.a, damaged.b
    cfg = write_config(tmp_path, damaged.root, a.state_db)
    blame = damaged.damage()
    seed = int(os.environ.get("VIRTBACKUP_REINDEX_SEED", random.randrange(2**32)))
    iterations = int(os.environ.get("VIRTBACKUP_REINDEX_ITERATIONS", "10"))
    with capsys.disabled():  # the helper below reads (and empties) what is captured
        print(f"\nreindex kill seed {seed} (VIRTBACKUP_REINDEX_SEED={seed} replays it)")
    rnd = random.Random(seed)
    command = [sys.executable, "-m", "virtbackupd.cli.main", "-c", str(cfg), "--json", "reindex"]

    def run_until(db_appears: bool) -> tuple[float, float]:
        """A whole reindex: seconds to the database's appearance, in all."""
        t0 = time.monotonic()
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while db_appears and not a.state_db.exists() and proc.poll() is None:
            time.sleep(0.001)
        seen = time.monotonic() - t0
        assert proc.wait(timeout=120) == 0
        return seen, time.monotonic() - t0

    lose_catalogue(a.state_db)
    to_db, whole = run_until(db_appears=True)
    rc, _, err = virtbackup(cfg, capsys, "list", "--all")
    expected = virtbackup(cfg, capsys, "list", "--all")[1]
    assert rc == 0, err
    killed = 0
    for i in range(iterations):
        lose_catalogue(a.state_db)
        after_db = i % 2 == 1
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if after_db:
            deadline = time.monotonic() + 120
            while not a.state_db.exists() and proc.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.001)
            delay = rnd.uniform(0, max(whole - to_db, 0.01))
        else:
            delay = rnd.uniform(0, whole)
        # A run that ends before its kill is an instant too (the end); the
        # count below only checks that the kills land inside runs at all.
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait(timeout=120)
        killed += rc == -signal.SIGKILL
        with capsys.disabled():
            print(f"iteration {i}: {'db seen + ' if after_db else ''}{delay:.3f} s: exit {rc}")

        rc, out, err = virtbackup(cfg, capsys, "reindex")
        assert rc == 0, (seed, i, err)
        assert out["moved_aside"] is None, (seed, i, err)  # a kill never damages SQLite
        # The folders a killed run recorded are not read again: what it
        # found is in the catalogue, and `list` names it (checked below).
        rc, listed, err = virtbackup(cfg, capsys, "list", "--all")
        assert rc == 0, (seed, i, err)
        assert states(listed) == states(expected), (seed, i)
        problem = {x["id"]: x["problem"] for x in listed}
        for backup_id, path in blame.items():
            assert str(path) in problem[backup_id], (seed, i)
        dest = tmp_path / f"restored-{i}"
        rc, done, err = virtbackup(
            cfg, capsys, "restore", b.name, "--backup", b.ids[2], "--to", str(dest)
        )
        assert rc == 0, (seed, i, err)
        qemu_img_compare(b.refs[b.ids[2]]["vda"], done["disks"][0]["path"], "raw", "qcow2")
    with capsys.disabled():
        print(f"{killed} of {iterations} reindex runs killed before they ended (seed {seed})")
    assert killed >= iterations // 4, f"the kills came too late to test anything (seed {seed})"


def test_reindex_completes_over_manifests_whose_parents_loop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two manifests naming each other as parent (no crash makes that, a
    hand edit or a bad copy can): reindex completes, and neither backup is
    offered as restorable."""
    d = BuiltDomain(tmp_path / "d", {"vda": 4 * MiB})

    async def build() -> None:
        async with Store.open(d.state_db) as store:
            for i in range(2):
                d.write("vda", i * MiB, MiB, 0x70 + i)
                await d.backup(store)

    asyncio.run(build())
    for me, other in ((d.ids[0], d.ids[1]), (d.ids[1], d.ids[0])):
        path = d.folder(me) / "manifest.json"
        doc = json.loads(path.read_text())
        doc["parent"] = other
        path.write_text(json.dumps(doc))
    cfg = write_config(tmp_path, d.root, d.state_db)
    lose_catalogue(d.state_db)
    rc, out, err = virtbackup(cfg, capsys, "reindex")
    assert rc == 0, err
    assert out["backups"] == 2
    rc, listed, err = virtbackup(cfg, capsys, "list")
    assert rc == 0, err
    assert "complete" not in states(listed).values()
    assert all("loops" in x["problem"] for x in listed), listed
    rc, _, err = virtbackup(cfg, capsys, "restore", d.name, "--to", str(tmp_path / "x"))
    assert rc == 1 and "loops" in err, err
