"""The JSON codec of the format's files: text in, checked fields out, every
error naming the file and the field. No file access: the storage backend
reads the bytes (bounded, never through a link) and hands them here."""

from __future__ import annotations

import json
import re
import uuid as uuidlib
from collections.abc import Iterator
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from virtbackupd.core import extents
from virtbackupd.core.extents import Range
from virtbackupd.core.repository_format.names import (
    escaped,
    is_backup_id,
    is_plain_name,
    is_unsafe_char,
)
from virtbackupd.errors import VirtBackupError

_T = TypeVar("_T")
_E = TypeVar("_E", bound=StrEnum)

#: The largest JSON document of a repository we read: a manifest of a very
#: fragmented large disk is a few MiB.
MAX_JSON_BYTES = 64 * 1024 * 1024


class FormatError(VirtBackupError):
    """A file of ours this version cannot read: damaged, or newer. `path`
    names the file (for another storage backend: where it was read)."""

    path: Path  # always a file's (the root's context field allows text too)

    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class RepositoryFormatError(FormatError):
    """A repository file this version cannot read: damaged, or newer."""


def decode_text(path: Path, data: bytes, error: type[FormatError] = RepositoryFormatError) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise error(path, f"is not UTF-8 (byte {exc.start})") from exc


def decode_json(
    path: Path,
    data: bytes,
    cuts: list[str] | None = None,
    error: type[FormatError] = RepositoryFormatError,
) -> object:
    """One of our JSON documents, as untrusted input (bounded in nesting).
    `cuts`: take the range lists out (cut_ranges)."""
    text = decode_text(path, data, error)
    if cuts is not None:
        text = cut_ranges(text, cuts)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise error(path, f"not valid JSON ({str(exc)[:120]})") from exc
    except RecursionError:
        raise error(path, "nested too deeply to be ours") from None


def json_text(data: object) -> str:
    """How every JSON document of ours is written."""
    return json.dumps(data, indent=2) + "\n"


# Where a manifest's range list starts, where the list of lists ends, and
# the characters one of ours is made of ([[offset, length, "kind"], ...]).
# Plain searches and one character class: a regex over the list's items
# would keep state for each of 100 000 of them.
_RANGES_KEY = re.compile(r'"ranges"\s*:\s*\[')
_LISTS_END = re.compile(r"\]\s*\]")
_RANGE_CHARS = re.compile(r'[\[\]0-9\s,"a-z-]*')


def cut_ranges(text: str, cuts: list[str]) -> str:
    """`text` with each range list of ours replaced by its number in
    `cuts` (which gets the list's text): what a listing decodes is small.
    Only a balanced run of brackets, numbers and plain words is cut (no
    brace, no escape: nothing else can hide in it); anything else stays
    in place and is decoded as ever."""
    out: list[str] = []
    pos = 0
    for key in _RANGES_KEY.finditer(text):
        start = key.end() - 1
        if start < pos:
            continue
        end = _LISTS_END.search(text, start)
        if end is None:
            break
        segment = text[start : end.end()]
        if segment.count("[") != segment.count("]") or not _RANGE_CHARS.fullmatch(segment):
            continue
        out += [text[pos:start], str(len(cuts))]
        cuts.append(segment)
        pos = end.end()
    out.append(text[pos:])
    return "".join(out)


def _shown(value: object, limit: int = 32) -> str:
    """A value read from a file, as an error line shows it: cut (a hostile
    file's 400-digit number or megabyte string stays one readable line)."""
    text = repr(value) if not isinstance(value, int) or isinstance(value, bool) else str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


