"""A failed attempt's record (``<domain>/.attempts/<id>.json``) is
untrusted input like a manifest (issue 23): it was read bounded but its
fields were taken as they were, so `reindex` (and every command's
catalogue check) recorded a row whose id was a path, that belonged to
another domain or whose parent was a path. Each field is checked where it
is read; a bad file is named with its field, and no command crashes or
records it. Real repositories (testbed.repo_builder), the real CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from testbed.cli import cli_in_process
from testbed.repo_builder import BuiltDomain, build_chain, copy_built, write_cli_config
from virtbackupd.adapters.repository import ATTEMPTS_DIR, RepositoryFormatError

Edit = Callable[[dict[str, Any]], None]
ATTEMPT_ID = "20261207T120000.000Z-abcd"
OLD_ID = "20200101T000000.000Z-beef"
OTHER_UUID = "0b9f2f44-5d3e-4c55-9d4e-2f6a1d2c3b4a"


def _top(key: str, value: object) -> Edit:
    def edit(a: dict[str, Any]) -> None:
        a[key] = value

    return edit


def _domain(key: str, value: object) -> Edit:
    def edit(a: dict[str, Any]) -> None:
        a["domain"][key] = value

    return edit


HOSTILE: list[tuple[str, Edit, str]] = [
    ("backup_id is a path", _top("backup_id", "../../x"), "field backup_id:"),
    ("backup_id is not its file", _top("backup_id", OLD_ID), "field backup_id:"),
    ("parent is a path", _top("parent", "../../etc"), "field parent:"),
    ("domain uuid is a path", _domain("uuid", "../../etc"), "field domain.uuid:"),
    ("domain uuid is another domain", _domain("uuid", OTHER_UUID), "field domain.uuid:"),
    ("domain name is empty", _domain("name", ""), "field domain.name:"),
    ("domain name holds a newline", _domain("name", "a\nvirtbackup: ok"), "field domain.name:"),
    ("domain name is huge", _domain("name", "n" * 100_000), "field domain.name:"),
    ("error is huge", _top("error", "e" * 200_000), "field error:"),
    ("level is unknown", _top("level", "differential"), "field level:"),
    ("started is no time", _top("started", "yesterday"), "field started:"),
    ("format is another file's", _top("format", "virtbackupd-undo"), "field format:"),
    ("format is newer", _top("format_version", 99), "field format_version:"),
    ("format is missing", lambda a: a.pop("format"), "field format:"),
]  # fmt: skip


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BuiltDomain]:
    tmp = tmp_path_factory.mktemp("template")
    return tmp, asyncio.run(build_chain(tmp, 2))


def _attempt(b: BuiltDomain) -> dict[str, Any]:
    """A well-formed record, as record_attempt writes it."""
    return {
        "format": "virtbackupd-attempt",
        "format_version": 1,
        "backup_id": ATTEMPT_ID,
        "domain": {"name": b.name, "uuid": b.uuid},
        "level": "incremental",
        "started": "2026-12-07T12:00:00+00:00",
        "finished": "2026-12-07T12:00:05+00:00",
        "error": "the guest went away",
        "parent": b.ids[1],
    }


def _catalogued(b: BuiltDomain) -> set[str]:
    with contextlib.closing(sqlite3.connect(b.state_db)) as db:
        return {str(r[0]) for r in db.execute("SELECT id FROM backups")}


def test_a_well_formed_attempt_is_recorded(
    template: tuple[Path, BuiltDomain], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The table's baseline: the unedited record is read and catalogued."""
    b = copy_built(template, tmp_path)
    folder = b.root / b.uuid / ATTEMPTS_DIR
    folder.mkdir()
    (folder / f"{ATTEMPT_ID}.json").write_text(json.dumps(_attempt(b)))
    assert [a.backup_id for a in b.repo.attempts(b.uuid)] == [ATTEMPT_ID]
    config = write_cli_config(b, tmp_path)
    rc, text = cli_in_process(capsys, config, "reindex").joined()
    assert rc == 0 and "warning" not in text, text
    assert ATTEMPT_ID in _catalogued(b)


@pytest.mark.parametrize(("edit", "field"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_a_hostile_attempt_field_is_refused_where_it_is_read(
    template: tuple[Path, BuiltDomain],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    edit: Edit,
    field: str,
) -> None:
    b = copy_built(template, tmp_path)
    folder = b.root / b.uuid / ATTEMPTS_DIR
    folder.mkdir()
    path = folder / f"{ATTEMPT_ID}.json"
    data = _attempt(b)
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(RepositoryFormatError) as exc:
        b.repo.attempts(b.uuid)
    assert str(exc.value).startswith(f"{path}: {field}"), exc.value
    assert len(str(exc.value)) < 400 and "\n" not in str(exc.value), exc.value
    problems: list[str] = []
    assert b.repo.attempts(b.uuid, problems) == [] and len(problems) == 1

    config = write_cli_config(b, tmp_path)
    before = _catalogued(b)
    runs = {
        "list": cli_in_process(capsys, config, "list", b.name).joined(),
        "status": cli_in_process(capsys, config, "status").joined(),
        "verify": cli_in_process(capsys, config, "verify", b.name, "--backup", b.ids[1]).joined(),
        "restore": cli_in_process(capsys, config, "restore", b.name, "--backup", b.ids[1],
                                  "--to", str(tmp_path / "r")).joined(),
        "prune": cli_in_process(capsys, config, "prune", b.name, "--dry-run").joined(),
        "reindex": cli_in_process(capsys, config, "reindex").joined(),
    }  # fmt: skip
    for name, (rc, text) in runs.items():
        assert "Traceback" not in text, (name, text)
        # The bad record is named (with its field), never catalogued, and
        # blocks nothing: the domain's backups still verify and restore.
        assert f"{path}: {field}" in text, (name, text)
        assert rc == 0, (name, text)
    assert _catalogued(b) == before
    for f in b.state_db.parent.glob("state.db*"):
        f.unlink()
    rc, text = cli_in_process(capsys, config, "reindex").joined()
    assert rc == 0 and f"{path}: {field}" in text, text
    assert _catalogued(b) == set(b.ids)
