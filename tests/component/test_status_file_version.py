"""daemon.json checks its own format version where it is read: a file of a
newer daemon is not read as if it were ours (its fields may mean other
things) but named in one line, with its version and the one this
virtbackup reads; a file without the field (older daemons wrote version 1)
is read as ever."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from virtbackupd.cli.status import Reach, render
from virtbackupd.daemon.status_file import STATUS_FILE, DaemonStatus, probe_status, write_status


def running(tmp_path: Path, **changes: object) -> Path:
    """A status file of a daemon that runs (this process), with `changes`
    to its top-level fields (None: the field removed)."""
    write_status(tmp_path, DaemonStatus(os.getpid(), "t", "qemu:///system", True, {}))
    path = tmp_path / STATUS_FILE
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    return path


def test_a_status_file_of_a_newer_format_is_named_in_one_line(tmp_path: Path) -> None:
    path = running(tmp_path, format=2)
    daemon, why = probe_status(tmp_path)
    assert daemon is None
    assert why == (
        f"{path}: written in status file format 2, newer than this virtbackup reads (up to 1); "
        "run the virtbackup of the daemon's version"
    ), why
    text = render(None, [], [], [], as_json=False, reach=Reach("qemu:///system", None, why))
    assert text.splitlines()[0].startswith(f"daemon: NOT known: {why}; "), text


@pytest.mark.parametrize(
    ("fmt", "said"),
    [("2", "field format: '2' is not a int"), (0, "unknown status file format 0")],
)
def test_a_status_file_format_that_is_no_version_is_named(
    tmp_path: Path, fmt: object, said: str
) -> None:
    path = running(tmp_path, format=fmt)
    assert probe_status(tmp_path) == (None, f"{path}: {said}")


def test_a_status_file_of_this_format_or_before_the_field_is_read(tmp_path: Path) -> None:
    running(tmp_path)
    daemon, why = probe_status(tmp_path)
    assert why is None and daemon is not None and daemon.pid == os.getpid()
    running(tmp_path, format=None)
    daemon, why = probe_status(tmp_path)
    assert why is None and daemon is not None and daemon.pid == os.getpid()
