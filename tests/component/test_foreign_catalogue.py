"""A catalogue knows which repository it describes (hostile-tester
finding #12, issue 23): a state.db copied beside another backup_root
listed the other root's backups, and verify and restore acted on them
(the rows name the other root's folders). Each repository has an id
(``<root>/.repository.json``) that the catalogue records; a catalogue
recording another is refused by every command that reads it, in one line
naming both and `virtbackup reindex`, which moves it aside and builds one
for this repository. A catalogue that records none (new, or from before
identities) adopts the repository silently: nothing was recorded to
compare. Real repositories (testbed.repo_builder), the real CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.cli import cli_in_process
from testbed.repo_builder import BuiltDomain, MiB
from virtbackupd.adapters.repository import IDENTITY
from virtbackupd.adapters.store import Store


async def _built(tmp: Path, pattern: int) -> BuiltDomain:
    b = BuiltDomain(tmp, {"vda": 4 * MiB})
    async with Store.open(b.state_db) as store:
        b.write("vda", 0, MiB, pattern)
        await b.backup(store)
        b.write("vda", MiB, MiB, pattern + 1)
        await b.backup(store)
    return b


def _config(b: BuiltDomain) -> Path:
    config = b.tmp / "vb.yaml"
    config.write_text(
        f"state_dir: {b.state_db.parent}\nbackup_root: {b.root}\nruntime_dir: {b.runtime}\n"
        "priority: normal\n"
    )
    return config


def _recorded(b: BuiltDomain) -> dict[str, str]:
    """Root -> the id the catalogue records for it."""
    with contextlib.closing(sqlite3.connect(b.state_db)) as db:
        return {str(r[0]): str(r[1]) for r in db.execute("SELECT root, id FROM repositories")}


def _identity(root: Path) -> str:
    return str(json.loads((root / IDENTITY).read_text())["id"])


@pytest.fixture
def two(tmp_path: Path) -> tuple[BuiltDomain, BuiltDomain]:
    a = asyncio.run(_built(tmp_path / "a", 0x11))
    b = asyncio.run(_built(tmp_path / "b", 0x44))
    return a, b


def test_a_catalogue_copied_beside_another_repository_is_refused_until_reindexed(
    two: tuple[BuiltDomain, BuiltDomain], capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = two
    config_a, config_b = _config(a), _config(b)
    # First use: each catalogue adopts its repository, which gets an id.
    for built, config in ((a, config_a), (b, config_b)):
        rc, _, err = cli_in_process(capsys, config, "list")
        assert rc == 0, err
        assert _recorded(built) == {str(built.root): _identity(built.root)}
    id_a, id_b = _identity(a.root), _identity(b.root)
    assert id_a != id_b

    # A's catalogue put where B's is (a copied state_dir, a restored file).
    for f in b.state_db.parent.glob("state.db*"):
        f.unlink()
    for f in a.state_db.parent.glob("state.db*"):
        shutil.copy2(f, b.state_db.parent / f.name)
    to = b.tmp / "r"
    for args in (
        ["list"],
        ["--json", "list", a.name],
        ["status"],
        ["verify", a.name, "--backup", a.ids[1]],
        ["restore", a.name, "--backup", a.ids[1], "--to", str(to)],
        ["prune", a.name, "--dry-run"],
        ["cancel", a.name],
    ):
        rc, out, err = cli_in_process(capsys, config_b, *args)
        assert rc == 1 and "Traceback" not in err, (args, rc, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, (args, err)
        line = lines[0]
        assert str(b.state_db) in line and id_a in line and id_b in line, line
        assert str(b.root) in line and "`virtbackup reindex`" in line, line
        assert a.ids[0] not in out and a.ids[1] not in out, (args, out)
    assert not to.exists()

    # reindex moves the foreign catalogue aside and builds B's.
    rc, out, err = cli_in_process(capsys, config_b, "reindex")
    assert rc == 0, err
    assert "moved aside to" in err and id_a in err, err
    assert len(list(b.state_db.parent.glob("state.db.foreign-*"))) == 1
    assert _recorded(b) == {str(b.root): id_b}
    rc, out, err = cli_in_process(capsys, config_b, "--json", "list")
    assert rc == 0, err
    listed = {x["id"] for x in json.loads(out)}
    assert listed == set(b.ids), listed


def test_a_repository_without_an_id_under_a_recorded_catalogue_is_refused(
    two: tuple[BuiltDomain, BuiltDomain], capsys: pytest.CaptureFixture[str]
) -> None:
    """A catalogue that recorded A, beside a root of backups without any
    id (written by a version before identities, or its id file removed)."""
    a, b = two
    assert cli_in_process(capsys, _config(a), "list")[0] == 0
    for f in b.state_db.parent.glob("state.db*"):
        f.unlink()
    for f in a.state_db.parent.glob("state.db*"):
        shutil.copy2(f, b.state_db.parent / f.name)
    (b.root / IDENTITY).unlink()  # as a version before identities wrote it
    rc, _, err = cli_in_process(capsys, _config(b), "list")
    assert rc == 1 and f"but no {IDENTITY}" in err and _identity(a.root) in err, err


def test_a_catalogue_from_before_identities_adopts_its_repository_silently(
    two: tuple[BuiltDomain, BuiltDomain], capsys: pytest.CaptureFixture[str]
) -> None:
    """Schema 3 (no repositories table): migrated, then the repository it
    is opened with is recorded, without a word (nothing was recorded to
    compare with, so nothing is passed over)."""
    a, _ = two
    with contextlib.closing(sqlite3.connect(a.state_db)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 5
        db.execute("DROP TABLE repositories")
        db.execute("PRAGMA user_version = 4")
        db.commit()
    rc, out, err = cli_in_process(capsys, _config(a), "--json", "list")
    assert rc == 0 and err == "", err
    assert {x["id"] for x in json.loads(out)} == set(a.ids)
    assert _recorded(a) == {str(a.root): _identity(a.root)}
    assert oct((a.root / IDENTITY).stat().st_mode & 0o777) == "0o600"


def test_an_empty_root_is_not_given_an_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty backup_root (a share not mounted yet) is left alone: the
    repository mounted there later is adopted, not refused."""
    root = tmp_path / "repo"
    root.mkdir()
    config = tmp_path / "vb.yaml"
    config.write_text(
        f"state_dir: {tmp_path / 'state'}\nbackup_root: {root}\nruntime_dir: {tmp_path / 'run'}\n"
        "priority: normal\n"
    )
    rc, _, err = cli_in_process(capsys, config, "list")
    assert rc == 0, err
    assert not (root / IDENTITY).exists()


