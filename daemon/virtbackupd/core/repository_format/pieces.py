"""A disk's ``.pieces`` record: the hash of every piece its digest covers."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from virtbackupd.core.extents import Kind, Piece
from virtbackupd.core.repository_format.codec import RepositoryFormatError

_HEAD = struct.Struct(">QQc")


def parse_pieces(data: bytes, path: Path) -> list[Piece]:
    """A ``.pieces`` file: the digest's records (core.extents.piece_record)
    back to back, in offset order; its SHA-256 is the recorded digest."""
    out: list[Piece] = []
    pos = 0
    while pos < len(data):
        if pos + _HEAD.size > len(data):
            raise RepositoryFormatError(path, f"truncated record at byte {pos}")
        offset, length, tag = _HEAD.unpack_from(data, pos)
        pos += _HEAD.size
        if tag == b"D":
            content = data[pos : pos + 16]
            if len(content) != 16:
                raise RepositoryFormatError(path, f"truncated hash at byte {pos}")
            pos += 16
            out.append(Piece(offset, length, Kind.DATA, content))
        elif tag == b"Z":
            out.append(Piece(offset, length, Kind.ZERO))
        else:
            raise RepositoryFormatError(path, f"unknown record kind {tag!r} at byte {pos}")
    return out


def checked_pieces(data: bytes, path: Path, digest: str) -> list[Piece]:
    """The pieces in `data`, once its SHA-256 is the disk's recorded digest."""
    if hashlib.sha256(data).hexdigest() != digest:
        raise RepositoryFormatError(path, "does not match the disk's recorded digest")
    return parse_pieces(data, path)
