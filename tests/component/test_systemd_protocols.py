"""sd_notify and journald's native protocol, checked on the wire against
datagram sockets of the test's own (no systemd needed)."""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from virtbackupd.adapters.journald import JournaldRenderer, JournalSender, encode, message_id
from virtbackupd.adapters.sd_notify import Notifier, watchdog_interval


@pytest.fixture
def dgram(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    yield s, path
    s.close()


def test_sd_notify_messages(dgram: tuple[socket.socket, str]) -> None:
    sock, path = dgram
    n = Notifier(path)
    assert n.ready("idle, 3 domains")
    assert sock.recv(4096).decode().split("\n") == [
        "READY=1",
        f"MAINPID={os.getpid()}",
        "STATUS=idle, 3 domains",
    ]
    n.status("backing up web01: 40%")
    assert sock.recv(4096) == b"STATUS=backing up web01: 40%"
    n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    with pytest.raises(ValueError, match="newline"):
        n.status("two\nlines")
    n.close()


def test_sd_notify_never_waits_for_a_manager_that_does_not_read(
    dgram: tuple[socket.socket, str],
) -> None:
    """Its socket's queue fills (net.unix.max_dgram_qlen, 10 by default):
    further messages are dropped at once, never waited for (a blocking send
    stopped the daemon's event loop), and flow again once it reads."""
    sock, path = dgram
    n = Notifier(path)
    try:
        # More than any queue holds: 10 by default, 512 where a systemd set
        # it (the systemd test runs one), and the receive buffer's bytes.
        started = time.monotonic()
        sent = [n.status(f"backing up web{i:04}") for i in range(5000)]
        assert time.monotonic() - started < 5
        assert sent[0] and not all(sent)
        assert n.dropped == sent.count(False)
        assert sock.recv(4096) == b"STATUS=backing up web0000"
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while sock.recv(4096):
                pass
        assert n.status("idle")
        sock.settimeout(5)
        assert sock.recv(4096) == b"STATUS=idle"
    finally:
        n.close()


def test_sd_notify_abstract_socket_and_absent_manager() -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"virtbackupd-test-{os.getpid()}"
    s.bind("\0" + name)
    s.settimeout(5)
    n = Notifier("@" + name)
    try:
        assert n.reloading()
        assert s.recv(100) == b"RELOADING=1"
    finally:
        n.close()
        s.close()
    assert not Notifier("").ready(), "without $NOTIFY_SOCKET nothing is sent"


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert watchdog_interval() is None


def _parse(data: bytes) -> dict[str, bytes]:
    """A decoder written from the protocol description, for the test."""
    out, pos = {}, 0
    while pos < len(data):
        nl = data.index(b"\n", pos)
        line = data[pos:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            out[k.decode()] = v
            pos = nl + 1
        else:
            (n,) = struct.unpack("<Q", data[nl + 1 : nl + 9])
            out[line.decode()] = data[nl + 9 : nl + 9 + n]
            assert data[nl + 9 + n : nl + 10 + n] == b"\n"
            pos = nl + 10 + n
    return out


def test_journal_wire_format_with_multiline_values() -> None:
    raw = encode({"MESSAGE": "two\nlines", "domain": "web01", "backup_id": "b1"})
    assert raw.startswith(b"MESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\n")
    assert _parse(raw) == {"MESSAGE": b"two\nlines", "DOMAIN": b"web01", "BACKUP_ID": b"b1"}


def test_structlog_events_become_journal_fields(dgram: tuple[socket.socket, str]) -> None:
    sock, path = dgram
    sender = JournalSender(path)
    renderer = JournaldRenderer(sender)
    logger = structlog.wrap_logger(
        structlog.ReturnLogger(),
        processors=[structlog.processors.add_log_level, renderer],
    )
    logger.bind(domain="web01", backup_id="b1", checkpoint="virtbackupd-b1").error(
        "backup failed", backup_level="incremental", error="disk on fire"
    )
    sender.close()
    fields = _parse(sock.recv(65536))
    assert fields["PRIORITY"] == b"3"
    assert fields["DOMAIN"] == b"web01"
    assert fields["BACKUP_ID"] == b"b1"
    assert fields["CHECKPOINT"] == b"virtbackupd-b1"
    assert fields["LEVEL"] == b"incremental"
    assert fields["MESSAGE_ID"] == message_id("backup failed").encode()
    assert fields["SYSLOG_IDENTIFIER"] == b"virtbackupd"
    assert fields["MESSAGE"].startswith(b"backup failed ")


def test_large_entries_go_through_a_sealed_memfd(dgram: tuple[socket.socket, str]) -> None:
    sock, path = dgram
    sender = JournalSender(path)
    sender.send({"MESSAGE": "x" * (4 * 1024 * 1024)})
    sender.close()
    _, ancdata, _, _ = sock.recvmsg(1024, socket.CMSG_SPACE(4))
    fds = array.array("i")
    fds.frombytes(ancdata[0][2])
    with os.fdopen(fds[0], "rb") as f:
        f.seek(0)  # the sender's writes moved the shared offset; journald maps it
        assert _parse(f.read())["MESSAGE"] == b"x" * (4 * 1024 * 1024)
