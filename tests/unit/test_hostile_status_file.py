"""Hostile daemon.json: a status file with huge, negative or mistyped
values is "no daemon" or "not known" in one line, never a traceback
(docs/operations.md, Status; docs/cli.md, status). Found by issue 25's
hostile tester; these failed before (OverflowError, TypeError, pid 0 taken
for a live daemon)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from virtbackupd.daemon.status_file import probe_status

BASE: dict[str, Any] = {
    "format": 1,
    "started": "2026-12-07T20:00:00+00:00",
    "libvirt_uri": "qemu:///system",
    "libvirt_connected": True,
    "domains": {},
}


@pytest.mark.parametrize(
    "pid",
    [10**30, 1.5e300, 0, -1],
    ids=["huge", "float", "zero", "negative"],
)
def test_a_pid_no_daemon_can_have_is_not_a_running_daemon(tmp_path: Path, pid: object) -> None:
    (tmp_path / "daemon.json").write_text(json.dumps({**BASE, "pid": pid}))
    status, why = probe_status(tmp_path)  # raised OverflowError/TypeError for huge/float
    assert status is None  # pid 0 / -1: os.kill(0|-1, 0) succeeds, so "daemon: pid 0" was shown
    assert why is None or "daemon.json" in why


def test_a_mistyped_queued_field_is_refused_where_it_is_read(tmp_path: Path) -> None:
    uuid = "93201dd2-29dd-4456-8d88-3394d2d1a138"
    domain = {"name": "x", "queued": {"a": 1}, "policy": {"x": 1}, "retrying": 5}
    doc = {**BASE, "pid": os.getpid(), "domains": {uuid: domain}}
    (tmp_path / "daemon.json").write_text(json.dumps(doc))
    status, why = probe_status(tmp_path)
    # Accepted today; `virtbackup status` then dies in build_rows with
    # "TypeError: unhashable type: 'dict'" (internal error, exit 1).
    assert status is None and why is not None and "queued" in why


def test_a_huge_number_in_a_file_of_ours_is_cut_in_the_error_line(tmp_path: Path) -> None:
    """A hostile file's 400-digit number (or megabyte string) stays a short
    line in the error (it was printed whole)."""
    from virtbackupd.core.repository_format.codec import Fields, FormatError

    for value in (10**400, "x" * 100_000):
        with pytest.raises(FormatError) as raised:
            Fields({"n": value}, tmp_path / "f.json").integer("n")
        said = str(raised.value)
        assert len(said) < 200 and "characters)" in said, said
