"""A catalogue copied beside an EMPTY backup_root (hostile tester, issue
23): the root had no id to compare, so the catalogue was taken as is and
list, verify and restore acted on the other repository's folders, named
by absolute path in its rows. Refused in one line naming the catalogue,
the repository it records (id and root) and the configured root, with
`virtbackup reindex`. Left as they were: the recorded root itself found
empty (a share not mounted) and a new catalogue that records nothing.
Also: a `.repository.json` that is a folder is named by path, not by a
file descriptor number."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from testbed.repo_builder import BuiltDomain, MiB
from virtbackupd.adapters.repository import IDENTITY
from virtbackupd.adapters.store import Store
from virtbackupd.cli.main import main


@pytest.fixture
def built(tmp_path: Path) -> BuiltDomain:
    async def build() -> BuiltDomain:
        b = BuiltDomain(tmp_path, {"vda": 4 * MiB})
        async with Store.open(b.state_db) as store:
            b.write("vda", 0, MiB, 0x11)
            await b.backup(store)
        return b

    return asyncio.run(build())


def _config(path: Path, state: Path, root: Path, runtime: Path) -> Path:
    path.write_text(
        f"state_dir: {state}\nbackup_root: {root}\nruntime_dir: {runtime}\npriority: normal\n"
    )
    return path


def _cli(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["-c", str(config), *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, out + err
    return rc, out, err


def test_a_catalogue_copied_beside_an_empty_root_is_refused(
    built: BuiltDomain, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    b = built
    config = _config(tmp_path / "vb.yaml", b.state_db.parent, b.root, b.runtime)
    assert _cli(capsys, config, "list")[0] == 0  # records the repository's id
    state2, root2 = tmp_path / "state2", tmp_path / "backups2"
    state2.mkdir()
    root2.mkdir()
    for f in b.state_db.parent.glob("state.db*"):
        shutil.copy2(f, state2 / f.name)
    config2 = _config(tmp_path / "vb2.yaml", state2, root2, tmp_path / "run2")
    to = tmp_path / "r"
    for args in (
        ["list"],
        ["verify", b.name, "--backup", b.ids[0]],
        ["restore", b.name, "--backup", b.ids[0], "--to", str(to)],
    ):
        rc, out, err = _cli(capsys, config2, *args)
        assert rc == 1, (args, rc, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, (args, err)
        line = lines[0]
        assert str(state2 / "state.db") in line and str(b.root) in line, line
        assert str(root2) in line and "`virtbackup reindex`" in line, line
        assert b.ids[0] not in out, (args, out)
    assert not to.exists()
    rc, _, err = _cli(capsys, config2, "reindex")
    assert rc == 0 and "moved aside to" in err, err
    rc, out, err = _cli(capsys, config2, "list")
    assert rc == 0 and b.ids[0] not in out, (out, err)


def test_the_recorded_root_found_empty_and_a_new_catalogue_are_left_alone(
    built: BuiltDomain, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    b = built
    config = _config(tmp_path / "vb.yaml", b.state_db.parent, b.root, b.runtime)
    assert _cli(capsys, config, "list")[0] == 0
    b.root.rename(tmp_path / "away")  # the share not mounted: the same path, empty
    b.root.mkdir()
    rc, _, err = _cli(capsys, config, "list")
    assert rc == 0, err
    fresh = _config(tmp_path / "fresh.yaml", tmp_path / "s3", tmp_path / "b3", tmp_path / "r3")
    (tmp_path / "b3").mkdir()
    rc, _, err = _cli(capsys, fresh, "list")
    assert rc == 0, err


def test_a_repository_id_that_is_a_folder_is_named_by_path(
    built: BuiltDomain, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    b = built
    (b.root / IDENTITY).unlink(missing_ok=True)
    (b.root / IDENTITY).mkdir()
    config = _config(tmp_path / "vb.yaml", b.state_db.parent, b.root, b.runtime)
    rc, _, err = _cli(capsys, config, "list")
    assert rc == 1, err
    assert f"{b.root / IDENTITY}: is not a regular file" in err, err
    assert len(err.strip().splitlines()) == 1, err
