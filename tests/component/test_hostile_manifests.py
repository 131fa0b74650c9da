"""A manifest is untrusted input (issue 23, item 5): every field is
checked where it is read, and every command refuses a manifest that fails
in one line naming the file and the field. Prune crashed with tracebacks
on an `id` that is not its folder, an absolute `file` outside the
repository (which it then exported), a `parent` path and a negative size.
Real repositories (testbed.repo_builder), the real CLI as a process."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from testbed.cli import cli_in_process
from testbed.repo_builder import BuiltDomain, MiB, build_chain, copy_built, write_cli_config
from virtbackupd.adapters.repository import MANIFEST, RepositoryFormatError, read_manifest

Edit = Callable[[dict[str, Any]], None]


def _disk(key: str, value: object) -> Edit:
    def edit(m: dict[str, Any]) -> None:
        m["disks"][0][key] = value

    return edit


def _top(key: str, value: object) -> Edit:
    def edit(m: dict[str, Any]) -> None:
        m[key] = value

    return edit


def _uuid(m: dict[str, Any]) -> None:
    m["domain"]["uuid"] = "../../etc"


HOSTILE: list[tuple[str, Edit, str]] = [
    ("id is not its folder", _top("id", "20200101T000000.000Z-beef"), "field id:"),
    ("id is a path", _top("id", "../x"), "field id:"),
    ("parent is a path", _top("parent", "../../etc"), "field parent:"),
    ("file is absolute", _disk("file", "/etc/passwd"), "field disks[0].file:"),
    ("file climbs out", _disk("file", "../other/vda.qcow2"), "field disks[0].file:"),
    ("file is hidden", _disk("file", ".vda.qcow2"), "field disks[0].file:"),
    ("pieces is absolute", _disk("pieces", "/etc/shadow"), "field disks[0].pieces:"),
    ("disk name is a path", _disk("name", "../vda"), "field disks[0].name:"),
    ("negative size", _disk("virtual_size", -1), "field disks[0].virtual_size:"),
    ("zero size", _disk("virtual_size", 0), "field disks[0].virtual_size:"),
    ("negative bytes", _disk("bytes_written", -5), "field disks[0].bytes_written:"),
    ("grid not a power of two", _disk("grid", 3 * MiB), "field disks[0].grid:"),
    ("absorbed is a path", _top("absorbed", ["../x"]), "field absorbed:"),
    ("domain uuid is a path", _uuid, "field domain.uuid:"),
    ("a size past SQLite's integers", _disk("virtual_size", 2**70), "field disks[0].virtual_size:"),
    ("a range before the disk", _disk("ranges", [[-4096, 4096, "data"]]), "field disks[0].ranges:"),
    ("a range past the disk", _disk("ranges", [[2**40, 4096, "data"]]), "field disks[0].ranges:"),
]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BuiltDomain]:
    """One repository for all cases (each works on its own copy)."""
    tmp = tmp_path_factory.mktemp("template")
    return tmp, asyncio.run(build_chain(tmp, 3))


@pytest.mark.parametrize(("edit", "field"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_a_hostile_manifest_field_is_refused_where_it_is_read(
    template: tuple[Path, BuiltDomain],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    edit: Edit,
    field: str,
) -> None:
    b = copy_built(template, tmp_path)
    folder = b.folder(b.ids[1])
    path = folder / MANIFEST
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(RepositoryFormatError) as exc:
        read_manifest(folder)
    assert str(exc.value).startswith(f"{path}: {field}"), exc.value

    # Every command: no traceback, nothing outside the repository touched.
    config = write_cli_config(b, tmp_path)
    passwd = Path("/etc/passwd").read_bytes()
    to = str(tmp_path / "r")
    runs = {
        "list": cli_in_process(capsys, config, "list", b.name),
        "verify": cli_in_process(capsys, config, "verify", b.name, "--backup", b.ids[1]),
        "restore": cli_in_process(capsys, config, "restore", b.name, "--backup", b.ids[1],
                                  "--to", to),
        "prune": cli_in_process(capsys, config, "prune", b.name),
        "reindex": cli_in_process(capsys, config, "reindex"),
    }  # fmt: skip
    for name, run in runs.items():
        assert "Traceback" not in run.stderr, (name, run.stderr)
    for name in ("verify", "restore"):
        assert runs[name].returncode in (1, 2), (name, runs[name])
        assert str(path) in runs[name].stderr or str(path) in runs[name].stdout, (name, runs[name])
    assert Path("/etc/passwd").read_bytes() == passwd
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def _dev_zero(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _nested(path: Path) -> None:
    path.write_text("[" * 100_000 + "]" * 100_000)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("spoil", "words"),
    [(_dev_zero, "cannot read"), (_fifo, "not a regular file"), (_nested, "nested too deeply")],
    ids=["a link to /dev/zero", "a FIFO", "nested 100000 deep"],
)
def test_a_manifest_that_is_no_file_of_ours_blocks_nothing(
    template: tuple[Path, BuiltDomain],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    spoil: Callable[[Path], None],
    words: str,
) -> None:
    """A manifest that is a link to /dev/zero or a FIFO hung every command
    (and the daemon's start, deaf to SIGTERM); a deeply nested one was a
    RecursionError traceback from every command. It is one unreadable
    backup: named, and the others still listed and restorable."""
    b = copy_built(template, tmp_path)
    path = b.folder(b.ids[2]) / MANIFEST
    spoil(path)
    with pytest.raises(RepositoryFormatError, match=words):
        read_manifest(path.parent)
    config = tmp_path / "vb.yaml"
    config.write_text(
        f"state_dir: {b.state_db.parent}\nbackup_root: {b.root}\nruntime_dir: {b.runtime}\n"
        "priority: normal\n"
    )
    for args in (["list", b.name], ["verify", b.name]):
        ran = cli_in_process(capsys, config, *args)
        assert str(path) in ran.stderr + ran.stdout, (args, ran.stderr)
    for f in b.state_db.parent.glob("state.db*"):
        f.unlink()  # the catalogue lost: reindex names the file and goes on
    ran = cli_in_process(capsys, config, "reindex")
    assert ran.returncode == 0 and str(path) in ran.stderr, ran.stderr
    ran = cli_in_process(
        capsys, config, "restore", b.name, "--backup", b.ids[1], "--to", str(tmp_path / "r")
    )
    assert ran.returncode == 0, ran.stderr


def test_a_chain_with_a_folder_deleted_by_hand_is_one_line_from_prune(
    template: tuple[Path, BuiltDomain], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`rm -rf` of the oldest backup, then prune: a ValueError traceback
    ("backups build on X, which is not in the repository")."""
    b = copy_built(template, tmp_path)
    shutil.rmtree(b.folder(b.ids[0]))
    (b.state_db.parent / "state.db").unlink()
    config = write_cli_config(b, tmp_path)
    assert cli_in_process(capsys, config, "reindex").returncode == 0
    for extra in (["--dry-run"], []):
        ran = cli_in_process(capsys, config, "prune", b.name, *extra)
        assert ran.returncode == 1, ran.stderr
        last = ran.stderr.strip().splitlines()[-1]
        assert "which is not in the repository" in last and "nothing was pruned" in last, last
    assert sorted(p.name for p in b.folder(b.ids[1]).parent.iterdir() if p.name[0] != ".") == [
        b.ids[1],
        b.ids[2],
    ]


@pytest.mark.parametrize("kind", ["partial", "job_dir"])
def test_an_undo_log_never_deletes_what_is_not_its_backups_own(
    template: tuple[Path, BuiltDomain],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    kind: str,
) -> None:
    """Taking an undo log back deletes folders as root: a planted log
    naming any folder made the next command of the domain delete it."""
    b = copy_built(template, tmp_path)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me\n")
    undo = b.folder(b.ids[0]).parent / ".undo"
    undo.mkdir(exist_ok=True)
    backup_id = "20261207T235959.000Z-dead"
    (undo / f"{backup_id}.json").write_text(
        json.dumps(
            {
                "format": "virtbackupd-undo",
                "format_version": 1,
                "backup_id": backup_id,
                "domain": {"name": b.name, "uuid": b.uuid},
                "level": "incremental",
                "started": "2026-12-07T23:59:59+00:00",
                "steps": [{"do": kind, "path": str(victim)}],
                "parent": None,
            }
        )
    )
    config = tmp_path / "vb.yaml"
    config.write_text(
        f"state_dir: {b.state_db.parent}\nbackup_root: {b.root}\nruntime_dir: {b.runtime}\n"
        "priority: normal\n"
    )
    to = str(tmp_path / "r")
    ran = cli_in_process(capsys, config, "restore", b.name, "--backup", b.ids[1], "--to", to)
    assert ran.returncode == 0, ran.stderr
    assert (victim / "precious").read_text() == "keep me\n"
    assert "undo log refused" in ran.stderr and f"{backup_id}.json" in ran.stderr, ran.stderr


def test_a_prune_journal_never_names_a_path(
    template: tuple[Path, BuiltDomain], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A journal's replay renames and deletes the folders its ids name, as
    root: an id that is a path (`../victim`) is refused, by name."""
    b = copy_built(template, tmp_path)
    domain_dir = b.folder(b.ids[0]).parent
    victim = domain_dir.parent.parent / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me\n")
    journal = domain_dir / ".prune-journal.json"
    journal.write_text(
        json.dumps(
            {
                "format": "virtbackupd-prune-journal",
                "format_version": 1,
                "ops": [{"op": "remove", "id": "../../victim"}],
                "checkpoints": {},
            }
        )
    )
    config = write_cli_config(b, tmp_path)
    ran = cli_in_process(capsys, config, "prune", b.name)
    assert ran.returncode == 1, ran.stderr
    assert f"{journal}: field ops[0].id:" in ran.stderr, ran.stderr
    assert (victim / "precious").read_text() == "keep me\n"


@pytest.mark.parametrize("field", ["state_dir", "opened"])
def test_a_planted_hold_is_never_acted_on(
    template: tuple[Path, BuiltDomain],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    field: str,
) -> None:
    """Releasing a hold deletes its state folder and gives back the modes
    of the folders it opened, as root: a planted mount hold whose mount is
    "gone" made `status` delete the folder it named."""
    b = copy_built(template, tmp_path)
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    victim.chmod(0o700)
    (victim / "precious").write_text("keep me\n")
    holds = b.folder(b.ids[0]).parent / ".holds"
    holds.mkdir(exist_ok=True)
    hold = {
        "format": "virtbackupd-hold",
        "format_version": 1,
        "id": "h1",
        "kind": "mount",
        "domain_uuid": b.uuid,
        "backup_id": b.ids[1],
        "created": "2026-12-07T23:59:59+00:00",
        "detail": "planted",
        "new_domain": None,
        "disks": [],
        "directory": str(tmp_path / "nowhere"),
        "helper_pid": None,
        "state_dir": str(victim) if field == "state_dir" else None,
        "devices": [],
        "rate": 0,
        "opened": [str(victim)] if field == "opened" else [],
    }
    (holds / "h1.json").write_text(json.dumps(hold))
    config = tmp_path / "vb.yaml"
    config.write_text(
        f"state_dir: {b.state_db.parent}\nbackup_root: {b.root}\nruntime_dir: {b.runtime}\n"
        "priority: normal\n"
    )
    ran = cli_in_process(capsys, config, "status")
    assert ran.returncode == 0, ran.stderr
    assert (victim / "precious").read_text() == "keep me\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o700
    assert "hold refused" in ran.stderr and "h1.json" in ran.stderr, ran.stderr
