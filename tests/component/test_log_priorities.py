"""An operator's cancel is a notice (syslog priority 5), between info and
warning: our loggers have `notice`, it reaches the journal as PRIORITY=5
and JSON/console output as level "notice", and a level above it filters
it out."""

from __future__ import annotations

import json
import logging
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from virtbackupd import logs
from virtbackupd.adapters.journald import JournaldRenderer, JournalSender


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "journal.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def _fields(raw: bytes) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    while raw:
        line, _, rest = raw.partition(b"\n")
        if b"=" in line:
            k, _, v = line.partition(b"=")
            out[k.decode()] = v
            raw = rest
        else:  # NAME\n<u64 length><bytes>\n
            (n,) = struct.unpack("<Q", rest[:8])
            out[line.decode()] = rest[8 : 8 + n]
            raw = rest[9 + n :]
    return out


def test_notice_is_journal_priority_5(journal: tuple[socket.socket, str]) -> None:
    sock, path = journal
    sender = JournalSender(path)
    logger = structlog.wrap_logger(
        structlog.ReturnLogger(),
        processors=[structlog.processors.add_log_level, JournaldRenderer(sender)],
        wrapper_class=logs.wrapper_class(logging.INFO),
    )
    logger.bind(domain="web01", backup_id="b1").notice(
        "backup cancelled", reason="cancelled by the operator"
    )
    sender.close()
    fields = _fields(sock.recv(65536))
    assert fields["PRIORITY"] == b"5"
    assert fields["DOMAIN"] == b"web01" and fields["BACKUP_ID"] == b"b1"
    assert fields["EVENT"] == b"backup cancelled"


def test_notice_in_json_and_its_filtering(capsys: pytest.CaptureFixture[str]) -> None:
    log = structlog.get_logger("test")
    try:
        logs.configure("info", "json")
        log.bind(domain="web01").notice("backup cancelled", backup_id="b1")
        line = json.loads(capsys.readouterr().err)
        assert line["level"] == "notice" and line["domain"] == "web01", line
        logs.configure("warning", "json")
        log.notice("not shown")
        assert capsys.readouterr().err == ""
    finally:
        logs.configure()
