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
from pathlib import Path

import pytest

from testbed.cli import cli_in_process
from testbed.repo_builder import BuiltDomain, MiB
from virtbackupd.adapters.repository import IDENTITY
from virtbackupd.adapters.store import Store


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


def test_the_recorded_root_found_empty_and_a_new_catalogue_are_left_alone(
    built: BuiltDomain, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    b = built
    config = _config(tmp_path / "vb.yaml", b.state_db.parent, b.root, b.runtime)
    assert cli_in_process(capsys, config, "list")[0] == 0
    b.root.rename(tmp_path / "away")  # the share not mounted: the same path, empty
    b.root.mkdir()
    rc, _, err = cli_in_process(capsys, config, "list")
    assert rc == 0, err
    fresh = _config(tmp_path / "fresh.yaml", tmp_path / "s3", tmp_path / "b3", tmp_path / "r3")
    (tmp_path / "b3").mkdir()
    rc, _, err = cli_in_process(capsys, fresh, "list")
    assert rc == 0, err


def test_a_repository_id_that_is_a_folder_is_named_by_path(
    built: BuiltDomain, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    b = built
    (b.root / IDENTITY).unlink(missing_ok=True)
    (b.root / IDENTITY).mkdir()
    config = _config(tmp_path / "vb.yaml", b.state_db.parent, b.root, b.runtime)
    rc, _, err = cli_in_process(capsys, config, "list")
    assert rc == 1, err
    assert f"{b.root / IDENTITY}: is not a regular file" in err, err
    assert len(err.strip().splitlines()) == 1, err
