"""Reading /proc/PID/stat and the export folders' owner records: the
fields after a command name holding spaces and parentheses, and records
that are not what the writer writes."""

from __future__ import annotations

import pytest

from virtbackupd.adapters.nbd_folders import FolderRecord
from virtbackupd.adapters.procfs import ProcessId, name_lock_holders, parse_stat

TAIL = " ".join(["0"] * 17 + ["4242", "1", "2"])  # fields 5-24; 22 is the start time


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (f"17 (qemu-nbd) S 1 {TAIL}", ("S", 1, 4242)),
        (f"18 (a b) c) (x) Z 99 {TAIL}", ("Z", 99, 4242)),  # the name may hold ") "
        (f"19 () R 7 {TAIL}", ("R", 7, 4242)),
    ],
)
def test_stat_fields_follow_the_last_parenthesis(line: str, expected: tuple[str, int, int]) -> None:
    assert parse_stat(line) == expected


@pytest.mark.parametrize("line", ["", "17 qemu-nbd S 1 2", "17 (x) S 1 2 3"])
def test_a_line_that_is_not_a_stat_line_is_refused(line: str) -> None:
    with pytest.raises(ValueError):
        parse_stat(line)


GOOD = {"pid": 10, "start": 5, "boot": "b"}


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        {"owner": GOOD},  # no socket
        {"owner": GOOD, "socket": 3},
        {"owner": {**GOOD, "pid": 0}, "socket": "/s"},
        {"owner": {**GOOD, "pid": "10"}, "socket": "/s"},
        {"owner": {**GOOD, "start": -1}, "socket": "/s"},
        {"owner": {**GOOD, "boot": None}, "socket": "/s"},
        {"owner": GOOD, "helper": "x", "socket": "/s"},
    ],
)
def test_an_owner_record_not_as_written_is_refused(data: object) -> None:
    with pytest.raises(ValueError):
        FolderRecord.from_json(data)


def test_an_owner_record_reads_back() -> None:
    rec = FolderRecord(ProcessId(10, 5, "b"), ProcessId(11, 6, "b"), "/run/nbd-x/nbd.sock")
    assert FolderRecord.from_json(rec.as_json()) == rec
    bare = FolderRecord(ProcessId(10, 5, "b"), None, "/s")
    assert FolderRecord.from_json(bare.as_json()) == bare


def test_a_message_about_no_lock_is_left_as_it_is() -> None:
    assert (
        name_lock_holders("Could not open 'x': No such file") == "Could not open 'x': No such file"
    )
