"""A refused undo log or prune journal (planted or damaged: never acted
on, issue 23) holds up only what must wait on it, and says what to do: the
error names the file, the field, and that the operator inspects it and
moves it out of the repository. The prunes of its domain wait; the other
domains' commands, and `list` and `status` of everything, go on. Two
domains in one real repository (testbed.repo_builder), the real CLI."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from testbed.cli import cli_in_process
from testbed.repo_builder import BuiltDomain, MiB
from virtbackupd.adapters.repository import PRUNE_JOURNAL, UNDO_DIR
from virtbackupd.adapters.store import Store

ADVICE = "inspect it and move it out of the repository"


async def _two(tmp: Path) -> tuple[BuiltDomain, BuiltDomain]:
    a = BuiltDomain(tmp, {"vda": 4 * MiB}, name="vm-a")
    b = BuiltDomain(tmp, {"vdb": 4 * MiB}, name="vm-b")
    async with Store.open(a.state_db) as store:
        for d, disk in ((a, "vda"), (b, "vdb")):
            d.write(disk, 0, MiB, 0x11)
            await d.backup(store)
            d.write(disk, MiB, MiB, 0x22)
            await d.backup(store)
    return a, b


def _config(tmp: Path, a: BuiltDomain) -> Path:
    policies = tmp / "policies"
    policies.mkdir()
    (policies / "p.yaml").write_text("domains: [vm-a, vm-b]\nretention: {keep_last: 1}\n")
    config = tmp / "vb.yaml"
    config.write_text(
        f"state_dir: {a.state_db.parent}\nbackup_root: {a.root}\nruntime_dir: {a.runtime}\n"
        f"policy_dirs: [{policies}]\npriority: normal\n"
    )
    return config


def _journal(a: BuiltDomain) -> Path:
    path = a.root / a.uuid / PRUNE_JOURNAL
    path.write_text(
        json.dumps(
            {
                "format": "virtbackupd-prune-journal",
                "format_version": 1,
                "ops": [{"op": "remove", "id": "../../victim"}],
                "checkpoints": {},
            }
        )
    )
    return path


def _undo(a: BuiltDomain, victim: Path) -> Path:
    folder = a.root / a.uuid / UNDO_DIR
    folder.mkdir(exist_ok=True)
    backup_id = "20261207T235959.000Z-dead"
    path = folder / f"{backup_id}.json"
    path.write_text(
        json.dumps(
            {
                "format": "virtbackupd-undo",
                "format_version": 1,
                "backup_id": backup_id,
                "domain": {"name": a.name, "uuid": a.uuid},
                "level": "incremental",
                "started": "2026-12-07T23:59:59+00:00",
                "steps": [{"do": "partial", "path": str(victim)}],
                "parent": None,
            }
        )
    )
    return path


@pytest.mark.parametrize("planted", ["journal", "undo log", "both"])
def test_a_refused_file_blocks_only_its_domains_prunes_and_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], planted: str
) -> None:
    a, _ = asyncio.run(_two(tmp_path))
    config = _config(tmp_path, a)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me\n")
    journal = _journal(a) if planted in ("journal", "both") else None
    undo = _undo(a, victim) if planted in ("undo log", "both") else None

    def named(text: str) -> None:
        """Each refused file: its path and field, and what to do, on one line."""
        for path, field in ((journal, "field ops[0].id:"), (undo, "field steps[0].path:")):
            if path is None:
                continue
            lines = [x for x in text.splitlines() if str(path) in x]
            assert lines, text
            assert all(field in x and ADVICE in x for x in lines), lines

    # Everything's list and status, and the other domain's commands, go on.
    for args in (
        ["list"],
        ["status"],
        ["list", "vm-a"],
        ["verify", "vm-b"],
        ["restore", "vm-b", "--to", str(tmp_path / "rb")],
        ["prune", "vm-b"],
    ):
        rc, text = cli_in_process(capsys, config, *args).joined()
        assert rc == 0 and "Traceback" not in text, (args, text)
        if args[0] in ("list", "status"):
            assert all(i in text for i in a.ids[-1:]), (args, text)
            named(text)
    # The domain's own commands that read a refused journal (whether a
    # prune is pending, which backups it removes) wait on it, saying so in
    # their last line; an undo log refused holds up nothing.
    for args in (
        ["prune", "vm-a"],
        ["verify", "vm-a"],
        ["restore", "vm-a", "--to", str(tmp_path / "ra")],
    ):
        rc, text = cli_in_process(capsys, config, *args).joined()
        assert "Traceback" not in text, (args, text)
        assert rc == (1 if journal is not None else 0), (args, text)
        if journal is not None:
            last = text.strip().splitlines()[-1]
            assert str(journal) in last and "wait until then" in last, (args, last)
        named(text)
    assert (victim / "precious").read_text() == "keep me\n"
    assert {p.name for p in (a.root / a.uuid).iterdir() if p.name[0] != "."} >= set(a.ids[-1:])
