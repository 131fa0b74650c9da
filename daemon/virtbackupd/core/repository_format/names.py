"""Names the format writes and checks: backup ids, the names of a backup's
files inside its folder (recorded in its manifest and in its images'
backing files), and the escaping of free text for display."""

from __future__ import annotations

import re
import secrets
import unicodedata
from datetime import datetime

MAX_NAME_CHARS = 255  # a libvirt domain name is far shorter in practice

# What new_backup_id makes (and, without the milliseconds, what early
# versions made): a name that can never climb out of a folder.
BACKUP_ID = re.compile(r"[0-9]{8}T[0-9]{6}(\.[0-9]{3})?Z-[0-9a-f]{4}")


def is_backup_id(text: str) -> bool:
    return BACKUP_ID.fullmatch(text) is not None


def is_plain_name(text: str) -> bool:
    """A file name inside its own folder: no separator, not hidden (our
    own bookkeeping starts with a dot), not empty."""
    return (
        0 < len(text) <= 255 and "/" not in text and "\x00" not in text and not text.startswith(".")
    )


def is_unsafe_char(c: str) -> bool:
    """A character that moves a terminal rather than showing itself: C0,
    DEL, C1, and Unicode format characters (bidi overrides such as
    U+202E reorder what follows them on the screen)."""
    code = ord(c)
    return code < 32 or 127 <= code < 160 or unicodedata.category(c) == "Cf"


def escaped(text: str) -> str:
    """`text` with every unsafe character written as ``\\xNN`` or
    ``\\uNNNN``: a repository's free text (an attempt's error, a reason)
    shown the same by every command, never as a terminal escape."""
    return "".join(
        (f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}") if is_unsafe_char(c) else c
        for c in text
    )


def new_backup_id(now: datetime) -> str:
    """Unique, and sorting as the backups were taken (to the millisecond):
    ``20261123T201500.123Z-3f2a``."""
    return f"{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z-{secrets.token_hex(2)}"


# A disk's image and piece file are named in its manifest, and an
# incremental's image names its parent's image as backing file (a relative
# path inside the qcow2 header): part of the format, whatever stores it.


def disk_file(disk: str) -> str:
    return f"{disk}.qcow2"


def pieces_file(disk: str) -> str:
    return f"{disk}.pieces"


def backing_of(parent_id: str, disk: str) -> str:
    """Backing path of an incremental, relative to the overlay's folder."""
    return f"../{parent_id}/{disk_file(disk)}"
