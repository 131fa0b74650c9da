"""The local folder backend's file primitives: bounded reads that never
follow a link, and writes that are synced (and atomic where they replace)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from virtbackupd.core.repository_format.codec import (
    MAX_JSON_BYTES,
    RepositoryFormatError,
    decode_json,
    json_text,
)


def read_bounded(path: Path, limit: int) -> bytes:
    """A regular file of at most `limit` bytes, not through a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise RepositoryFormatError(path, f"cannot read: {exc.strerror or exc}") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        # Checked before fdopen, which refuses a folder naming only the fd.
        os.close(fd)
        raise RepositoryFormatError(path, "is not a regular file")
    with os.fdopen(fd, "rb") as f:
        # Asked for what is there (plus one: it grew), not for `limit`:
        # a read of `limit` bytes allocates that much first, 64 MiB for
        # every small JSON file a listing reads.
        data = f.read(min(st.st_size, limit) + 1)
    if len(data) > limit:
        raise RepositoryFormatError(path, f"is larger than {limit} bytes")
    return data


def read_json(path: Path, missing_ok: bool = False, cuts: list[str] | None = None) -> object:
    """A repository's JSON file, as untrusted input: a regular file (a
    FIFO or /dev/zero would block or never end), not through a symlink,
    bounded in size and in nesting. `cuts`: take the range lists out
    (codec.cut_ranges)."""
    if not path.exists() and not path.is_symlink():
        if missing_ok:
            return None
        raise RepositoryFormatError(path, "missing")
    return decode_json(path, read_bounded(path, MAX_JSON_BYTES), cuts)


def write_synced(path: Path, data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_synced(path: Path, text: str) -> None:
    """Write `text` beside `path`, fsync it, rename it over `path`, fsync
    the folder: readers see the old file or the new one, never a mix."""
    tmp = path.with_name(f"{path.name}.tmp")
    write_synced(tmp, text)
    tmp.rename(path)
    fsync_path(path.parent)


def replace_json(path: Path, data: object) -> None:
    replace_synced(path, json_text(data))


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: so that renames in it are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