class Fields:
    """Typed access to one JSON object of a file of ours; every error
    names the file and the field."""

    def __init__(
        self,
        data: object,
        path: Path,
        where: str = "",
        error: type[FormatError] = RepositoryFormatError,
    ) -> None:
        self.path = path
        self.where = where
        self.error_type = error
        if not isinstance(data, dict):
            raise error(path, f"{where or 'the document'} is not an object")
        self.data: dict[str, object] = data

    def error(self, key: str, problem: str) -> FormatError:
        return self.error_type(self.path, f"field {self.where}{key}: {problem}")

    def names(self) -> list[str]:
        return list(self.data)

    def _get(self, key: str, kind: type[_T], default: _T | None = None) -> _T:
        if key not in self.data:
            if default is not None:
                return default
            raise self.error(key, "missing")
        value = self.data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(key, f"{_shown(value)} is not a {kind.__name__}")
        return value

    def text(self, key: str, default: str | None = None) -> str:
        return self._get(key, str, default)

    def opt_text(self, key: str) -> str | None:
        if self.data.get(key) is None:
            return None
        return self.text(key)

    def bounded_text(self, key: str, limit: int) -> str:
        value = self.text(key)
        if len(value) > limit:
            raise self.error(key, f"{len(value)} characters, more than {limit}")
        return value

    def line(self, key: str, limit: int) -> str:
        """A name shown on one line of a listing or log: not empty, no
        control characters (a newline would forge the next line)."""
        value = self.bounded_text(key, limit)
        if not value or any(is_unsafe_char(c) for c in value):
            raise self.error(
                key,
                f"'{escaped(value[:40])}' is not a name (empty, or control or format characters)",
            )
        return value

    def integer(self, key: str, default: int | None = None, minimum: int | None = None) -> int:
        value = self._get(key, int, default)
        if minimum is not None and value < minimum:
            raise self.error(key, f"{_shown(value)} is below {minimum}")
        if value >= 1 << 62:  # no disk is that large; SQLite's integers end at 2**63
            raise self.error(key, f"{_shown(value)} is too large")
        return value

    def backup_id(self, key: str) -> str:
        value = self.text(key)
        if not is_backup_id(value):
            raise self.error(
                key, f"{value[:40]!r} is not a backup id (such as 20261123T201500.123Z-3f2a)"
            )
        return value

    def opt_backup_id(self, key: str) -> str | None:
        return None if self.data.get(key) is None else self.backup_id(key)

    def backup_ids(self, key: str) -> list[str]:
        values = self.texts(key)
        for v in values:
            if not is_backup_id(v):
                raise self.error(key, f"{v[:40]!r} is not a backup id")
        return values

    def plain_name(self, key: str) -> str:
        value = self.text(key)
        if not is_plain_name(value):
            raise self.error(
                key, f"{value[:60]!r} is not a plain file name inside the backup's folder"
            )
        return value

    def uuid(self, key: str) -> str:
        value = self.text(key)
        try:
            return str(uuidlib.UUID(value))
        except ValueError:
            raise self.error(key, f"{value[:40]!r} is not a UUID") from None

    def grid(self, key: str) -> int:
        value = self.integer(key)
        if value < 4096 or value & (value - 1):
            raise self.error(key, f"{value} is not a power of two of at least 4096")
        return value

    def opt_bool(self, key: str) -> bool | None:
        if self.data.get(key) is None:
            return None
        return self._get(key, bool)

    def opt_integer(self, key: str) -> int | None:
        if self.data.get(key) is None:
            return None
        return self.integer(key)

    def time(self, key: str) -> datetime:
        try:
            return datetime.fromisoformat(self.text(key))
        except ValueError as exc:
            raise self.error(key, str(exc)) from exc

    def enum(self, key: str, kind: type[_E]) -> _E:
        value = self.text(key)
        try:
            return kind(value)
        except ValueError:
            allowed = ", ".join(repr(str(m.value)) for m in kind)
            raise self.error(key, f"{value!r} is not one of {allowed}") from None

    def sub(self, key: str, default: dict[str, object] | None = None) -> Fields:
        return Fields(
            self._get(key, dict, default), self.path, f"{self.where}{key}.", self.error_type
        )

    def items(self, key: str, default: list[object] | None = None) -> Iterator[Fields]:
        for i, item in enumerate(self._get(key, list, default)):
            yield Fields(item, self.path, f"{self.where}{key}[{i}].", self.error_type)

    def texts(self, key: str) -> list[str]:
        values = self._get(key, list, [])
        if not all(isinstance(v, str) for v in values):
            raise self.error(key, "is not a list of strings")
        return [str(v) for v in values]

    def ranges(self, key: str) -> tuple[Range, ...]:
        try:
            return tuple(extents.ranges_from_json(self._get(key, list)))
        except (ValueError, TypeError) as exc:
            raise self.error(key, f"bad range list ({exc})") from exc
