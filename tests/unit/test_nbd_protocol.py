"""Pure NBD wire parsing: what the client accepts and what it refuses."""

from __future__ import annotations

import struct

import pytest

from virtbackupd.adapters.nbd import protocol as p
from virtbackupd.adapters.nbd.protocol import BlockSize, Extent, WireError


def _status(ctx: int, pairs: list[tuple[int, int]]) -> bytes:
    return struct.pack(">I", ctx) + b"".join(struct.pack(">II", n, f) for n, f in pairs)


def test_block_status_is_clipped_to_the_request() -> None:
    ctx, ext = p.parse_block_status(_status(3, [(4096, 0), (1 << 20, 3)]), 8192, 65536, False)
    assert ctx == 3
    assert ext == [Extent(8192, 4096, 0), Extent(12288, 61440, 3)]


@pytest.mark.parametrize(
    ("payload", "req_one", "match"),
    [
        (_status(1, [(4096, 0), (4096, 0)]), True, "REQ_ONE returned 2 extents"),
        (_status(1, [(0, 0)]), False, "length 0"),
        (_status(1, [(65536, 0), (4096, 0)]), False, "run past the requested range"),
        (_status(1, [(65537, 0)]), True, "past the request"),
        (struct.pack(">I", 1), False, "not 4 \\+ 8\\*N"),
        (struct.pack(">I", 1) + b"\0" * 7, False, "not 4 \\+ 8\\*N"),
    ],
)
def test_block_status_violations(payload: bytes, req_one: bool, match: str) -> None:
    with pytest.raises(WireError, match=match):
        p.parse_block_status(payload, 0, 65536, req_one)


def test_block_size_constraints() -> None:
    assert p.parse_block_size(struct.pack(">III", 512, 4096, 1 << 25)) == BlockSize(
        512, 4096, 1 << 25
    )
    # An "unlimited" maximum is capped to the payload every server honours.
    assert p.parse_block_size(struct.pack(">III", 1, 4096, 0xFFFFFFFF)).maximum == 32 << 20
    with pytest.raises(WireError, match="power of two"):
        p.parse_block_size(struct.pack(">III", 3, 4096, 1 << 20))
    with pytest.raises(WireError, match="maximum block size"):
        p.parse_block_size(struct.pack(">III", 512, 4096, 1000))
    with pytest.raises(WireError, match="12"):
        p.parse_block_size(b"\0" * 8)


def test_error_chunk_parsing() -> None:
    msg = b"no space"
    payload = struct.pack(">IH", 28, len(msg)) + msg + struct.pack(">Q", 4096)
    assert p.parse_error_chunk(payload, True) == (28, "no space", 4096)
    with pytest.raises(WireError, match="message length"):
        p.parse_error_chunk(struct.pack(">IH", 5, 50) + b"x", False)
    with pytest.raises(WireError, match="error value 0"):
        p.parse_error_chunk(struct.pack(">IH", 0, 0), False)
    assert p.errno_name(28) == "ENOSPC"
    assert p.errno_name(999) == "errno 999"


def test_info_export_requires_has_flags() -> None:
    assert p.parse_info_export(struct.pack(">QH", 1 << 30, 0x0D)) == (1 << 30, 0x0D)
    with pytest.raises(WireError, match="HAS_FLAGS"):
        p.parse_info_export(struct.pack(">QH", 1 << 30, 0x0C))


def test_request_and_option_packing() -> None:
    raw = p.pack_request(p.CMD_FLAG_FUA, p.CMD_WRITE, 7, 4096, 512)
    assert raw == struct.pack(">IHHQQI", 0x25609513, 1, 1, 7, 4096, 512)
    go = p.pack_go("vda", (p.INFO_BLOCK_SIZE,))
    assert go == struct.pack(">I", 3) + b"vda" + struct.pack(">HH", 1, 3)
    q = p.pack_meta_context_query("vda", ("base:allocation",))
    assert q == struct.pack(">I", 3) + b"vda" + struct.pack(">II", 1, 15) + b"base:allocation"
    with pytest.raises(ValueError, match="longer than 4096"):
        p.pack_string("x" * 5000)
