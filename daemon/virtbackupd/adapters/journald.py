"""Logging to journald with native structured fields (the journal's
native protocol: datagrams to /run/systemd/journal/socket).

Each field is ``NAME=value\\n``; a value holding a newline is sent as
``NAME\\n`` + its length (64-bit little endian) + the bytes + ``\\n``. A
message too large for one datagram goes through a sealed memfd passed with
SCM_RIGHTS, as the protocol allows.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import re
import socket
import struct
import uuid
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

JOURNAL_SOCKET = "/run/systemd/journal/socket"

#: Stable MESSAGE_ID namespace: the id of an event kind is uuid5(this, event).
MESSAGE_ID_NAMESPACE = uuid.UUID("0d2bd1c6-4b6b-4f8e-9a3c-8f3f2f7a1b5e")

#: structlog level -> syslog priority.
PRIORITIES = {
    "debug": 7,
    "info": 6,
    "notice": 5,
    "warning": 4,
    "error": 3,
    "critical": 2,
    "exception": 3,
}

_FIELD = re.compile(r"^[A-Z0-9][A-Z0-9_]*$")


def message_id(event: str) -> str:
    """The MESSAGE_ID of an event kind ("backup complete" -> a fixed id)."""
    return uuid.uuid5(MESSAGE_ID_NAMESPACE, event).hex


def field_name(key: str) -> str:
    """A structlog key as a journal field name (backup_id -> BACKUP_ID)."""
    name = re.sub(r"[^A-Z0-9_]", "_", key.upper()).lstrip("_")
    if not name or not _FIELD.match(name):
        name = "X_" + name
    return name


def encode(fields: Mapping[str, Any]) -> bytes:
    """The native protocol's encoding of one entry."""
    out = bytearray()
    for key, value in fields.items():
        name = field_name(key)
        data = value if isinstance(value, bytes) else str(value).encode()
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalSender:
    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def send(self, fields: Mapping[str, Any]) -> None:
        data = encode(fields)
        try:
            self._sock.sendto(data, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(data)

    def _send_memfd(self, data: bytes) -> None:
        fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            fds = array.array("i", [fd])
            self._sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._sock.close()


class JournaldRenderer:
    """A structlog processor that sends each event to the journal with
    native fields (MESSAGE, PRIORITY, MESSAGE_ID, SYSLOG_IDENTIFIER and one
    field per bound key: DOMAIN=, BACKUP_ID=, LEVEL=, CHECKPOINT=, ...), then
    drops the event."""

    def __init__(self, sender: JournalSender, identifier: str = "virtbackupd") -> None:
        self.sender = sender
        self.identifier = identifier

    def __call__(self, _logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
        event = str(event_dict.pop("event", ""))
        level = str(event_dict.pop("level", method))
        event_dict.pop("timestamp", None)  # the journal stamps entries itself
        fields: dict[str, Any] = {
            "MESSAGE": _message(event, event_dict),
            "PRIORITY": PRIORITIES.get(level, 6),
            "MESSAGE_ID": message_id(event),
            "SYSLOG_IDENTIFIER": self.identifier,
            "EVENT": event,
        }
        for key, value in event_dict.items():
            if value is not None:
                # The log level is PRIORITY; LEVEL= is the backup's level.
                fields["LEVEL" if key == "backup_level" else field_name(key)] = value
        try:
            self.sender.send(fields)
        except OSError as exc:
            # journald restarted or went away: the entry still reaches
            # stderr (which systemd also collects), never a crash.
            return f"{fields['MESSAGE']} (journald unreachable: {exc.strerror})"
        raise structlog.DropEvent


def _message(event: str, context: Mapping[str, Any]) -> str:
    """Human-readable text for journalctl's default view."""
    parts = [event] + [f"{k}={v}" for k, v in context.items() if v is not None]
    return " ".join(parts)
