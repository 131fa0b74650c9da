"""Listings do not parse range lists they do not need (issue 24, item 8):
a repository of fragmented backups (100 000 ranges a disk, in each
manifest and in the catalogue) is listed without parsing one of them;
the figures (time, peak memory) are printed. A restore-side read still
parses and checks them (adapters.repository.read_manifest)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import tracemalloc
from pathlib import Path

import pytest

from testbed.repo_builder import BuiltDomain, MiB
from virtbackupd.adapters.repository import MANIFEST, read_manifest
from virtbackupd.adapters.store import Store
from virtbackupd.cli.main import main
from virtbackupd.core import extents

RANGES = 100_000
BACKUPS = 3


async def _built(tmp: Path) -> BuiltDomain:
    b = BuiltDomain(tmp, {"vda": 8 * MiB})
    async with Store.open(b.state_db) as store:
        for i in range(BACKUPS):
            b.write("vda", i * MiB, MiB, 0x11 + i)
            await b.backup(store)
    return b


def _fragment(b: BuiltDomain) -> None:
    """Each backup's disk as if written in 100 000 scattered pieces."""
    many = [[i * 64, 32, "data"] for i in range(RANGES)]
    for backup_id in b.ids:
        path = b.folder(backup_id) / MANIFEST
        data = json.loads(path.read_text())
        data["disks"][0]["ranges"] = many
        path.write_text(json.dumps(data))
    with sqlite3.connect(b.state_db) as db:
        db.execute("UPDATE backup_disks SET ranges = ?", (json.dumps(many),))


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many range lists were parsed (their lengths)."""
    seen: list[int] = []
    real = extents.ranges_from_json

    def counting(items: list[list[object]]) -> list[extents.Range]:
        out = real(items)
        seen.append(len(out))
        return out

    monkeypatch.setattr(extents, "ranges_from_json", counting)
    return seen


def test_a_listing_of_fragmented_backups_parses_no_range_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], parses: list[int]
) -> None:
    b = asyncio.run(_built(tmp_path))
    _fragment(b)
    config = tmp_path / "vb.yaml"
    config.write_text(
        f"state_dir: {b.state_db.parent}\nbackup_root: {b.root}\nruntime_dir: {b.runtime}\n"
        f"policy_dirs: [{tmp_path}]\npriority: normal\n"
    )
    main(["-c", str(config), "list"])  # the catalogue settles first
    capsys.readouterr()
    parses.clear()
    tracemalloc.start()
    started = time.monotonic()
    rc = main(["-c", str(config), "--json", "list"])
    took = time.monotonic() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    listed = json.loads(capsys.readouterr().out)
    print(
        f"list of {BACKUPS} backups x {RANGES} ranges: {took:.2f} s, "
        f"peak {peak / MiB:.1f} MiB, range lists parsed: {len(parses)}"
    )
    assert rc == 0 and [x["state"] for x in listed] == ["complete"] * BACKUPS, listed
    assert parses == [], f"the listing parsed {len(parses)} range lists"
    assert peak < 32 * MiB, peak

    # Who needs them still gets them, checked.
    disk = read_manifest(b.folder(b.ids[-1])).disks[0]
    assert len(disk.ranges) == RANGES and parses == [RANGES]