def test_the_daemon_refuses_to_start_on_another_repositorys_catalogue(
    two: tuple[BuiltDomain, BuiltDomain], capsys: pytest.CaptureFixture[str]
) -> None:
    """The daemon acts on its catalogue's rows at start (leftovers,
    schedules, prunes): it exits 1 naming the catalogue instead. libvirt's
    in-process test driver stands in for libvirtd: the refusal comes
    before anything is asked of it."""
    a, b = two
    assert cli_in_process(capsys, _config(a), "list")[0] == 0
    for f in b.state_db.parent.glob("state.db*"):
        f.unlink()
    for f in a.state_db.parent.glob("state.db*"):
        shutil.copy2(f, b.state_db.parent / f.name)
    config = _config(b)
    policies = b.tmp / "policies"
    policies.mkdir()
    config.write_text(
        config.read_text() + f"libvirt_uri: 'test:///default'\npolicy_dirs: [{policies}]\n"
    )
    ran = subprocess.run(
        [sys.executable, "-m", "virtbackupd.daemon.main", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ran.returncode == 1, ran.stderr
    last = ran.stderr.strip().splitlines()[-1]
    assert last.startswith(f"virtbackupd: {b.state_db}: this catalogue describes"), last
    assert _identity(a.root) in last and "`virtbackup reindex`" in last, last
